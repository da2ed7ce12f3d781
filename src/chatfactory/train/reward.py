"""The reward model: InstructGPT's step 2, a scalar score learned from human comparisons.

The GPT backbone (initialised from SFT) without its LM head, plus a linear head from the final-normed
hidden state to one number, read at the last real token of prompt + answer. Trained with the
Bradley–Terry loss −log σ(r_chosen − r_rejected) for one epoch by default; its evaluation is the
held-out pairwise accuracy (data, batches and accuracy shared with DPO: train/pairs.py). After training,
the head's bias is shifted so that the answers of a sample of training pairs score 0 on average: rewards
then read as "better / worse than a typical answer", which keeps PPO's reward scale centred. With LoRA
(model/lora.py) the backbone is frozen under adapters and the head trains whole.

    chatfactory reward --config tiny --out runs/NAME reward.data=comparisons.jsonl
    rm = load_reward_model("runs/NAME/reward"); r = rm.score(idx, last_index)   # (B,)
    v = rm.values(idx)                                                         # (B, T): PPO's critic
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config
from ..data.preferences import collate
from ..model.gpt import GPT, GPTConfig
from ..model.lora import apply_lora, lora_settings, merge_weights, summary
from ..store.checkpoint import load_checkpoint, load_weights, save_checkpoint, stage_config, unique_state_dict
from ..store.files import CheckpointError
from ..store.load import model_config
from . import memory
from .loop import all_reduce_sum, train
from .pairs import PairStage, pair_inputs, pair_right


class RewardModel(nn.Module):
    """``backbone`` (a GPT whose LM head is dropped: a scalar head replaces it) + ``head``."""

    def __init__(self, backbone: GPT | GPTConfig):
        super().__init__()
        if isinstance(backbone, GPTConfig):
            backbone = GPT(backbone)
        backbone.lm_head = None  # unused, and DDP refuses parameters that get no gradient
        self.backbone, self.cfg = backbone, backbone.cfg
        self.head = nn.Linear(self.cfg.n_embd, 1)
        # std 1/sqrt(d+1): initial scores of order 1 whatever the width (InstructGPT / TRL's choice)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(self.cfg.n_embd + 1))
        nn.init.zeros_(self.head.bias)

    def values(self, idx, positions=None, attn_mask=None) -> torch.Tensor:
        """(B, T) ids -> (B, T): the score the model would give if the sequence ended at each position."""
        return self.head(self.backbone.hidden_states(idx, positions=positions, attn_mask=attn_mask)).squeeze(-1).float()

    def score(self, idx, last_index, positions=None, attn_mask=None) -> torch.Tensor:
        """(B, T) ids and (B,) index of each row's last real token -> (B,) scores."""
        v = self.values(idx, positions, attn_mask)
        return v.gather(1, last_index.view(-1, 1).to(v.device)).squeeze(1)

    forward = score  # DDP only synchronises through forward()

    def flops_per_token(self, seq_len=None, *, train: bool = True) -> float:
        """The backbone's FLOPs per token without its LM head, and the scalar head's (GPT.flops_per_token)."""
        head = 2 * self.head.weight.numel() * (1 + 2 * train)
        return self.backbone.flops_per_token(seq_len, head=False, train=train) + head


def load_reward_model(stage_dir, device="cpu") -> RewardModel:
    """A trained reward model (``runs/NAME/reward``), in eval mode."""
    weights, info, _ = load_checkpoint(stage_dir)
    if info.get("kind", info.get("stage")) != "reward":
        raise CheckpointError(f"{Path(stage_dir) / 'config.json'}: not a reward model (kind={info.get('kind')!r})")
    model = RewardModel(model_config(info, stage_dir))
    load_weights(model, merge_weights(weights, info), str(Path(stage_dir) / "model.safetensors"))
    return model.to(device).eval()


def bradley_terry(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) scores, chosen rows first -> (mean loss, (B,) margins r_chosen − r_rejected)."""
    chosen, rejected = scores.chunk(2)
    margin = chosen - rejected
    return -F.logsigmoid(margin).mean(), margin


class RewardStage(PairStage):
    name = "reward"
    finishes_itself = True  # run_reward marks the checkpoint finished with the bias shift saved
    val_names = ("val_accuracy", "val_loss", "val_margin")

    def loss(self, model, batch):
        return bradley_terry(model(batch["idx"], batch["last"]))[0]

    def val_values(self, model, batch):
        _, margin = bradley_terry(model(batch["idx"], batch["last"]))
        return {"val_accuracy": pair_right(margin), "val_loss": -F.logsigmoid(margin), "val_margin": margin}


@torch.no_grad()
def mean_score(model: RewardModel, pairs, pad_id: int, batch_size: int, device) -> float:
    """Mean score over the chosen and rejected answers of ``pairs``."""
    total, n = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        b = collate(pairs[i:i + batch_size], pad_id)
        total += model.score(b["idx"].to(device), b["last"]).double().sum().item()
        n += len(b["last"])
    return total / max(1, n)


def run_reward(cfg: Config, run_dir) -> dict:
    """Train the reward model on ``cfg.reward.data``; writes ``run_dir/reward``. Safe to re-run: it resumes."""
    run_dir = Path(run_dir)
    lora = lora_settings(cfg, "reward")
    inputs = pair_inputs(run_dir, cfg.reward, "reward")
    settings, d, tok = inputs.settings, inputs.dist, inputs.tok
    torch.manual_seed(settings.seed)  # the head's init
    # from a policy: its backbone and a new head; from a reward model: continued, head and all
    model = RewardModel(inputs.model) if inputs.model is not None else load_reward_model(inputs.init_dir).train()
    stage = RewardStage(inputs, model.cfg.to_dict())
    if lora:  # adapters on the backbone (frozen); the new head trains whole
        apply_lora(model.backbone, lora, settings.seed)
        stage.info = {"lora": lora}
    steps = stage.steps(d.world)
    if d.main:
        print(inputs.describe("reward", steps) + f"; {model.backbone.num_params() / 1e6:.2f}M parameters"
              + (f"; {summary(model)}" if lora else ""))
    out = run_dir / "reward"
    result = train(stage, model, dataclasses.replace(settings, steps=steps), out, d)
    # The loop saved the trained weights unfinished (finishes_itself); the calibrated save below marks the
    # stage finished, so the mark is the last thing written. A stage found finished was calibrated by an
    # earlier run and is not shifted again; one finished without a bias_shift (an older version killed
    # between its two saves) is uncentred and is calibrated now. Every rank learns rank 0's answer:
    # under FSDP the calibration is a collective.
    info = stage_config(out) if d.main else {}
    todo = not info.get("finished") or "bias_shift" not in info
    calibrate = bool(all_reduce_sum(torch.tensor(float(d.main and todo), device=d.device)).item())
    sharded = memory.is_sharded(model)
    # a model sharded by FSDP scores on every rank (weights gathered); rank 0 writes
    if calibrate and (d.main or sharded):
        # centre the scores: SFT-like answers (those of the comparisons) average 0
        model.eval()
        calib = [inputs.train[stage.batches.index(k)] for k in range(min(settings.calib_pairs, len(inputs.train)))]
        with memory.gathered(model):
            shift = mean_score(model, calib, tok.pad_id, settings.batch_size, d.device)
        model.head.bias.data -= shift
        weights = memory.full_weights(model, d.main) if sharded else unique_state_dict(model)
    if calibrate and d.main:
        _, info, state = load_checkpoint(out, with_state=True)
        info.update(kind="reward", bias_shift=shift, finished=True)
        save_checkpoint(out, weights, {k: v for k, v in info.items() if k != "step"}, state, info["step"])
    if d.main:
        result["bias_shift"] = info["bias_shift"]
    if d.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result
