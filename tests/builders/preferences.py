"""The good/bad topics task of the reward-model and DPO tests: the user asks about a topic; an answer says
the topic is "good" or "bad" among filler words. The gold labeler prefers answers containing "good". A tiny
GPT is SFT'd on 50/50 answers through the shared loop (``make_sft_run``), so its samples are half good, half
bad; ``comparison_rows`` writes separable comparisons (chosen good, rejected bad)."""
import random
import shutil
import tempfile
from pathlib import Path

import torch

from chatfactory.config import TrainConfig
from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.text.tokenizer import Tokenizer
from chatfactory.train.loop import Stage, train

TOPICS = ["cats", "dogs", "birds", "fish", "trees", "stars", "boats", "shoes", "lamps", "rivers", "hills", "clocks",
          "bread", "roads", "songs", "coins"]
TRAIN_TOPICS, HELD_OUT_TOPICS = TOPICS[:12], TOPICS[12:]
FILLERS = ["very", "quite", "so", "really", "truly", "rather", "always"]


def gold_score(row: dict, answer: str) -> float:
    """The gold labeler: 1 for an answer that calls its topic good, else 0 (``builders.preferences:gold_score``)."""
    return 1.0 if "good" in answer.split() else 0.0


def prompt_of(topic: str) -> list[dict]:
    return [{"role": "user", "content": f"tell me about {topic}"}]


def answer(rng: random.Random, topic: str, good: bool) -> str:
    words = rng.sample(FILLERS, rng.randint(1, 3))
    return f"{topic} are {' '.join(words)} {'good' if good else 'bad'} ."


def comparison_rows(n: int, topics, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        t = rng.choice(topics)
        rows.append({"prompt": prompt_of(t), "chosen": answer(rng, t, True), "rejected": answer(rng, t, False)})
    return rows


def make_tokenizer(path) -> Tokenizer:
    rng = random.Random(0)
    texts = [f"tell me about {t} " + answer(rng, t, rng.random() < 0.5) for t in TOPICS for _ in range(20)]
    tok = Tokenizer.train(texts, vocab_size=320, min_frequency=2)
    tok.save(path)
    return tok


class TopicsSFT(Stage):
    """Minimal SFT on the chat template (assistant-only loss), for these tests' policies."""
    name = "sft"

    def __init__(self, tok, model_config):
        self.tok, self.model_config = tok, model_config

    def micro_batch(self, step, micro, rank, world):
        rng = random.Random(step)
        rows = []
        for _ in range(16):
            t = rng.choice(TOPICS)
            ids, mask = self.tok.render_chat(prompt_of(t) + [{"role": "assistant",
                                                              "content": answer(rng, t, rng.random() < 0.5)}])
            rows.append((ids, mask))
        T = max(len(i) for i, _ in rows)
        x = torch.full((len(rows), T), self.tok.pad_id)
        y = torch.full((len(rows), T), -100)
        for r, (ids, mask) in enumerate(rows):
            x[r, : len(ids)] = torch.tensor(ids)
            y[r, : len(ids) - 1] = torch.tensor([i if m else -100 for i, m in zip(ids[1:], mask[1:])])
        return x, y

    def loss(self, model, batch):
        return model(batch[0], targets=batch[1])

    def token_count(self, batch):
        return batch[0].numel()


_TRAINED: dict[int, Path] = {}  # steps -> a run trained once in this session, copied for every caller


def make_sft_run(run_dir, steps: int = 150) -> Tokenizer:
    """``run_dir`` holding tokenizer.json and a tiny SFT'd policy in sft/ (trained once per session and
    copied: the training is seeded, so every copy is the run a fresh training would give)."""
    if steps not in _TRAINED:
        import atexit

        template = Path(tempfile.mkdtemp(prefix="topics_sft_"))
        atexit.register(shutil.rmtree, template, True)
        tok = make_tokenizer(template / "tokenizer.json")
        torch.manual_seed(0)
        mcfg = GPTConfig(depth=2, n_embd=64, n_head=2, vocab_size=tok.vocab_size, block_size=64)
        tc = TrainConfig(steps=steps, lr=3e-3, warmup_steps=5, eval_every=0, ckpt_every=0, progress=False,
                         device="cpu")
        train(TopicsSFT(tok, mcfg.to_dict()), GPT(mcfg), tc, template / "sft")
        _TRAINED[steps] = template
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    shutil.copytree(_TRAINED[steps], run_dir, dirs_exist_ok=True)
    return Tokenizer.load(Path(run_dir) / "tokenizer.json")
