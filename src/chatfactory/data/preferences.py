"""Comparisons and prompts: the data of the reward model, DPO and PPO.

Comparisons (JSONL, gzip accepted), any of these formats on any line:

    {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go away."}
    {"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello!", "rejected": "\\n\\nHuman: Hi\\n\\nAssistant: Go away."}
    {"prompt": [...], "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "assistant", ...}]}
    {"chosen": [{"role": "user", ...}, {"role": "assistant", ...}], "rejected": [... the same, another answer]}

The second is Anthropic's HH-RLHF layout, read as it is: both transcripts are split into turns by the
parser SFT uses (data/chat.py: consecutive turns of one speaker merged), the conversation before the
last ``Assistant:`` turn is the prompt and the two last turns are the answers.
The last two are TRL's conversational format, with an explicit prompt or an implicit one (the turns both
conversations share); UltraFeedback-binarized rows (a ``prompt`` string and whole conversations in
``chosen``/``rejected``) read as the latter, their prompt checked against the conversations' shared turns.
Message contents may be OpenAI's lists of text parts (data/chat.py).
Prompts (JSONL) are ``{"messages": [... ending in a user turn], ...any extra keys}``.
A malformed row raises DataError naming ``file:line``.

    pairs = load_comparisons("data/prefs.jsonl")            # -> [Pair(prompt, chosen, rejected, where)]
    pairs, skipped = read_comparisons("hh-rlhf/", skip_bad=True)   # malformed rows skipped and counted
    batches = PairBatches(encode_pairs(tok, pairs, 256), batch_size=8, seed=0, pad_id=tok.pad_id)
    b = batches.micro_batch(step, micro, grad_accum, rank, world)   # a pure function of the step

A batch stacks the B chosen sequences over the B rejected ones (2B rows, right-padded with ``<|pad|>``),
with the index of each row's last real token (where the reward model reads its score) and a mask over
the answer tokens (what DPO sums log-probabilities over).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..formats.jsonl import DataError, read_jsonl
from ..inference.calculator import forced_mask
from ..text.tokenizer import check_messages
from .chat import openai_messages, parse_hh_transcript


@dataclass
class Pair:
    prompt: list[dict]  # messages, ending in a user turn
    chosen: str
    rejected: str
    where: str = ""  # "file:line", for error messages


def _split_hh(text: str, where: str) -> tuple[list[dict], str]:
    """An HH transcript -> (the conversation before its last turn, that last Assistant turn's text). The
    transcript is read as SFT reads it (data/chat.py): consecutive turns of one speaker are merged."""
    msgs = parse_hh_transcript(text, where)
    if msgs[-1]["role"] != "assistant" or len(msgs) < 2 or msgs[-2]["role"] != "user":
        raise DataError(f"{where}: an HH transcript must end in a Human turn followed by an Assistant turn")
    return msgs[:-1], msgs[-1]["content"]


def _checked(messages, where: str) -> list[dict]:
    messages = openai_messages(messages, where)
    try:
        check_messages(messages, where)
    except ValueError as e:
        raise DataError(str(e)) from None
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _conversational(row: dict, where: str) -> Pair:
    """TRL's conversational preference row: ``chosen``/``rejected`` as message lists, each either the answer
    alone (after an explicit ``prompt``) or the whole conversation (its prompt: the turns both share)."""
    chosen, rejected = (_checked(row[k], f"{where}: {k}") for k in ("chosen", "rejected"))
    given = row.get("prompt")
    prompt = None if given is None else _checked([{"role": "user", "content": given}] if isinstance(given, str)
                                                 else given, f"{where}: prompt")
    if prompt is None or chosen[0]["role"] != "assistant":
        # whole conversations: the prompt is the turns they share; a given one must be those turns, or (a string,
        # as UltraFeedback's) the last user turn of them
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        shared = chosen[:n]
        if prompt is not None and prompt != shared and not (isinstance(given, str) and shared[-1:] == prompt):
            raise DataError(f"{where}: 'prompt' is not the turns 'chosen' and 'rejected' share before their answers")
        prompt, chosen, rejected = shared, chosen[n:], rejected[n:]
    if not prompt or prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end in a user turn"
                        + (f", not {prompt[-1]['role']!r}" if prompt else " (the conversations share no turns)"))
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if len(answer) != 1 or answer[0]["role"] != "assistant":
            raise DataError(f"{where}: '{key}' must end the conversation with one assistant answer after the prompt "
                            f"(found {len(answer)} turn(s) after it: {[m['role'] for m in answer]})")
    return Pair(prompt, chosen[0]["content"], rejected[0]["content"], where)


def parse_pair(row: dict, where: str) -> Pair:
    """One comparisons row (any format) -> Pair. Raises DataError naming ``where``."""
    if isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
        return _conversational(row, where)
    for key in ("chosen", "rejected"):
        if not isinstance(row.get(key), str):
            raise DataError(f"{where}: a comparison needs a string '{key}' (keys found: {', '.join(row) or 'none'})")
    if "prompt" in row:
        prompt = row["prompt"]
        if isinstance(prompt, str):  # a bare prompt string is one user turn
            prompt = [{"role": "user", "content": prompt}]
        prompt = _checked(prompt, f"{where}: prompt")
        if prompt[-1]["role"] != "user":
            raise DataError(f"{where}: the prompt must end in a user turn, not {prompt[-1]['role']!r}")
        return Pair(prompt, row["chosen"], row["rejected"], where)
    # HH-RLHF: two full transcripts that share everything but the last assistant turn
    prompt, chosen = _split_hh(row["chosen"], f"{where}: chosen")
    other_prompt, rejected = _split_hh(row["rejected"], f"{where}: rejected")
    if prompt != other_prompt:
        raise DataError(f"{where}: the chosen and rejected transcripts differ before their last Assistant turn")
    return Pair(_checked(prompt, f"{where}: prompt"), chosen, rejected, where)


def _files(spec: str) -> list[Path]:
    """A file, a folder (every .jsonl/.jsonl.gz inside, sorted, recursively), comma-separated."""
    out = []
    for part in (s.strip() for s in spec.split(",")):
        if not part:
            continue
        p = Path(part)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.name.endswith((".jsonl", ".jsonl.gz")))
            if not found:
                raise DataError(f"{p}: folder holds no .jsonl or .jsonl.gz files")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    if not out:
        raise DataError(f"no data files in {spec!r}")
    return out


def read_comparisons(spec: str, skip_bad: bool = False, max_pairs: int = 0) -> tuple[list[Pair], int]:
    """-> (every pair in the files of ``spec``, rows skipped). A bad row raises DataError naming
    file:line, unless ``skip_bad``: then it is skipped and counted."""
    pairs: list[Pair] = []
    skipped = 0
    for path in _files(spec):
        for n, row in read_jsonl(path):
            try:
                pairs.append(parse_pair(row, f"{path}:{n}"))
            except DataError:
                if not skip_bad:
                    raise
                skipped += 1
            if max_pairs and len(pairs) >= max_pairs:
                return pairs, skipped
    return pairs, skipped


def load_comparisons(spec: str, skip_bad: bool = False, max_pairs: int = 0) -> list[Pair]:
    """The pairs of ``spec`` (see ``read_comparisons``)."""
    return read_comparisons(spec, skip_bad, max_pairs)[0]


def load_prompts(spec: str) -> list[dict]:
    """Prompt rows ``{"messages": [... ending in user], ...extra}``; the extra keys are kept (scorers use
    them). Chat rows ending in an assistant turn are an error: a prompt asks for the next answer."""
    rows = []
    for path in _files(spec):
        for n, row in read_jsonl(path):
            where = f"{path}:{n}"
            if "messages" not in row:
                raise DataError(f"{where}: a prompt row needs 'messages' (keys found: {', '.join(row) or 'none'})")
            try:
                check_messages(row["messages"], f"{where}: messages")
            except ValueError as e:
                raise DataError(str(e)) from None
            if row["messages"][-1]["role"] != "user":
                raise DataError(f"{where}: a prompt must end in a user turn, not {row['messages'][-1]['role']!r}")
            rows.append(row)
    return rows


def write_comparisons(path, pairs: list[dict]) -> None:
    """Write rows in the comparisons format atomically (a crash never leaves half a file)."""
    import json

    from ..store.files import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))


# ---------------------------------------------------------------- tokens and batches
@dataclass
class EncodedPair:
    chosen: list[int]  # chat_prompt ids (ending in <|assistant|>) + answer ids + <|end|>
    rejected: list[int]
    chosen_start: int  # where the answer begins in each row
    rejected_start: int
    # positions of each row's answer that a tool wrote (a calculator's results): no log-prob of the policy's
    forced: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())


def fit(prompt: list[int], answer: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Cut prompt+answer to ``max_len`` tokens: the prompt loses its oldest tokens first (the end of the
    conversation matters most), keeping at least a quarter of the window; then the answer is cut at its
    end (its <|end|> is lost: the model sees an unfinished answer, as it would be)."""
    if len(prompt) + len(answer) <= max_len:
        return prompt, answer
    keep_p = min(len(prompt), max(max_len - len(answer), max_len // 4))
    return prompt[len(prompt) - keep_p:], answer[: max_len - keep_p]


def encode_pairs(tok, pairs: list[Pair], max_len: int) -> list[EncodedPair]:
    """Tokenize with the chat template: prompt + answer + <|end|>, cut to ``max_len`` by ``fit``."""
    prompts = [tok.chat_prompt(p.prompt) for p in pairs]
    answers = tok.encode_batch([p.chosen for p in pairs] + [p.rejected for p in pairs])
    out = []
    for i, prompt in enumerate(prompts):
        prompt_c, c = fit(prompt, answers[i] + [tok.end_id], max_len)
        prompt_r, r = fit(prompt, answers[len(pairs) + i] + [tok.end_id], max_len)
        forced = tuple(tuple(len(p) + j for j, f in enumerate(forced_mask(tok, a)) if f)
                       for p, a in ((prompt_c, c), (prompt_r, r)))
        out.append(EncodedPair(prompt_c + c, prompt_r + r, len(prompt_c), len(prompt_r), forced))
    return out


def collate(pairs: list[EncodedPair], pad_id: int) -> dict:
    """-> {"idx": (2B, T) chosen rows then rejected rows, right-padded; "last": (2B,) index of each row's
    last real token; "answer_mask": (2B, T) True where a token belongs to the answer and no tool wrote it}."""
    rows = [(p.chosen, p.chosen_start, p.forced[0]) for p in pairs] + \
        [(p.rejected, p.rejected_start, p.forced[1]) for p in pairs]
    T = max(len(r) for r, _, _ in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, (r, s, forced) in enumerate(rows):
        idx[i, : len(r)] = torch.tensor(r)
        mask[i, s: len(r)] = True
        mask[i, list(forced)] = False  # a tool's output is not the policy's to score
    last = torch.tensor([len(r) - 1 for r, _, _ in rows])
    return {"idx": idx, "last": last, "answer_mask": mask}


class PairBatches:
    """Batches of pairs as a pure function of (step, micro, rank): pair k of the run is
    ``perm(epoch)[k % n]`` with a permutation drawn from (seed, epoch), so resume is exact; a global batch
    of ``batch_size * world`` pairs per micro-step is split into contiguous rank slices (DDP)."""

    def __init__(self, pairs: list[EncodedPair], batch_size: int, seed: int, pad_id: int):
        if not pairs:
            raise DataError("no comparison pairs to train on")
        self.pairs, self.B, self.seed, self.pad_id = pairs, batch_size, seed, pad_id
        self._perm_epoch, self._perm = -1, None

    def index(self, k: int) -> int:
        """Which pair is the run's k-th (counting across steps, micro-batches and ranks)."""
        epoch, j = divmod(k, len(self.pairs))
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm_epoch, self._perm = epoch, torch.randperm(len(self.pairs), generator=g)
        return int(self._perm[j])

    def micro_batch(self, step: int, micro: int, grad_accum: int, rank: int = 0, world: int = 1) -> dict:
        first = ((step * grad_accum + micro) * world + rank) * self.B
        return collate([self.pairs[self.index(k)] for k in range(first, first + self.B)], self.pad_id)

    def steps_per_epoch(self, grad_accum: int, world: int) -> int:
        return max(1, -(-len(self.pairs) // (self.B * grad_accum * world)))


def split_pairs(pairs: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle, then the last ``val_fraction`` held out (at least one pair when there are two)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pairs), generator=g).tolist()
    n_val = int(round(len(pairs) * val_fraction))
    if val_fraction > 0 and len(pairs) >= 2:
        n_val = max(1, n_val)
    train = [pairs[i] for i in order[: len(pairs) - n_val]]
    val = [pairs[i] for i in order[len(pairs) - n_val:]]
    return train, val


def pair_data(section, tok) -> tuple[list[EncodedPair], list[EncodedPair], int]:
    """The train and held-out pairs a ``PairTrainConfig`` section (reward, dpo) names, tokenized.
    -> (train, val, rows skipped as malformed)."""
    pairs, skipped = read_comparisons(section.data, section.skip_bad)
    if section.max_pairs and len(pairs) > section.max_pairs:
        # a seeded random subset, not the head of the file: files hold a prompt's pairs together, so
        # the head would cover only the first few prompts
        pairs = split_pairs(pairs, 1 - section.max_pairs / len(pairs), section.seed)[0]
    if section.val_data:
        val, more = read_comparisons(section.val_data, section.skip_bad)
        # a seeded shuffle, so an evaluation capped at eval_batches still spans every prompt
        val = split_pairs(val, 0.0, section.seed)[0]
        train, skipped = pairs, skipped + more
    else:
        train, val = split_pairs(pairs, section.val_fraction, section.seed)
    if not train:
        raise DataError(f"{section.data}: no comparison pairs left to train on")
    return encode_pairs(tok, train, section.seq_len), encode_pairs(tok, val, section.seq_len), skipped


def val_chunks(val: list[EncodedPair], batch_size: int, max_batches: int, rank: int, world: int):
    """This rank's share of the held-out pairs, in batches: global batches of ``batch_size * world``
    pairs, at most ``max_batches`` of them (0: all), each split into contiguous rank slices."""
    n = len(val) if not max_batches else min(len(val), max_batches * batch_size * world)
    for start in range(0, n, batch_size * world):
        mine = val[min(n, start + rank * batch_size): min(n, start + (rank + 1) * batch_size)]
        if mine:
            yield mine
