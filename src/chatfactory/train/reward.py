"""The reward model: InstructGPT's step 2, a scalar score learned from human comparisons.

The GPT backbone (initialised from SFT) without its LM head, plus a linear head from the final-normed
hidden state to one number, read at the last real token of prompt + answer. Trained with the
Bradley–Terry loss −log σ(r_chosen − r_rejected) for one epoch by default; its evaluation is the
held-out pairwise accuracy. After training, the head's bias is shifted so that the answers of a sample
of training pairs score 0 on average: rewards then read as "better / worse than a typical answer",
which keeps PPO's reward scale centred. With LoRA (train/lora.py) the backbone is frozen under
adapters and the head trains whole.

    chatfactory reward --config tiny --out runs/NAME reward.data=comparisons.jsonl
    rm = load_reward_model("runs/NAME/reward"); r = rm.score(idx, last_index)   # (B,)
    v = rm.values(idx)                                                         # (B, T): PPO's critic
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import CheckpointError, load_checkpoint, load_model, load_weights, resolve_stage, save_checkpoint, unique_state_dict
from ..config import Config
from ..data.preferences import PairBatches, collate, pair_data, val_chunks
from ..model import GPT, GPTConfig
from ..tokenizer import Tokenizer
from . import memory
from .lora import apply_lora, lora_settings, merge_weights, summary
from .loop import Stage, all_reduce_sum, setup_dist, train


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

    def flops_per_token(self, seq_len=None) -> float:
        return self.backbone.flops_per_token(seq_len)


def run_tokenizer(run_dir, init_dir: Path) -> Tokenizer:
    """The run's tokenizer; a stage started from another run's weights uses (and copies) that run's."""
    path = Path(run_dir) / "tokenizer.json"
    if not path.exists():
        theirs = init_dir.parent / "tokenizer.json"
        if not theirs.exists():
            raise FileNotFoundError(f"{path}: tokenizer not found (nor {theirs})")
        Tokenizer.load(theirs).save(path)
    return Tokenizer.load(path)


def load_reward_model(stage_dir, device="cpu") -> RewardModel:
    """A trained reward model (``runs/NAME/reward``), in eval mode."""
    weights, info, _ = load_checkpoint(stage_dir)
    if info.get("kind", info.get("stage")) != "reward":
        raise CheckpointError(f"{Path(stage_dir) / 'config.json'}: not a reward model (kind={info.get('kind')!r})")
    try:
        cfg = GPTConfig.from_dict(info["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(stage_dir) / 'config.json'}: bad model config ({e})") from None
    model = RewardModel(cfg)
    load_weights(model, merge_weights(weights, info), str(Path(stage_dir) / "model.safetensors"))
    return model.to(device).eval()


def bradley_terry(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) scores, chosen rows first -> (mean loss, (B,) margins r_chosen − r_rejected)."""
    chosen, rejected = scores.chunk(2)
    margin = chosen - rejected
    return -F.logsigmoid(margin).mean(), margin


def pair_right(margin: torch.Tensor) -> torch.Tensor:
    """Per-pair credit from margins: 1 right, 0 wrong, and a tie half right — so a model that scores
    everything alike sits at exactly 50%."""
    return (margin > 0).double() + 0.5 * (margin == 0).double()


class RewardStage(Stage):
    name = "reward"
    finishes_itself = True  # run_reward marks the checkpoint finished with the bias shift saved

    def __init__(self, rc, train_pairs, val_pairs, pad_id: int, model_config: dict):
        self.rc, self.val, self.pad_id, self.model_config = rc, val_pairs, pad_id, model_config
        self.seq_len = rc.seq_len
        self.batches = PairBatches(train_pairs, rc.batch_size, rc.seed, pad_id)

    def micro_batch(self, step, micro, rank, world):
        return self.batches.micro_batch(step, micro, self.rc.grad_accum, rank, world)

    def loss(self, model, batch):
        return bradley_terry(model(batch["idx"], batch["last"]))[0]

    def tokens(self, batch):
        return int(batch["last"].sum()) + len(batch["last"])

    def evaluate(self, model, d):
        if not self.val:
            return {}
        tot = torch.zeros(4, dtype=torch.float64, device=d.device)  # correct, loss sum, margin sum, pairs
        for chunk in val_chunks(self.val, self.rc.batch_size, self.rc.eval_batches, d.rank, d.world):
            b = collate(chunk, self.pad_id)
            scores = model(b["idx"].to(d.device), b["last"])
            _, margin = bradley_terry(scores)
            tot += torch.stack([pair_right(margin).sum(),
                                -F.logsigmoid(margin).double().sum(), margin.double().sum(),
                                torch.tensor(float(len(chunk)), dtype=torch.float64, device=d.device)])
        tot = all_reduce_sum(tot)
        n = max(1.0, tot[3].item())
        return {"val_accuracy": tot[0].item() / n, "val_loss": tot[1].item() / n, "val_margin": tot[2].item() / n}


@torch.no_grad()
def mean_score(model: RewardModel, pairs, pad_id: int, batch_size: int, device) -> float:
    """Mean score over the chosen and rejected answers of ``pairs``."""
    total, n = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        b = collate(pairs[i:i + batch_size], pad_id)
        total += model.score(b["idx"].to(device), b["last"]).double().sum().item()
        n += len(b["last"])
    return total / max(1, n)


def pair_stage_inputs(run_dir: Path, pc, name: str):
    """What a stage trained on comparisons (``name``: reward, dpo) starts from -> (``pc`` with its data
    defaulting to RUN/comparisons.jsonl, the distributed setup, the init stage's directory, the tokenizer,
    train pairs, held-out pairs, malformed rows skipped, the init weights checked against ``pc.seq_len``)."""
    pc = dataclasses.replace(pc, data=pc.data or str(run_dir / "comparisons.jsonl"))
    d = setup_dist(pc.device)
    init_dir = resolve_stage(run_dir, pc.init_from, f"{name}.init_from")
    tok = run_tokenizer(run_dir, init_dir)
    train_pairs, val_pairs, skipped = pair_data(pc, tok)
    gpt, _ = load_model(init_dir)
    if pc.seq_len > gpt.cfg.block_size:
        raise ValueError(f"{name}.seq_len={pc.seq_len} exceeds the model's block_size={gpt.cfg.block_size} ({init_dir})")
    return pc, d, init_dir, tok, train_pairs, val_pairs, skipped, gpt


def run_reward(cfg: Config, run_dir) -> dict:
    """Train the reward model on ``cfg.reward.data``; writes ``run_dir/reward``. Safe to re-run: it resumes."""
    run_dir = Path(run_dir)
    lora = lora_settings(cfg, "reward")
    rc, d, init_dir, tok, train_pairs, val_pairs, skipped, gpt = pair_stage_inputs(run_dir, cfg.reward, "reward")
    torch.manual_seed(rc.seed)  # the head's init
    model = RewardModel(gpt)
    stage = RewardStage(rc, train_pairs, val_pairs, tok.pad_id, model.cfg.to_dict())
    if lora:  # adapters on the backbone (frozen); the new head trains whole
        apply_lora(model.backbone, lora, rc.seed)
        stage.info = {"lora": lora}
    steps = rc.steps or math.ceil(rc.epochs * stage.batches.steps_per_epoch(rc.grad_accum, d.world))
    if d.main:
        print(f"reward: {len(train_pairs):,} train pairs, {len(val_pairs):,} held out"
              + (f", {skipped} malformed rows skipped" if skipped else "")
              + f"; {steps} steps from {init_dir}; {model.backbone.num_params() / 1e6:.2f}M parameters"
              + (f"; {summary(model)}" if lora else ""))
    out = run_dir / "reward"
    result = train(stage, model, dataclasses.replace(rc, steps=steps), out, d)
    # The loop saved the trained weights unfinished (finishes_itself); the calibrated save below marks the
    # stage finished, so the mark is the last thing written. A stage found finished was calibrated by an
    # earlier run and is not shifted again; one finished without a bias_shift (an older version killed
    # between its two saves) is uncentred and is calibrated now. Every rank learns rank 0's answer:
    # under FSDP the calibration is a collective.
    info = json.loads((out / "config.json").read_text(encoding="utf-8")) if d.main else {}
    todo = not info.get("finished") or "bias_shift" not in info
    calibrate = bool(all_reduce_sum(torch.tensor(float(d.main and todo), device=d.device)).item())
    sharded = memory.is_sharded(model)
    # a model sharded by FSDP scores on every rank (weights gathered); rank 0 writes
    if calibrate and (d.main or sharded):
        # centre the scores: SFT-like answers (those of the comparisons) average 0
        model.eval()
        calib = [train_pairs[stage.batches.index(k)] for k in range(min(rc.calib_pairs, len(train_pairs)))]
        with memory.gathered(model):
            shift = mean_score(model, calib, tok.pad_id, rc.batch_size, d.device)
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
