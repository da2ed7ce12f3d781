"""Atomic checkpoints of a stage directory: ``model.safetensors`` + ``config.json`` + ``state.pt``.

Every file is written to ``NAME.tmp``, flushed to disk and renamed over the old one, so a reader never
sees half a file. The three files of one checkpoint are written as temps first and renamed in a fixed
order; if the process dies between two renames, the writer's next ``load_checkpoint(repair=True)`` (the
training loop resuming) finds the complete set of temps and finishes the job (a torn set is discarded).
A run killed at any moment therefore resumes from a consistent checkpoint. Readers (chat, serve, eval:
``load_model``) never touch the files: the writer may be renaming them as they read, so they read the
last complete checkpoint as it stands.

Weights are safetensors; the resume state (optimizer, step, RNG) is loaded with
``torch.load(weights_only=True)`` — nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

MODEL, CONFIG, STATE = "model.safetensors", "config.json", "state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or inconsistent; the message names it."""


def _fsync_rename(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    _fsync_rename(tmp, path)


def unique_state_dict(model: torch.nn.Module) -> dict:
    """state_dict with tied tensors stored once (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v.detach().contiguous()
    return out


def load_weights(model: torch.nn.Module, sd: dict, where: str = "weights") -> None:
    """Load ``sd`` strictly, except for keys that are tied to a key present in ``sd``."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    ptr = {params[k].data_ptr() for k in sd if k in params}
    missing = [k for k in missing if not (k in params and params[k].data_ptr() in ptr)]
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not fit the model (missing {missing}, unexpected {unexpected})")


def _write_temps(stage_dir: Path, weights: dict, config: dict, state: dict | None, step: int) -> list[Path]:
    temps = []
    t = stage_dir / (MODEL + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(t), metadata={"step": str(step)})
    temps.append(t)
    t = stage_dir / (CONFIG + ".tmp")
    t.write_text(json.dumps({**config, "step": step}, indent=2), encoding="utf-8")
    temps.append(t)
    if state is not None:
        t = stage_dir / (STATE + ".tmp")
        torch.save({**state, "step": step}, t)
        temps.append(t)
    for t in temps:
        with open(t, "rb+") as f:
            os.fsync(f.fileno())
    return temps


def save_checkpoint(stage_dir, weights: dict, config: dict, state: dict | None = None, step: int = 0) -> None:
    """Write weights (+ model config, + optional resume state) for ``step`` atomically."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    for t in _write_temps(stage_dir, weights, config, state, step):
        os.replace(t, stage_dir / t.name[: -len(".tmp")])
    if state is None and (stage_dir / STATE).exists():
        os.remove(stage_dir / STATE)  # a final export without resume state must not pair with an older one


def _step_of(path: Path):
    """The step a checkpoint file records, or None if the file is unreadable."""
    try:
        if path.name.startswith(MODEL):
            with safe_open(str(path), "pt") as f:
                return int((f.metadata() or {}).get("step", -1))
        if path.name.startswith(CONFIG):
            return int(json.loads(path.read_text(encoding="utf-8")).get("step", -1))
        return int(torch.load(path, map_location="cpu", weights_only=True)["step"])
    except Exception:
        return None


def _temps(stage_dir: Path) -> dict:
    return {n: stage_dir / (n + ".tmp") for n in (MODEL, CONFIG, STATE) if (stage_dir / (n + ".tmp")).exists()}


def _candidate(stage_dir: Path, temps: dict) -> tuple[dict, bool]:
    """The checkpoint an interrupted save was writing -> ({name: path}, whether it is complete): the temp
    where one exists, else the already-renamed file; complete when every file is there and agrees on the step."""
    candidate = {n: temps.get(n, stage_dir / n) for n in (MODEL, CONFIG, STATE)}
    if not candidate[STATE].exists():
        candidate.pop(STATE)
    steps = {_step_of(p) for p in candidate.values() if p.exists()}
    return candidate, all(p.exists() for p in candidate.values()) and len(steps) == 1 and None not in steps


def _recover(stage_dir: Path) -> None:
    """Finish an interrupted save (all temps present and agreeing) or discard a torn one. Only the writer
    may do this: a reader would race a live writer's renames (or delete the temps it is writing)."""
    temps = _temps(stage_dir)
    if not temps:
        return
    _, complete = _candidate(stage_dir, temps)
    for n, t in temps.items():
        if complete:
            os.replace(t, stage_dir / n)
        else:
            os.remove(t)


def has_checkpoint(stage_dir) -> bool:
    stage_dir = Path(stage_dir)
    return (stage_dir / MODEL).exists() or (stage_dir / (MODEL + ".tmp")).exists()


def _reader_paths(stage_dir: Path, temps: dict) -> dict:
    """What a reader reads while a save is in progress (or was interrupted), leaving every file as it is:
    the renamed files when they form a checkpoint, else the complete set the writer is renaming."""
    steps = {_step_of(stage_dir / n) for n in (MODEL, CONFIG) if (stage_dir / n).exists()}
    if (stage_dir / MODEL).exists() and (stage_dir / CONFIG).exists() and len(steps) == 1 and None not in steps:
        return {n: stage_dir / n for n in (MODEL, CONFIG, STATE)}
    candidate, complete = _candidate(stage_dir, temps)
    if complete:
        return {STATE: stage_dir / STATE, **candidate}
    raise CheckpointError(f"{stage_dir}: no complete checkpoint to read (a save in progress or interrupted: "
                          f"{', '.join(t.name for t in temps.values())}; the training command that writes this "
                          f"stage finishes or discards it when it resumes)")


def load_checkpoint(stage_dir, with_state: bool = False, repair: bool = False):
    """-> (weights, config dict, state dict or None). Raises CheckpointError naming the bad file.

    ``repair=True`` is for the writer only (the training loop resuming its own stage): it finishes or
    discards an interrupted save first. Readers leave the writer's temps alone."""
    stage_dir = Path(stage_dir)
    if repair:
        _recover(stage_dir)
        return _read({n: stage_dir / n for n in (MODEL, CONFIG, STATE)}, with_state)
    for attempt in range(3):
        temps = _temps(stage_dir)
        paths = _reader_paths(stage_dir, temps) if temps else {n: stage_dir / n for n in (MODEL, CONFIG, STATE)}
        try:
            return _read(paths, with_state)
        except CheckpointError:
            # a live writer renamed a file between our look and our read: look again
            if attempt == 2 or _temps(stage_dir) == temps:
                raise


def _read(paths: dict, with_state: bool):
    mpath, cpath, spath = paths[MODEL], paths[CONFIG], paths[STATE]
    for p in (mpath, cpath):
        if not p.exists():
            raise CheckpointError(f"{p}: checkpoint file is missing")
    try:
        weights = load_file(str(mpath))
        with safe_open(str(mpath), "pt") as f:
            wstep = int((f.metadata() or {}).get("step", -1))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{mpath}: corrupt or truncated checkpoint ({e})") from None
    try:
        config = json.loads(cpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:  # OSError: a live writer renamed it away
        raise CheckpointError(f"{cpath}: corrupt or unreadable checkpoint config ({e})") from None
    state = None
    if with_state and spath.exists():
        try:
            state = torch.load(spath, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, bad pickle opcode, ...
            raise CheckpointError(f"{spath}: corrupt or truncated resume state ({type(e).__name__}: {e})") from None
        if state.get("step") != wstep:
            raise CheckpointError(f"{spath}: resume state is for step {state.get('step')} but {mpath} is step {wstep}")
    return weights, config, state


STAGES = ("pretrain", "sft", "reward", "ppo", "grpo", "dpo")


def resolve_stage(run_dir, spec: str, what: str = "init_from") -> Path:
    """A stage named by a setting (``init_from``, ``ref_from``, ``--stage``, …): a stage directory of this
    run ("sft", "rlhf/round1/ppo", …) when it holds weights, else a path to any stage directory (e.g. an
    imported model). Raises CheckpointError naming the setting when neither holds weights."""
    p = Path(run_dir) / spec  # a stage of this run wins over a same-named folder elsewhere
    if not has_checkpoint(p):
        p = Path(spec).expanduser()
    if not has_checkpoint(p):
        raise CheckpointError(f"{what}={spec!r}: no trained weights in {Path(run_dir) / spec} nor at {p} "
                              f"(train that stage first, or name a stage directory)")
    return p


def latest_stage(run_dir, candidates=("ppo", "grpo", "dpo", "sft", "pretrain")) -> str:
    """The most advanced stage of a run that has weights."""
    for s in candidates:
        if has_checkpoint(Path(run_dir) / s):
            return s
    raise CheckpointError(f"{run_dir}: no trained stage found (looked for {', '.join(candidates)})")


def load_model(stage_dir, device="cpu", merge_lora: bool = True):
    """-> (GPT with the stage's weights, the checkpoint's config.json). A stage trained with LoRA
    adapters (train/lora.py) comes back as a plain GPT with the adapters merged into its weights, or
    with ``merge_lora=False`` as its frozen base with the adapters in place."""
    from .model import GPT, GPTConfig
    from .train.lora import apply_lora, merge_weights

    weights, info, _ = load_checkpoint(stage_dir)
    try:
        cfg = GPTConfig.from_dict(info["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(stage_dir) / CONFIG}: bad model config ({e})") from None
    model = GPT(cfg)
    if info.get("lora") and not merge_lora:
        apply_lora(model, info["lora"], seed=0)  # the init is overwritten by the saved adapters
    else:
        weights = merge_weights(weights, info)
    load_weights(model, weights, str(Path(stage_dir) / MODEL))
    return model.to(device).eval(), info
