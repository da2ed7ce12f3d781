"""The one registry of stages: every list of stage names in chatfactory derives from ``STAGES``.

A stage writes ``RUN/<name>/`` (or, for ``comparisons``, a JSONL of pairs) from its config section of the
same name. ``STAGES`` is in pipeline order: ``chatfactory run`` runs them in this order, each one that
``pipeline.stages`` names (``in_run``: named by default). The entry point is a ``"module:function"`` taking
``(cfg, run_dir)`` and returning the stage's result dict, imported only when the stage runs, so this
module imports nothing of the project and anything may import it.

    from chatfactory.stages import STAGES, policies
    [s.name for s in STAGES if s.lora]     # the stages lora.stages may name
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str  # the command, the config section and the run's folder
    kind: str  # what it leaves: "policy" (a chat model), "reward" (a scoring model), "data" (comparison pairs)
    method: str  # how: "pretrain", "sft", "sample" (label samples), "pairs" (reward model), "rft" (SFT on
    # its own best samples), "dpo", "rl"
    level: int  # how far along GPT -> InstructGPT: 0 pretrained, 1 demonstrations, 2 comparisons, 3 RL
    entry: str  # "module:function", called as function(cfg, run_dir) -> result dict
    in_run: bool = True  # `chatfactory run` runs it unless pipeline.stages says otherwise
    lora: bool = True  # it can train LoRA adapters instead of every weight (lora.stages)
    help: str = ""  # the command's one-line help


STAGES = (
    Stage("pretrain", "policy", "pretrain", 0, "chatfactory.train.pretrain:run_pretrain", lora=False,
          help="pretrain a GPT on raw text (next-token prediction); resumes if interrupted"),
    Stage("sft", "policy", "sft", 1, "chatfactory.train.sft:run_sft",
          help="supervised fine-tuning on chat data (sft.data), from sft.init_from; resumes if interrupted"),
    Stage("comparisons", "data", "sample", 2, "chatfactory.data.comparisons:run_comparisons", lora=False,
          help="sample K answers per prompt from the run's policy, label them with comparisons.labeler, "
               "write chosen/rejected pairs (JSONL)"),
    Stage("reward", "reward", "pairs", 2, "chatfactory.train.reward:run_reward",
          help="train the reward model on comparisons (reward.data), from reward.init_from; resumes if "
               "interrupted"),
    Stage("rft", "policy", "rft", 2, "chatfactory.train.rft:run_rft", in_run=False,
          help="rejection-sampling fine-tuning: k answers per RL prompt from rft.init_from, the best kept by the "
               "verifier and the reward model, SFT on them; resumes if interrupted"),
    Stage("ppo", "policy", "rl", 3, "chatfactory.train.ppo:run_ppo",
          help="RLHF: PPO from ppo.init_from against the reward model, KL penalty to SFT; resumes if interrupted"),
    Stage("dpo", "policy", "dpo", 2, "chatfactory.train.dpo:run_dpo",
          help="direct preference optimisation on comparisons (dpo.data), SFT as reference; resumes if "
               "interrupted"),
    # RFT, GRPO and RLOO run with `chatfactory run` only when pipeline.stages names them
    Stage("grpo", "policy", "rl", 3, "chatfactory.train.grpo:run_grpo", in_run=False,
          help="GRPO: K answers per prompt, group-normalised advantages, reward = a scorer module:function or "
               "the reward model; resumes if interrupted"),
    Stage("rloo", "policy", "rl", 3, "chatfactory.train.rloo:run_rloo", in_run=False,
          help="RLOO: K answers per prompt, each against the mean score of the others, reward = a scorer "
               "module:function or the reward model; resumes if interrupted"),
)
BY_NAME = {s.name: s for s in STAGES}


def names(**where) -> tuple[str, ...]:
    """Stage names in pipeline order whose fields equal ``where`` (``names(method="rl")``)."""
    return tuple(s.name for s in STAGES if all(getattr(s, k) == v for k, v in where.items()))


def policies(after: int = -1) -> tuple[str, ...]:
    """The stages that leave a chat model, in pipeline order; ``after``: only those past that level
    (``policies(after=0)``: every trained one; ``after=1``: the aligned ones, compared with SFT)."""
    return tuple(s.name for s in STAGES if s.kind == "policy" and s.level > after)


def most_advanced_first() -> tuple[str, ...]:
    """The policy stages from the furthest along (RL) to pretraining: chat, sample and generate take the
    first one a run has (ties keep pipeline order: ppo before grpo before rloo)."""
    return tuple(sorted(policies(), key=lambda n: -BY_NAME[n].level))


def get(name: str) -> Stage:
    """The stage called ``name``; a ValueError lists the known ones."""
    if name not in BY_NAME:
        raise ValueError(f"unknown stage {name!r} (known: {', '.join(BY_NAME)})")
    return BY_NAME[name]


class NotAvailable(Exception):
    """A stage's module is not part of this checkout."""


def entry_point(name: str):
    """The function that runs stage ``name``; NotAvailable if its module is missing from this checkout."""
    module, _, fn = get(name).entry.partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise NotAvailable(f"{name} not available ({module} is not in this checkout)") from None
        raise
    if not hasattr(mod, fn):
        raise NotAvailable(f"{name} not available ({module} has no {fn})")
    return getattr(mod, fn)
