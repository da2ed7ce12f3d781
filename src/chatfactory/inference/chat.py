"""Terminal chat with a trained run: streamed replies, multi-turn history, slash commands.

    chatfactory chat --run runs/NAME                      # the last finished stage (ppo > grpo > dpo > sft > pretrain)
    chatfactory chat --run runs/NAME --stage sft --temperature 0.7 --seed 1
    chatfactory chat --run runs/NAME --prompt "Hi!"       # answer once, print only the answer (for scripts)

Inside the chat: ``/clear`` forgets the conversation (the system prompt stays), ``/system TEXT`` sets
the system prompt, ``/temperature T``, ``/history``, ``/help``, ``/quit`` (or Ctrl-D). Ctrl-C stops
a reply, not the program. When the conversation outgrows the model's context the oldest turns are
dropped (the system prompt stays) and the chat says so (``engine.fit_messages``).
"""

from __future__ import annotations

import signal
import sys
from dataclasses import replace
from pathlib import Path

from ..stages import most_advanced_first
from ..store.checkpoint import has_checkpoint, stage_config
from ..store.files import CheckpointError
from ..store.load import load_model
from ..text.tokenizer import TextStream, Tokenizer
from .calculator import CalcRow
from .engine import Engine, fit_messages
from .sampling import SamplingParams

HELP = """commands:
  /clear          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt (empty TEXT removes it)
  /temperature T  sampling temperature (0 = greedy)
  /history        show the conversation the model sees
  /help           this help
  /quit           leave (or Ctrl-D); Ctrl-C stops a reply"""


def last_finished_stage(run_dir) -> str:
    """The most advanced stage whose checkpoint is marked finished (else the most advanced with weights)."""
    with_weights = [s for s in most_advanced_first() if has_checkpoint(Path(run_dir) / s)]
    if not with_weights:
        raise CheckpointError(f"{run_dir}: no trained stage found (looked for {', '.join(most_advanced_first())})")
    for s in with_weights:
        if stage_config(Path(run_dir) / s).get("finished", True):  # a damaged config.json is named, not skipped
            return s
    return with_weights[0]


class ChatSession:
    """A conversation with one model: history, system prompt and sampling settings."""

    def __init__(self, model, tok: Tokenizer, params: SamplingParams, system: str = ""):
        self.engine, self.tok, self.params = Engine(model, vocab_limit=tok.vocab_size), tok, params
        self.block_size = model.cfg.block_size
        self.system = system
        self.history: list[dict] = []
        self.turn = 0
        # generation stops at <|end|> and at any other special token (a role token means the turn is over)
        self.params = replace(params, stop_ids=tok.stop_ids)

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reply(self, text: str, write=None, note=None) -> str:
        """Answer ``text``, streaming decoded pieces to ``write``; the reply joins the history.
        Pieces are whole characters (``TextStream``: half a Chinese character or emoji waits for the
        token that completes it); a reply cut mid-character ends in U+FFFD, as ``Tokenizer.decode``
        shows it. A KeyboardInterrupt stops the reply; what was said so far is kept."""
        conv = self.messages() + [{"role": "user", "content": text}]
        reserve = max(1, min(self.params.max_tokens, self.block_size // 2))  # room left for the answer
        conv, dropped = fit_messages(conv, lambda m: len(self.tok.chat_prompt(m)), self.block_size - reserve)
        if dropped:
            self.history = conv[1:-1] if self.system else conv[:-1]
            if note:
                note(f"[context full: dropped the {dropped} oldest message{'s' * (dropped > 1)}; "
                     "the system prompt stays]")
        p = self.params
        if p.seed is not None:  # reproducible, yet not the same draw every turn
            p = replace(p, seed=p.seed + self.turn)
        decoder = TextStream(self.tok)
        out_ids: list[int] = []
        pieces: list[str] = []
        stops = set(p.stop_ids)
        try:
            # the calculator answers the reply's <calc> calls as it is written (calculator.py): shown as they come
            for step in self.engine.stream([self.tok.chat_prompt(conv)], p, tools=[CalcRow(self.tok)]):
                t = step[0]
                if t is None or t in stops:
                    break
                out_ids.append(t)
                piece = decoder.add(t)
                pieces.append(piece)
                if write and piece:
                    write(piece)
        except KeyboardInterrupt:
            if note:
                note(" [stopped]")
        tail = decoder.finish()
        if write and tail:
            write(tail)
        answer = "".join(pieces) + tail
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        self.turn += 1
        return answer

    def clear(self) -> None:
        self.history, self.turn = [], 0


def _command(session: ChatSession, line: str, out) -> bool:
    """Run a slash command; False means quit."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("/quit", "/exit"):
        return False
    if cmd == "/clear":
        session.clear()
        out("conversation cleared")
    elif cmd == "/system":
        session.system = arg
        out(f"system prompt set: {arg!r}" if arg else "system prompt removed")
    elif cmd == "/temperature":
        try:
            t = float(arg)
            if t < 0:
                raise ValueError
        except ValueError:
            out(f"/temperature needs a number >= 0, got {arg!r}")
            return True
        session.params = replace(session.params, temperature=t)
        out(f"temperature {t:g}")
    elif cmd == "/history":
        msgs = session.messages()
        out("\n".join(f"{m['role']}: {m['content']}" for m in msgs) if msgs else "(empty)")
    elif cmd == "/help":
        out(HELP)
    else:
        out(f"unknown command {cmd!r}; /help lists them")
    return True


def run_chat(run, stage: str | None, params: SamplingParams, prompt: str | None = None, system: str = "",
             quantize: str | None = None, max_memory: int | str | None = None) -> int:
    """The ``chat`` command: talk to ``run``'s ``stage`` (default: the last finished one) in the terminal,
    or answer ``prompt`` once; ``quantize`` / ``max_memory`` load the model as ``load_model`` does."""
    import torch

    with torch.no_grad():  # (not set_grad_enabled: a caller in the same process keeps its own mode)
        stage = stage or last_finished_stage(run)
        model, _ = load_model(Path(run) / stage, inference=True, quantize=quantize, max_memory=max_memory)
        return _chat(model, Tokenizer.load(Path(run) / "tokenizer.json"), f"{run}/{stage}", params, prompt, system)


def _chat(model, tok: Tokenizer, name: str, params: SamplingParams, prompt: str | None, system: str) -> int:
    session = ChatSession(model, tok, params, system or "")
    err = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    if prompt is not None:  # one shot: only the answer on stdout
        answer = session.reply(prompt, note=err)
        sys.stdout.write(answer + "\n")
        return 0

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    # Ctrl-C must stop a reply even when we were started with SIGINT ignored (a background job of a
    # non-interactive shell inherits that, and Python then never raises KeyboardInterrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out = lambda s: print(s, flush=True)  # noqa: E731
    write = lambda s: (sys.stdout.write(s), sys.stdout.flush())  # noqa: E731
    print(f"chatting with {name} ({model.num_params() / 1e6:.1f}M parameters, {model.cfg.block_size}-token "
          f"context). /help for commands, Ctrl-D to leave.", flush=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-C stops a reply; /quit or Ctrl-D leaves)", flush=True)
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not _command(session, line, out):
                return 0
            continue
        write("assistant> ")
        try:
            session.reply(line, write=write, note=lambda s: write(s if s.startswith(" ") else "\n" + s + "\n"))
        except ValueError as e:  # e.g. one message longer than the whole context: say so, keep chatting
            write(f"[{e}]")
        write("\n")
