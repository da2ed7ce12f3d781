"""Typed configuration: dataclasses, YAML presets and ``key=value`` overrides — one source of truth.

A run's config has one section per concern (``model``, ``tokenizer``, ``data``, ``pretrain``).
Presets live in ``configs/NAME.yaml``; every key must exist in the dataclasses, so a typo is an
error that names it instead of a setting that silently does nothing.

    cfg = load_config("tiny", ["pretrain.steps=50", "model.depth=2"])
    save_config(cfg, "runs/x/config.yaml")
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .model import GPTConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


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


@dataclass
class Config:
    model: GPTConfig = field(default_factory=GPTConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)

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


def save_config(cfg: Config, path) -> None:
    from .checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
