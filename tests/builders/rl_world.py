"""The tiny RL world of the PPO, GRPO, RLOO, LoRA and loss-aggregation tests (and bench/rl_gpu_check.py):
an SFT policy that answers one of four colors uniformly when asked to "Pick a color for the <thing>.", and
the gold rule "the answer says blue" (so the SFT policy scores about 1/4); helpers that run one RL
iteration's pieces the way train/rl.py's ``train_rl`` does."""
import atexit
import json
import shutil
import tempfile
from pathlib import Path

import torch

from chatfactory.config import Config, PPOConfig, RewardConfig, SFTConfig
from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.store.checkpoint import save_checkpoint, unique_state_dict
from chatfactory.text.tokenizer import Tokenizer
from chatfactory.train.experience import IterationLog
from chatfactory.train.rollout import forward_answers

COLORS = ["red", "blue", "green", "pink"]
THINGS = ["car", "house", "door", "kite", "boat", "shirt", "cup", "bike", "lamp", "chair", "hat", "bag", "box",
          "pen", "rug", "sofa", "fence", "bowl", "sock", "tent", "wall", "ball", "coat", "desk"]
GOLD = "def score(row, answer):\n    return float('blue' in answer)\n"

_TEMPLATE: dict[int, Path] = {}


def build_world(root, sft_steps=120):
    """ROOT/run with tokenizer.json, pretrain/ (random init), sft/ (answers one of COLORS uniformly);
    ROOT/prompts.jsonl (train things), heldout.jsonl (other things), rl_gold.py (the gold scorer).
    Built once per test session and copied. -> (run, tokenizer)."""
    root = Path(root)
    if sft_steps not in _TEMPLATE:
        template = Path(tempfile.mkdtemp(prefix="rl_world_"))
        atexit.register(shutil.rmtree, template, True)
        _build_world(template, sft_steps)
        _TEMPLATE[sft_steps] = template
    shutil.copytree(_TEMPLATE[sft_steps], root, dirs_exist_ok=True)
    return root / "run", Tokenizer.load(root / "run" / "tokenizer.json")


def ask(thing):
    return [{"role": "user", "content": f"Pick a color for the {thing}."}]


def _build_world(root, sft_steps):
    from chatfactory.train.sft import run_sft

    run = root / "run"
    run.mkdir(parents=True)
    train_things, held_things = THINGS[:16], THINGS[16:]
    texts = [f"Pick a color for the {t}. {c}" for t in THINGS for c in COLORS] * 4
    tok = Tokenizer.train(texts, vocab_size=320, min_frequency=1)
    tok.save(run / "tokenizer.json")
    torch.manual_seed(0)
    mcfg = GPTConfig(depth=1, n_embd=64, head_dim=32, vocab_size=tok.vocab_size, block_size=48)
    save_checkpoint(run / "pretrain", unique_state_dict(GPT(mcfg)), {"stage": "pretrain", "model": mcfg.to_dict()},
                    None, 0)
    with open(root / "sft.jsonl", "w") as f:
        for t in train_things:
            for c in COLORS:
                f.write(json.dumps({"messages": ask(t) + [{"role": "assistant", "content": c}]}) + "\n")
    for name, things in (("prompts", train_things), ("heldout", held_things)):
        with open(root / f"{name}.jsonl", "w") as f:
            for t in things:
                f.write(json.dumps({"messages": ask(t), "thing": t}) + "\n")
    (root / "rl_gold.py").write_text(GOLD)
    cfg = Config()
    cfg.sft = SFTConfig(data=str(root / "sft.jsonl"), steps=sft_steps, batch_size=8, seq_len=32, lr=1e-2,
                        warmup_steps=5, eval_every=0, ckpt_every=0, val_fraction=0.0, progress=False, device="cpu")
    run_sft(cfg, run)


def gold(row, answer):
    return float("blue" in answer)


def train_reward_model(root, run, tok):
    """A reward model learned from comparisons of SFT-style answers labeled by the gold rule."""
    from chatfactory.train.reward import run_reward

    with open(root / "pairs.jsonl", "w") as f:
        for t in THINGS[:16]:
            for other in ("red", "green", "pink"):
                for _ in range(2):
                    f.write(json.dumps({"prompt": ask(t), "chosen": "blue", "rejected": other}) + "\n")
    cfg = Config()
    cfg.reward = RewardConfig(data=str(root / "pairs.jsonl"), steps=20, batch_size=16, seq_len=32, lr=3e-3,
                              warmup_steps=2, eval_every=0, ckpt_every=0, val_fraction=0.1, progress=False,
                              device="cpu")
    return run_reward(cfg, run)


def ppo_config(root, **kw):
    """A Config whose ppo section trains on ROOT/prompts.jsonl at the world's size; ``kw`` overrides."""
    base = dict(prompts=str(Path(root) / "prompts.jsonl"), steps=12, rollout_batch=16, max_new_tokens=6, lr=3e-4,
                no_end_penalty=5.0, ppo_epochs=2, minibatches=2, kl_coef=0.1, eval_every=0, ckpt_every=5,
                progress=False, device="cpu", seed=3)
    base.update(kw)
    cfg = Config()
    cfg.ppo = PPOConfig(**base)
    return cfg


def collect(stage, it=0, rank=0, world=1):
    """Iteration ``it``'s experience as train/rl.py's ``train_rl`` makes it (sample, score, advantages)
    -> (the experience, the iteration's log)."""
    log = IterationLog()
    exp, rows = stage.rollouts.sample(it, rank, world)
    stage.rollouts.score(exp, rows, log)
    exp.update(stage.algo.advantages(exp, log))
    return exp, log


def first_micro_batch(stage, rank=0, world=1):
    """-> (iteration 0's first micro-batch, its experience, its log): what the first update trains on."""
    exp, log = collect(stage, 0, rank, world)
    return next(next(stage.rollouts.minibatches(exp, 0, rank, world, stage.ptx))), exp, log


@torch.no_grad()
def policy_kl(policy, ref, tok, rows, n_new=6, seed=0) -> float:
    """Mean over the policy's sampled answers of the summed exact per-token KL(policy || ref)
    (the full distributions at each answer position: far less noisy than single-sample estimates)."""
    from chatfactory.train.rollout import rollout

    batch = rollout(policy, [tok.chat_prompt(r["messages"]) for r in rows], n_new, 1.0, tok.end_id, tok.pad_id, seed)
    lp = torch.log_softmax(forward_answers(policy, batch), -1)
    lq = torch.log_softmax(forward_answers(ref, batch), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1) * batch["answer_mask"]
    return kl.sum(1).mean().item()
