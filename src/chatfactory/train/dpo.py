"""DPO: direct preference optimisation — the policy learns from comparisons without a reward model.

Rafailov et al. (2023): the KL-regularised RLHF objective has a closed-form optimum in which the
reward is β·log(π(y|x)/π_ref(y|x)) up to a term that cancels between two answers to one prompt. So the
Bradley–Terry loss can be written on the policy itself:

    loss = −log σ(β·[(log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))])

with log π(y) summed over the answer's tokens (its <|end|> included) and the SFT model as the frozen
reference (with LoRA, model/lora.py: the policy itself with its adapters off, no second copy). The
policy trains with dropout off, as the reference is scored, so at step 0 every implicit reward is
exactly 0. Same comparisons, batches and held-out accuracy as the reward model (train/pairs.py).
Evaluation on the held-out pairs logs the implicit rewards β·log(π/π_ref): their accuracy (chosen
above rejected, a tie half), the margin, and each side's mean (the chosen reward going negative is the
known "both fall" effect).

    chatfactory dpo --config tiny --out runs/NAME dpo.data=comparisons.jsonl dpo.beta=0.1
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import Config
from ..model.lora import apply_lora, as_reference, lora_settings, summary
from ..store.checkpoint import resolve_stage
from ..store.load import load_model
from .loop import train
from .pairs import PairInputs, PairStage, pair_inputs, pair_right
from .rl_models import frozen, no_dropout


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


class DPOStage(PairStage):
    name = "dpo"
    val_names = ("val_loss", "val_reward_accuracy", "val_margin", "val_chosen_reward", "val_rejected_reward")

    def __init__(self, inputs: PairInputs, reference, model_config: dict):
        super().__init__(inputs, model_config)
        self.ref = reference

    def _ref_logps(self, batch):
        with torch.no_grad(), as_reference(self.ref):  # a LoRA policy: its base, adapters off
            return answer_logps(self.ref, batch["idx"], batch["answer_mask"])

    def implicit_rewards(self, model, batch):
        """-> (loss, (B,) chosen rewards, (B,) rejected rewards) of one batch of pairs."""
        return dpo_loss(answer_logps(model, batch["idx"], batch["answer_mask"]), self._ref_logps(batch),
                        self.settings.beta)

    def loss(self, model, batch):
        return self.implicit_rewards(model, batch)[0]

    def flops(self, model, batch):
        # the policy trains and the reference scores: the LM head on the answer tokens only (answer_logps)
        tokens, scored = int(batch["last"].sum()), int(batch["answer_mask"][:, 1:].sum())
        width = batch["idx"].size(1) - 1
        with as_reference(self.ref):  # a LoRA policy's reference is its base: adapters off
            ref = self.ref.flops(tokens, scored, width, train=False)
        return model.flops(tokens, scored, width) + ref

    def val_values(self, model, batch):
        _, chosen, rejected = self.implicit_rewards(model, batch)
        margin = chosen - rejected
        return {"val_loss": -F.logsigmoid(margin), "val_reward_accuracy": pair_right(margin), "val_margin": margin,
                "val_chosen_reward": chosen, "val_rejected_reward": rejected}


def build_dpo(cfg: Config, run_dir):
    """The DPO stage of ``cfg.dpo`` as ``run_dpo`` trains it -> (stage, policy, optimizer steps, distributed setup)."""
    run_dir = Path(run_dir)
    lora = lora_settings(cfg, "dpo")
    inputs = pair_inputs(run_dir, cfg.dpo, "dpo")
    settings, policy = inputs.settings, inputs.model
    if lora and not settings.ref_from:
        reference = policy  # run with its adapters off: the init model itself, no second copy of it
    else:
        ref_dir = resolve_stage(run_dir, settings.ref_from or settings.init_from,
                                "dpo.ref_from" if settings.ref_from else "dpo.init_from")
        reference, _ = load_model(ref_dir, device=inputs.dist.device)
        if reference.cfg != policy.cfg:
            raise ValueError(f"dpo: the reference ({settings.ref_from}) and the policy ({settings.init_from}) "
                             "have different model shapes")
        frozen(reference)
    stage = DPOStage(inputs, reference, policy.cfg.to_dict())
    if lora:
        apply_lora(policy, lora, settings.seed)
        stage.info = {"lora": lora}
    # Dropout off in the policy (its adapters' too): the reference is scored without it, so with it on the
    # implicit rewards β·log(π/π_ref) would start as dropout noise instead of 0 (an imported GPT-2 has 0.1)
    no_dropout(policy)
    steps = stage.steps(inputs.dist.world)
    if inputs.dist.main:
        print(inputs.describe("dpo", steps) + f", beta={settings.beta}" + (f"; {summary(policy)}" if lora else ""))
    return stage, policy, steps, inputs.dist


def run_dpo(cfg: Config, run_dir) -> dict:
    """DPO from ``cfg.dpo.init_from`` (the reference too, unless ``ref_from``); writes ``run_dir/dpo``."""
    stage, policy, steps, d = build_dpo(cfg, run_dir)
    result = train(stage, policy, dataclasses.replace(stage.settings, steps=steps), Path(run_dir) / "dpo", d)
    if d.world > 1:
        torch.distributed.destroy_process_group()
    return result
