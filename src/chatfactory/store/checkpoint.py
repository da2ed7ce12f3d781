"""Atomic checkpoints of a stage directory: ``model.safetensors`` + ``config.json`` + ``state.pt``.

Every file is written to ``NAME.tmp``, flushed to disk and renamed over the old one, so a reader never
sees half a file. The three files of one checkpoint are written as temps first and renamed in a fixed
order; each records the save it belongs to (its step and a nonce, ``save_id``). If the process dies
between two renames, the writer's next ``repair_checkpoint`` (the training loop, before it resumes)
finds the complete set of one save and finishes the job; a torn set (a temp cut short, or temps beside
files of another save) is discarded. A run killed at any moment therefore resumes from a consistent
checkpoint. Readers (chat, serve, eval: ``load_model``) never touch the files: the writer may be
renaming them as they read, so they read the last complete checkpoint as it stands.

A write that fails — a full disk above all — removes the partial temps, leaves the previous checkpoint
as it was and raises ``DiskFullError`` / ``CheckpointError`` naming the file (the CLI prints it, no
traceback); running the same command again after freeing space resumes from that checkpoint.

Weights are safetensors; the resume state (optimizer, step, RNG) is loaded with
``torch.load(weights_only=True)`` — nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..stages import most_advanced_first
from .files import (
    CheckpointError,
    RecordingWriter,
    WriteFailed,
    first_line,
    fsync_dir,
    remove_quietly,
    write_file,
)
from .safetensors import SafetensorsFile

MODEL, CONFIG, STATE = "model.safetensors", "config.json", "state.pt"


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


def _save_torch(obj, tmp: Path) -> None:
    with open(tmp, "wb") as f:
        w = RecordingWriter(f)
        try:
            torch.save(obj, w)
        except Exception:
            if w.error is not None:
                raise w.error from None
            raise


def _write_temps(stage_dir: Path, weights: dict, config: dict, state: dict | None, step: int) -> list[Path]:
    """Every file of the checkpoint as ``NAME.tmp``, flushed to disk. Each carries the save's id (the step
    and a nonce): a set of files agrees only when it comes from one save, even where two saves share a
    step (the reward model's calibrated save re-saves its last step). On failure every temp of this save
    is removed (the error names the file) and the previous checkpoint is untouched."""
    save_id = f"{step}-{os.urandom(6).hex()}"
    weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    parts = [(MODEL, "the weights",
              lambda t: save_file(weights, str(t), metadata={"step": str(step), "save_id": save_id})),
             (CONFIG, "the checkpoint config", lambda t: t.write_text(
                 json.dumps({**config, "step": step, "save_id": save_id}, indent=2), encoding="utf-8"))]
    if state is not None:
        parts.append((STATE, "the resume state", lambda t: _save_torch({**state, "step": step, "save_id": save_id}, t)))
    temps = []
    try:
        for name, what, write in parts:
            t = stage_dir / (name + ".tmp")
            write_file(stage_dir / name, t, write, what)
            temps.append(t)
    except BaseException:
        for t in temps:
            remove_quietly(t)
        raise
    return temps


def save_checkpoint(stage_dir, weights: dict, config: dict, state: dict | None = None, step: int = 0) -> None:
    """Write weights (+ model config, + optional resume state) for ``step`` atomically. A failed write (a
    full disk: DiskFullError) removes this save's temps and leaves the previous checkpoint as it was."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    try:
        temps = _write_temps(stage_dir, weights, config, state, step)
    except WriteFailed as e:
        prev = _mark_of(stage_dir / MODEL) if (stage_dir / MODEL).exists() else None
        kept = (f"the previous checkpoint (step {prev[0]}) in {stage_dir} is intact" if prev else
                f"{stage_dir} holds no earlier checkpoint")
        again = ": free some space and run the same command again" + (" to resume from it" if prev else "")
        raise type(e)(e.path, e.tmp, f"{e.what} of the checkpoint of step {step}", e.cause,
                      kept + (again if e.full else "")) from None
    for t in temps:
        os.replace(t, stage_dir / t.name[: -len(".tmp")])
    if state is None and (stage_dir / STATE).exists():
        os.remove(stage_dir / STATE)  # a final export without resume state must not pair with an older one
    fsync_dir(stage_dir)


def _mark_of(path: Path):
    """(step, save id) a checkpoint file records — the save id is None in files written before save ids
    existed — or None if the file is unreadable."""
    try:
        if path.name.startswith(MODEL):
            with SafetensorsFile(path) as f:
                meta = f.metadata
        elif path.name.startswith(CONFIG):
            meta = json.loads(path.read_text(encoding="utf-8"))
        else:
            meta = torch.load(path, map_location="cpu", weights_only=True)
        return int(meta.get("step", -1)), meta.get("save_id")
    except Exception:
        return None


def _agree(paths) -> bool:
    """Whether every file exists, is readable and comes from the same save (same save id; files from
    before save ids: the same step)."""
    marks = {_mark_of(p) if p.exists() else None for p in paths}
    return len(marks) == 1 and None not in marks


def _temps(stage_dir: Path) -> dict:
    return {n: stage_dir / (n + ".tmp") for n in (MODEL, CONFIG, STATE) if (stage_dir / (n + ".tmp")).exists()}


def _candidate(stage_dir: Path, temps: dict) -> tuple[dict, bool]:
    """The checkpoint an interrupted save was writing -> ({name: path}, whether it is complete): the temp
    where one exists, else the already-renamed file; complete when every file is there and all come from
    one save. (A temp beside an older renamed file, e.g. a save killed after writing the weights' temp
    only, is torn — even when both saves are of the same step.)"""
    candidate = {n: temps.get(n, stage_dir / n) for n in (MODEL, CONFIG, STATE)}
    if not candidate[STATE].exists():
        candidate.pop(STATE)
    return candidate, _agree(candidate.values())


def repair_checkpoint(stage_dir) -> None:
    """Finish an interrupted save (all of its files present and agreeing) or discard a torn one. Only the
    writer may do this (the training loop, before it resumes): a reader would race a live writer's
    renames (or delete the temps it is writing). After it, the stage holds a complete checkpoint or, when
    a first save was cut short, none (``has_checkpoint`` is then False)."""
    stage_dir = Path(stage_dir)
    temps = _temps(stage_dir)
    if not temps:
        return
    _, complete = _candidate(stage_dir, temps)
    for n, t in temps.items():
        if complete:
            os.replace(t, stage_dir / n)
        else:
            os.remove(t)
    fsync_dir(stage_dir)



def has_checkpoint(stage_dir) -> bool:
    stage_dir = Path(stage_dir)
    return (stage_dir / MODEL).exists() or (stage_dir / (MODEL + ".tmp")).exists()


def _reader_paths(stage_dir: Path, temps: dict) -> dict:
    """What a reader reads while a save is in progress (or was interrupted), leaving every file as it is:
    the renamed files when they form a checkpoint, else the complete set the writer is renaming."""
    if _agree([stage_dir / MODEL, stage_dir / CONFIG]):
        return {n: stage_dir / n for n in (MODEL, CONFIG, STATE)}
    candidate, complete = _candidate(stage_dir, temps)
    if complete:
        return {STATE: stage_dir / STATE, **candidate}
    raise CheckpointError(f"{stage_dir}: no complete checkpoint to read (a save in progress or interrupted: "
                          f"{', '.join(t.name for t in temps.values())}; the training command that writes this "
                          f"stage finishes or discards it when it resumes)")


class LazyWeights(Mapping):
    """A checkpoint's tensors, each read when taken (``pop`` / ``[]``) through the stage's open
    ``SafetensorsFile`` (``reader``): a loader taking one at a time (the quantized ones) never holds the
    whole file. ``dict(w)`` reads all. Every tensor comes from the file that was opened and checked, even
    when a save renames a new one over it meanwhile: never a mix of two saves."""

    def __init__(self, reader: SafetensorsFile):
        self.reader, self.path, self.names = reader, reader.path, reader.keys()

    def __getitem__(self, key):
        if key not in self.names:
            raise KeyError(key)
        return self.reader.read(key)

    def __iter__(self):
        return iter(list(self.names))

    def __len__(self):
        return len(self.names)

    def pop(self, key):
        t = self[key]
        self.names.remove(key)
        return t

    def clear(self):
        self.names = []


def load_checkpoint(stage_dir, with_state: bool = False, repair: bool = False, lazy: bool = False):
    """-> (weights, config dict, state dict or None). Raises CheckpointError naming the bad file.

    ``repair=True`` is for the writer only (the training loop resuming its own stage): it finishes or
    discards an interrupted save first. Readers leave the writer's temps alone. ``lazy``: the weights are a
    ``LazyWeights``, each tensor read from the file as it is taken."""
    stage_dir = Path(stage_dir)
    if repair:
        repair_checkpoint(stage_dir)
        return _read({n: stage_dir / n for n in (MODEL, CONFIG, STATE)}, with_state)
    for attempt in range(3):
        temps = _temps(stage_dir)
        paths = _reader_paths(stage_dir, temps) if temps else {n: stage_dir / n for n in (MODEL, CONFIG, STATE)}
        try:
            return _read(paths, with_state, lazy)
        except CheckpointError:
            # a live writer renamed a file between our look and our read: look again
            if attempt == 2 or _temps(stage_dir) == temps:
                raise


def _read(paths: dict, with_state: bool, lazy: bool = False):
    mpath, cpath, spath = paths[MODEL], paths[CONFIG], paths[STATE]
    for p in (mpath, cpath):
        if not p.exists():
            raise CheckpointError(f"{p}: checkpoint file is missing")
    reader = SafetensorsFile(mpath)  # a bad header is a CheckpointError naming the file
    weights = LazyWeights(reader) if lazy else None
    try:
        wstep, wid = int(reader.metadata.get("step", -1)), reader.metadata.get("save_id")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{mpath}: corrupt or truncated checkpoint (bad step in its metadata: {e})") from None
    try:
        config = json.loads(cpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:  # OSError: a live writer renamed it away
        raise CheckpointError(f"{cpath}: corrupt or unreadable checkpoint config ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cpath}: corrupt checkpoint config (a JSON {type(config).__name__}, not an object)")
    if wid and config.get("save_id") and config["save_id"] != wid:
        raise CheckpointError(f"{cpath}: belongs to another save (step {config.get('step')}) than {mpath} "
                              f"(step {wstep})")
    if weights is None:
        with reader:
            weights = {k: reader.read(k) for k in reader.keys()}
    state = None
    if with_state and spath.exists():
        try:
            state = torch.load(spath, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, bad pickle opcode, ...
            raise CheckpointError(f"{spath}: corrupt or truncated resume state "
                                  f"({type(e).__name__}: {first_line(e)})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{spath}: corrupt resume state (a {type(state).__name__}, not a dict)")
        if state.get("step") != wstep or (wid and state.get("save_id") and state["save_id"] != wid):
            raise CheckpointError(f"{spath}: resume state is for step {state.get('step')} but {mpath} is step {wstep}"
                                  + (" (another save of the same step)" if state.get("step") == wstep else ""))
    return weights, config, state


def stage_config(stage_dir) -> dict:
    """A stage's config.json as a dict; a damaged one is a CheckpointError that names the file."""
    path = Path(stage_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint config ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: corrupt checkpoint config (a JSON {type(config).__name__}, not an object)")
    return config


def stage_finished(stage_dir) -> bool:
    """Whether a stage has weights and its checkpoint is marked ``finished`` (train/loop.py writes the
    mark last). A stage without weights is not finished; a damaged config.json is an error, never a
    silent "no"."""
    return has_checkpoint(stage_dir) and (Path(stage_dir) / "config.json").exists() \
        and bool(stage_config(stage_dir).get("finished"))


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


def latest_stage(run_dir, candidates=None) -> str:
    """The most advanced stage of a run that has weights (``candidates``: default every policy stage, the
    furthest along first: stages.most_advanced_first)."""
    candidates = candidates or most_advanced_first()
    for s in candidates:
        if has_checkpoint(Path(run_dir) / s):
            return s
    raise CheckpointError(f"{run_dir}: no trained stage found (looked for {', '.join(candidates)})")
