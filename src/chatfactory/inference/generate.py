"""Offline batch generation: answers for a JSONL file of prompts, a batch at a time; and ``complete_all``, every
prompt of a list completed by continuous batching (the IFEval pass: a finished row frees its slot at once).

Each batch goes through the engine together, so with streamed layers (``--max-memory``, model/offload.py) a
layer read from disk serves every sequence of the batch (the block schedule) before the next is read.
The answers file is rewritten atomically after each batch, and a rerun skips the prompts it already
answers, so a killed run resumes. A prompt row is ``{"prompt": str}`` or ``{"messages": [... ending in a
user turn]}`` (the run's chat template is applied either way); a bad row is an error naming file:line.

    chatfactory generate --run runs/smol --stage pretrain --prompts p.jsonl --out a.jsonl --batch 64 --max-memory 135MB
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..formats.jsonl import DataError, read_jsonl
from ..model.gpt import GPT
from ..store.checkpoint import latest_stage
from ..store.files import atomic_write_text
from ..store.load import load_model
from ..text.tokenizer import Tokenizer, check_messages
from .batching import BatchOptions, Request, Scheduler, Step
from .engine import Engine
from .sampling import SamplingParams


def _row_problem(row: dict) -> str | None:
    """What is wrong with a prompt row (``{"prompt": str}`` or ``{"messages": [... ending in a user turn]}``),
    or None."""
    if isinstance(row.get("prompt"), str):
        return None
    if "messages" not in row:
        return f"a prompt row needs a string 'prompt' or 'messages' (keys: {', '.join(row) or 'none'})"
    try:
        check_messages(row["messages"], "messages")
    except ValueError as e:
        return str(e)
    last = row["messages"][-1]["role"]
    return None if last == "user" else f"messages must end in a user turn, not {last!r}"


def _prompt_rows(path) -> list[tuple[int, dict]]:
    """(line, row) of a prompts JSONL; a bad row is a DataError naming file:line."""
    rows = list(read_jsonl(path))
    for n, row in rows:
        problem = _row_problem(row)
        if problem:
            raise DataError(f"{path}:{n}: {problem}")
    return rows


def _answered(out) -> tuple[str, set]:
    """The text of an earlier --out and the prompt lines it answers (a rerun skips them)."""
    out = Path(out)
    text = out.read_text(encoding="utf-8") if out.exists() else ""
    done = set()
    for n, line in enumerate(text.splitlines(), 1):
        try:
            done.add(int(json.loads(line)["line"]))
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{out}:{n}: not a row this command wrote; name another --out") from None
    return text, done


def generate(run, prompts, out, stage: str | None = None, batch: int = 64, max_new_tokens: int = 256,
             temperature: float = 0.0, seed: int | None = None, quantize: str | None = None,
             max_memory: int | str | None = None) -> None:
    """``chatfactory generate``: answers for the prompts JSONL ``prompts`` from ``run``'s ``stage`` (default:
    the last trained), ``batch`` prompts at a time (with ``max_memory`` each loaded layer serves the whole
    batch), appended to ``out`` one batch at a time (atomically); a rerun skips the prompts already answered.
    ``quantize`` / ``max_memory`` load the model as ``load_model`` does."""
    if batch < 1 or max_new_tokens < 1:
        raise ValueError(f"--batch {batch} / --max-new-tokens {max_new_tokens}: both must be at least 1")
    rows = _prompt_rows(prompts)
    text, done = _answered(out)
    todo = [(n, r) for n, r in rows if n not in done]
    stage = stage or latest_stage(run)
    tok = Tokenizer.load(Path(run) / "tokenizer.json")
    model, _ = load_model(Path(run) / stage, inference=True, quantize=quantize, max_memory=max_memory)
    if getattr(model, "offload", None):
        print(f"{run}/{stage}: {model.offload.describe()}", file=sys.stderr)
    engine, stop = Engine(model, vocab_limit=tok.vocab_size), set(tok.stop_ids)
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="generate", unit="prompt")
    new_tokens, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for b in range(0, len(todo), batch):
            chunk = todo[b: b + batch]
            ids = []
            for n, r in chunk:
                x = tok.chat_prompt(r.get("messages") or [{"role": "user", "content": r["prompt"]}])
                if len(x) >= model.cfg.block_size:
                    raise DataError(f"{prompts}:{n}: the prompt is {len(x)} tokens, the model's context "
                                    f"{model.cfg.block_size}")
                ids.append(x)
            # the seed goes with the batch's first prompt, so a resumed run draws what an unbroken one would
            params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=1.0,
                                    stop_ids=tok.stop_ids, seed=None if seed is None else seed + chunk[0][0])
            lines = []
            for (n, r), x, new in zip(chunk, ids, engine.generate(ids, params)):
                ended = bool(new) and new[-1] in stop
                answer = new[:-1] if ended else new
                lines.append(json.dumps({"line": n, **r, "answer": tok.decode(answer), "prompt_tokens": len(x),
                                         "completion_tokens": len(answer),
                                         "finish_reason": "stop" if ended else "length"},
                                        ensure_ascii=False) + "\n")
                new_tokens += len(new)
            text += "".join(lines)
            atomic_write_text(out, text)
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t0):.1f}")
    bar.close()
    from ..model.offload import stall_seconds

    stalled = (f", {stall_seconds(model):.2f}s of it waiting for streamed layers" if getattr(model, "offload", None)
               else "")
    print(f"{out}: {len(rows)} answers ({len(todo)} new, {new_tokens} tokens in "
          f"{time.perf_counter() - t0:.2f}s{stalled})")


def complete_all(model: GPT, prompts: list[list[int]], params: SamplingParams, *, slots: int = 32,
                 context: int | None = None, vocab_limit: int | None = None, on_done=None) -> list[list[int]]:
    """Every prompt's completion (its ids, a final stop id left out), by continuous batching in the calling
    thread: ``slots`` rows decode together and a finished row's slot takes the next prompt at the next
    iteration, so a batch never waits for its longest row. ``on_done(i, ids)`` is called as prompt ``i``
    finishes (in finishing order: a caller can save each as it comes). ``context``: positions a slot holds
    (``BatchOptions.context``; None: the model's block)."""
    sched = Scheduler(model, slots=slots, max_waiting=max(1, len(prompts)), start=False, vocab_limit=vocab_limit,
                      options=BatchOptions(context=context or 0))
    out: list[list[int] | None] = [None] * len(prompts)
    errors: list[str] = []  # the scheduler keeps a callback's exception from its loop: raised here instead

    def finisher(i: int, req: Request):
        def emit(step: Step) -> None:
            if step.finish is None:
                return
            if step.finish not in ("stop", "length"):
                errors.append(f"prompt {i}: generation ended with {step.finish}")
                return
            out[i] = req.generated[:-1] if step.finish == "stop" else list(req.generated)
            if on_done is not None:
                try:
                    on_done(i, out[i])
                except Exception as e:
                    errors.append(f"prompt {i}: on_done failed: {type(e).__name__}: {e}")
        return emit

    for i, p in enumerate(prompts):
        req = Request(list(p), params, emit=None)
        req.emit = finisher(i, req)
        sched.submit(req)
    while (sched.waiting or sched.active()) and not errors:
        sched.step()
    if errors:
        raise RuntimeError("; ".join(errors))
    return out
