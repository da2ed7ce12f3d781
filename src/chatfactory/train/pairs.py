"""What the two stages trained on comparisons share: the reward model (train/reward.py) and DPO
(train/dpo.py).

Both start from a stage of the run (SFT by default) and its tokenizer, read the same comparisons
(data/preferences.py: B chosen rows stacked over their B rejected ones, a pure function of the step),
and are judged on held-out pairs by the same pairwise accuracy, in which a tie counts half.

    inputs = pair_inputs(run_dir, cfg.reward, "reward")   # settings, tokenizer, pairs, the init weights
    class RewardStage(PairStage): ...                     # its loss, and what a held-out batch sums to
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import PairTrainConfig
from ..data.preferences import EncodedPair, PairBatches, collate, pair_data, val_chunks
from ..model.gpt import GPT
from ..store.checkpoint import resolve_stage, stage_config
from ..store.load import load_model
from ..text.tokenizer import Tokenizer
from .loop import Dist, Stage, all_reduce_sum, setup_dist


def run_tokenizer(run_dir, init_dir: Path) -> Tokenizer:
    """The run's tokenizer; a stage started from another run's weights uses (and copies) that run's.
    (Every stage that starts from another stage reads it here: the pair stages and the RL stages.)"""
    path = Path(run_dir) / "tokenizer.json"
    if not path.exists():
        theirs = init_dir.parent / "tokenizer.json"
        if not theirs.exists():
            raise FileNotFoundError(f"{path}: tokenizer not found (nor {theirs})")
        Tokenizer.load(theirs).save(path)
    return Tokenizer.load(path)


@dataclass
class PairInputs:
    """What a stage trained on comparisons starts from."""
    settings: PairTrainConfig  # the stage's section, its ``data`` defaulting to RUN/comparisons.jsonl
    dist: Dist
    init_dir: Path  # the stage the weights come from
    tok: Tokenizer
    train: list[EncodedPair]
    val: list[EncodedPair]
    skipped: int  # malformed rows skipped (``skip_bad``)
    model: GPT | None  # the init stage's weights (None: the init is a reward model, loaded by its stage)

    def describe(self, name: str, steps: int) -> str:
        """The first line a stage prints: its data and where it starts."""
        return (f"{name}: {len(self.train):,} train pairs, {len(self.val):,} held out"
                + (f", {self.skipped} malformed rows skipped" if self.skipped else "")
                + f"; {steps} steps from {self.init_dir}")


def pair_inputs(run_dir, settings: PairTrainConfig, name: str) -> PairInputs:
    """Everything ``name`` (reward, dpo) reads before it trains; the init weights are checked against
    ``settings.seq_len``."""
    run_dir = Path(run_dir)
    settings = dataclasses.replace(settings, data=settings.data or str(run_dir / "comparisons.jsonl"))
    d = setup_dist(settings.device)
    init_dir = resolve_stage(run_dir, settings.init_from, f"{name}.init_from")
    tok = run_tokenizer(run_dir, init_dir)
    train_pairs, val_pairs, skipped = pair_data(settings, tok)
    if stage_config(init_dir).get("kind") == "reward":
        # a reward model continued on new pairs (the flywheel's rounds, learn.py): its stage loads it whole
        if name != "reward":
            raise ValueError(f"{name}.init_from={settings.init_from!r} is a reward model ({init_dir}); "
                             f"{name} starts from a policy")
        gpt, block = None, stage_config(init_dir)["model"]["block_size"]
    else:
        gpt, _ = load_model(init_dir)
        block = gpt.cfg.block_size
    if settings.seq_len > block:
        raise ValueError(f"{name}.seq_len={settings.seq_len} exceeds the model's block_size={block} ({init_dir})")
    return PairInputs(settings, d, init_dir, tok, train_pairs, val_pairs, skipped, gpt)


def pair_right(margin: torch.Tensor) -> torch.Tensor:
    """Per-pair credit from margins (chosen minus rejected): 1 right, 0 wrong, and a tie half right — so
    a model that scores everything alike sits at exactly 50%."""
    return (margin > 0).double() + 0.5 * (margin == 0).double()


class PairStage(Stage):
    """A stage trained on batches of pairs. A subclass gives ``loss`` and ``val_values`` (each metric
    named in ``val_names``, per pair of a held-out batch); evaluation averages them over the held-out
    pairs of every rank."""

    val_names: tuple[str, ...] = ()

    def __init__(self, inputs: PairInputs, model_config: dict):
        self.settings, self.val, self.pad_id, self.model_config = (inputs.settings, inputs.val, inputs.tok.pad_id,
                                                                   model_config)
        self.seq_len = self.settings.seq_len
        self.batches = PairBatches(inputs.train, self.settings.batch_size, self.settings.seed, self.pad_id)

    def steps(self, world: int) -> int:
        """Optimizer steps: ``steps``, or else ``epochs`` passes over the train pairs."""
        s = self.settings
        return s.steps or math.ceil(s.epochs * self.batches.steps_per_epoch(s.grad_accum, world))

    def micro_batch(self, step, micro, rank, world):
        return self.batches.micro_batch(step, micro, self.settings.grad_accum, rank, world)

    def token_count(self, batch):
        return int(batch["last"].sum()) + len(batch["last"])

    def flops(self, model, batch):
        return model.flops_per_token(batch["idx"].size(1)) * self.token_count(batch)

    def val_values(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """{metric: (B,) its value for each pair of the batch}."""
        raise NotImplementedError

    def evaluate(self, model, d):
        if not self.val:
            return {}
        total = torch.zeros(len(self.val_names) + 1, dtype=torch.float64, device=d.device)  # the metrics' sums, pairs
        for chunk in val_chunks(self.val, self.settings.batch_size, self.settings.eval_batches, d.rank, d.world):
            values = self.val_values(model, {k: v.to(d.device) for k, v in collate(chunk, self.pad_id).items()})
            total += torch.stack([values[k].double().sum() for k in self.val_names]
                                 + [total.new_tensor(float(len(chunk)))])
        total = all_reduce_sum(total)
        pairs = max(1.0, total[-1].item())
        return {k: v / pairs for k, v in zip(self.val_names, total.tolist())}
