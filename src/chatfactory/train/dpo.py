"""DPO: direct preference optimisation — the policy learns from comparisons without a reward model.

Rafailov et al. (2023): the KL-regularised RLHF objective has a closed-form optimum in which the
reward is β·log(π(y|x)/π_ref(y|x)) up to a term that cancels between two answers to one prompt. So the
Bradley–Terry loss can be written on the policy itself:

    loss = −log σ(β·[(log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))])

with log π(y) summed over the answer's tokens (its <|end|> included) and the SFT model as the frozen
reference (with LoRA, train/lora.py: the policy itself with its adapters off, no second copy). Same
comparisons, batches and run-directory layout as the reward model. Evaluation on the
held-out pairs logs the implicit rewards β·log(π/π_ref): their accuracy (chosen above rejected), the
margin, and each side's mean (the chosen reward going negative is the known "both fall" effect).

    chatfactory dpo --config tiny --out runs/NAME dpo.data=comparisons.jsonl dpo.beta=0.1
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import load_model, resolve_stage
from ..config import Config
from ..data.preferences import PairBatches, collate, val_chunks
from .lora import apply_lora, as_reference, lora_settings, summary
from .loop import Stage, all_reduce_sum, train
from .ppo import frozen, no_dropout
from .reward import pair_stage_inputs


def answer_logps(model, idx: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """(N, T) right-padded rows and a mask over their answer tokens -> (N,) Σ log p(answer token)."""
    keep = answer_mask[:, 1:]
    # the model scores the answer tokens alone (no logits for the prompt: at a 49k vocabulary they dominate memory)
    nll = model(idx[:, :-1], targets=idx[:, 1:].masked_fill(~keep, -100), reduction="none")
    rows = torch.arange(len(idx), device=idx.device)[:, None].expand_as(keep)[keep]
    return -torch.zeros(len(idx), dtype=nll.dtype, device=idx.device).index_add(0, rows, nll)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float):
    """(2B,) answer log-probs, chosen rows first -> (mean loss, (B,) chosen rewards, (B,) rejected rewards);
    a reward is the implicit β·(log π − log π_ref)."""
    rewards = beta * (policy - reference)
    chosen, rejected = rewards.chunk(2)
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


class DPOStage(Stage):
    name = "dpo"

    def __init__(self, dc, train_pairs, val_pairs, pad_id: int, reference, model_config: dict):
        self.dc, self.val, self.pad_id, self.ref, self.model_config = dc, val_pairs, pad_id, reference, model_config
        self.seq_len = dc.seq_len
        self.batches = PairBatches(train_pairs, dc.batch_size, dc.seed, pad_id)

    def micro_batch(self, step, micro, rank, world):
        return self.batches.micro_batch(step, micro, self.dc.grad_accum, rank, world)

    def _ref_logps(self, batch):
        with torch.no_grad(), as_reference(self.ref):  # a LoRA policy: its base, adapters off
            return answer_logps(self.ref, batch["idx"], batch["answer_mask"])

    def implicit_rewards(self, model, batch):
        """-> (loss, (B,) chosen rewards, (B,) rejected rewards) of one batch of pairs."""
        return dpo_loss(answer_logps(model, batch["idx"], batch["answer_mask"]), self._ref_logps(batch), self.dc.beta)

    def loss(self, model, batch):
        return self.implicit_rewards(model, batch)[0]

    def tokens(self, batch):
        return int(batch["last"].sum()) + len(batch["last"])

    def evaluate(self, model, d):
        if not self.val:
            return {}
        # loss sum, right, margin sum, chosen reward sum, rejected reward sum, pairs
        tot = torch.zeros(6, dtype=torch.float64, device=d.device)
        for chunk in val_chunks(self.val, self.dc.batch_size, self.dc.eval_batches, d.rank, d.world):
            b = {k: v.to(d.device) for k, v in collate(chunk, self.pad_id).items()}
            loss, rc, rr = self.implicit_rewards(model, b)
            m = (rc - rr).double()
            tot += torch.stack([loss.double() * len(chunk), ((m > 0).double() + 0.5 * (m == 0).double()).sum(), m.sum(),
                                rc.double().sum(), rr.double().sum(), torch.tensor(float(len(chunk)), dtype=torch.float64, device=d.device)])
        tot = all_reduce_sum(tot)
        n = max(1.0, tot[5].item())
        return {"val_loss": tot[0].item() / n, "val_reward_accuracy": tot[1].item() / n, "val_margin": tot[2].item() / n,
                "val_chosen_reward": tot[3].item() / n, "val_rejected_reward": tot[4].item() / n}


def build_dpo(cfg: Config, run_dir):
    """The DPO stage of ``cfg.dpo`` as ``run_dpo`` trains it -> (stage, policy, optimizer steps, distributed setup)."""
    run_dir = Path(run_dir)
    lora = lora_settings(cfg, "dpo")
    dc, d, init_dir, tok, train_pairs, val_pairs, skipped, policy = pair_stage_inputs(run_dir, cfg.dpo, "dpo")
    if lora and not dc.ref_from:
        reference = policy  # run with its adapters off: the init model itself, no second copy of it
    else:
        reference, _ = load_model(resolve_stage(run_dir, dc.ref_from or dc.init_from, "dpo.ref_from" if dc.ref_from else "dpo.init_from"),
                                  device=d.device)
        if reference.cfg != policy.cfg:
            raise ValueError(f"dpo: the reference ({dc.ref_from}) and the policy ({dc.init_from}) have different model shapes")
        frozen(reference)
    stage = DPOStage(dc, train_pairs, val_pairs, tok.pad_id, reference, policy.cfg.to_dict())
    if lora:
        apply_lora(policy, lora, dc.seed)
        stage.info = {"lora": lora}
    # Dropout off in the policy (its adapters' too): the reference is scored without it, so with it on the
    # implicit rewards β·log(π/π_ref) would start as dropout noise instead of 0 (an imported GPT-2 has 0.1)
    no_dropout(policy)
    steps = dc.steps or math.ceil(dc.epochs * stage.batches.steps_per_epoch(dc.grad_accum, d.world))
    if d.main:
        print(f"dpo: {len(train_pairs):,} train pairs, {len(val_pairs):,} held out"
              + (f", {skipped} malformed rows skipped" if skipped else "")
              + f"; {steps} steps from {init_dir}, beta={dc.beta}" + (f"; {summary(policy)}" if lora else ""))
    return stage, policy, steps, d


def run_dpo(cfg: Config, run_dir) -> dict:
    """DPO from ``cfg.dpo.init_from`` (the reference too, unless ``ref_from``); writes ``run_dir/dpo``."""
    stage, policy, steps, d = build_dpo(cfg, run_dir)
    result = train(stage, policy, dataclasses.replace(stage.dc, steps=steps), Path(run_dir) / "dpo", d)
    if d.world > 1:
        torch.distributed.destroy_process_group()
    return result
