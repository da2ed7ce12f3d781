"""RL iteration speed: our GRPO against TRL's GRPOTrainer, same process, same settings; and our PPO
iteration split into rollout, scoring and updates.

Both GRPOs start from the same weights (ours, exported to the Hugging Face Llama layout with formats/hf.py)
and the same tokenizer (ours, wrapped as a PreTrainedTokenizerFast with our chat template), see the
same chat prompts, sample ``--prompts x --samples`` answers of at most ``--answer`` tokens per
iteration at temperature 1, score them with the same function, keep a KL term with the same beta to a
frozen reference, and take one optimizer step. A random-init model rarely emits <|end|>, so answers
run to the length limit in both (the mean lengths are printed). Seconds per iteration are the median
over ``--iters`` iterations after the first (warm-up) of each of ``--rounds`` alternating runs.

The work is the same; how it is done differs. Ours prefills each prompt once for its group of samples
and runs it once per group in the reference and policy forwards (train/rollout.py), samples by inverse
CDF (sampling.sample_probs), skips the last answer column in every forward, and decodes its rollouts
with the compiled step of inference/decode_step.py (``compile_rollout=true``: a one-off compile in the first
iteration, which the median leaves out like TRL's first; both first iterations are printed, and so is
ours with the default eager step); TRL runs every prompt+answer row whole and samples with
torch.multinomial. Our PPO iteration also decodes with the compiled step.

    .venv/bin/python bench/ppo_speed.py [--layers 2 --width 128 --vocab 512 --prompts 8 --samples 4 --answer 32 \
--iters 8 --rounds 3]
    .venv/bin/python bench/ppo_speed.py --quick     # smoke test (tests/test_benches.py): tiny sizes, 1 round

Last line: ``RESULT ours_s=… trl_s=… ratio=… ppo_s=… eager_s=… eager_ratio=… iters=… trl_iters=…``
(ratio = trl_s / ours_s; > 1 means ours is faster; eager_*: ours with the default eager rollout; iters and
trl_iters: the timed iterations of our GRPO and of TRL's).
Run it alone: on a 2-core machine anything else running is noise.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from chatfactory.config import Config, GRPOConfig, PPOConfig
from chatfactory.formats.hf import export_run
from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.store.checkpoint import save_checkpoint, unique_state_dict
from chatfactory.text.tokenizer import Tokenizer

SCORER = '''
def score(row, answer):
    """Fraction of the letter e: cheap, so the bench times the RL machinery, not the judge."""
    return answer.count("e") / max(1, len(answer))


def trl_reward(prompts, completions, **kw):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [score(None, t) for t in texts]
'''
WORDS = "the a cat dog sees runs red blue tree house small big river stone light under over near far".split()
# --quick: a one-layer model, 2 prompts x 2 answers of 4 tokens, one timed iteration, one round
QUICK = dict(layers=1, width=64, vocab=300, prompts=2, samples=2, answer=4, iters=1, rounds=1)


def setup(root: Path, a):
    """A run directory with tokenizer.json, sft/ (random init), reward/ (a reward model), prompts.jsonl."""
    g = torch.Generator().manual_seed(0)

    def pick(n):
        return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n,), generator=g).tolist())

    texts = [pick(12) for _ in range(2000)]
    tok = Tokenizer.train(texts, vocab_size=a.vocab, min_frequency=1)
    run = root / "run"
    run.mkdir()
    tok.save(run / "tokenizer.json")
    torch.manual_seed(0)
    cfg = GPTConfig(flavour="modern", depth=a.layers, n_embd=a.width, head_dim=32, vocab_size=tok.vocab_size,
                    block_size=128)
    model = GPT(cfg)
    save_checkpoint(run / "sft", unique_state_dict(model), {"stage": "sft", "model": cfg.to_dict()}, None, 0)
    from chatfactory.train.reward import RewardModel

    rm = RewardModel(GPT(cfg))
    save_checkpoint(run / "reward", unique_state_dict(rm),
                    {"stage": "reward", "kind": "reward", "model": cfg.to_dict()}, None, 0)
    rows = [{"messages": [{"role": "user", "content": f"Tell me about the {pick(3)}."}]} for _ in range(64)]
    with open(root / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (root / "bench_scorer.py").write_text(SCORER)
    sys.path.insert(0, str(root))
    return run, tok, rows, model.num_params()


def iteration_times(stage_dir: Path, updates: int) -> tuple[list[float], list[dict]]:
    """Per-iteration seconds from the loop's metrics (sum of the optimizer steps' times) + the
    per-iteration rows (answer length, rollout/score times)."""
    rows = [json.loads(line) for line in open(stage_dir / "metrics.jsonl")]
    elapsed = [r["elapsed"] for r in rows if "elapsed" in r]
    per_step = [b - a for a, b in zip([0.0] + elapsed, elapsed)]
    iters = [sum(per_step[i:i + updates]) for i in range(0, len(per_step), updates)]
    return iters, [r for r in rows if "iteration" in r]


def bench_ours_grpo(run: Path, root: Path, a, compile_rollout: bool) -> tuple[list[float], float, dict]:
    import shutil

    from chatfactory.train.grpo import run_grpo

    shutil.rmtree(run / "grpo", ignore_errors=True)

    cfg = Config()
    cfg.grpo = GRPOConfig(prompts=str(root / "prompts.jsonl"), reward="bench_scorer:score", steps=a.iters + 1,
                          rollout_batch=a.prompts, group_size=a.samples, max_new_tokens=a.answer, temperature=1.0,
                          kl_coef=a.kl, lr=1e-6, ppo_epochs=1, minibatches=1, ckpt_every=0, eval_every=0,
                          progress=False, device="cpu", no_end_penalty=0.0, compile_rollout=compile_rollout)
    run_grpo(cfg, run)
    iters, rows = iteration_times(run / "grpo", 1)
    split = {k: [r[k] for r in rows[1:]] for k in ("t_rollout", "t_score")}
    split["warmup"] = [iters[0]]
    return iters[1:], statistics.mean(r["answer_len"] for r in rows[1:]), split


def bench_ours_ppo(run: Path, root: Path, a) -> dict:
    from chatfactory.train.ppo import run_ppo

    cfg = Config()
    cfg.ppo = PPOConfig(prompts=str(root / "prompts.jsonl"), reward="reward", steps=a.iters + 1,
                        rollout_batch=a.prompts * a.samples, max_new_tokens=a.answer, temperature=1.0, kl_coef=a.kl,
                        lr=1e-6, ppo_epochs=a.ppo_epochs, minibatches=a.minibatches, ckpt_every=0, eval_every=0,
                        progress=False, device="cpu", no_end_penalty=0.0, compile_rollout=True)
    run_ppo(cfg, run)
    u = a.ppo_epochs * a.minibatches
    iters, rows = iteration_times(run / "ppo", u)
    total = statistics.median(iters[1:])
    roll = statistics.median(r["t_rollout"] for r in rows[1:])
    score = statistics.median(r["t_score"] for r in rows[1:])
    return {"total": total, "rollout": roll, "score": score, "updates": total - roll - score}


def bench_trl(run: Path, root: Path, a) -> tuple[list[float], float]:
    import bench_scorer
    import datasets
    import transformers
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    hf_dir = export_run(run, "sft", root / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    prompts = [json.loads(line) for line in open(root / "prompts.jsonl")]
    ds = datasets.Dataset.from_list([{"prompt": r["messages"]} for r in prompts])
    args = TRLConfig(output_dir=str(root / "trl"), per_device_train_batch_size=a.prompts * a.samples,
                     num_generations=a.samples, max_completion_length=a.answer, temperature=1.0, beta=a.kl,
                     learning_rate=1e-6, max_steps=a.iters + 1, num_iterations=1, gradient_accumulation_steps=1,
                     use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1,
                     disable_dropout=True, dataloader_num_workers=0, seed=0)
    times, lengths = [], []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.t)

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    trainer = GRPOTrainer(model=model, reward_funcs=bench_scorer.trl_reward, args=args, train_dataset=ds,
                          processing_class=tok, callbacks=[Clock()])
    trainer.train()
    return times, statistics.mean(lengths[1:]) if len(lengths) > 1 else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per iteration")
    ap.add_argument("--samples", type=int, default=4, help="answers per prompt (GRPO's group)")
    ap.add_argument("--answer", type=int, default=32, help="max answer tokens")
    ap.add_argument("--kl", type=float, default=0.04, help="KL coefficient (both keep a frozen reference)")
    ap.add_argument("--iters", type=int, default=8, help="timed iterations (after one warm-up)")
    ap.add_argument("--ppo-epochs", type=int, default=1)
    ap.add_argument("--minibatches", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="alternate ours / TRL this many times (load drift hits both)")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, seconds (the same code)")
    a = ap.parse_args()
    if a.quick:  # the quick sizes are defaults: an option on the command line still wins
        ap.set_defaults(**QUICK)
        a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run, tok, rows, n_params = setup(root, a)
        print(f"model: depth {a.layers}, width {a.width}, vocab {tok.vocab_size}, {n_params / 1e6:.2f}M parameters; "
              f"{a.prompts} prompts x {a.samples} answers of <= {a.answer} tokens per iteration; beta {a.kl}; "
              f"torch threads {torch.get_num_threads()}")
        ours_t, eager_t, trl_t, trl_warm = [], [], [], []
        split = {"t_rollout": [], "t_score": [], "warmup": []}
        eager_split = {"t_rollout": [], "warmup": []}
        for _ in range(a.rounds):
            t, ours_len, sp = bench_ours_grpo(run, root, a, compile_rollout=True)
            ours_t += t
            for k in split:
                split[k] += sp[k]
            t, _, sp = bench_ours_grpo(run, root, a, compile_rollout=False)
            eager_t += t
            for k in eager_split:
                eager_split[k] += sp[k]
            t, trl_len = bench_trl(run, root, a)
            trl_t += t[1:]
            trl_warm.append(t[0])
        ppo = bench_ours_ppo(run, root, a)
    ours, eager, trl = statistics.median(ours_t), statistics.median(eager_t), statistics.median(trl_t)
    warm = max(split.pop("warmup"))
    eager_warm = max(eager_split.pop("warmup"))
    split = {k: statistics.median(v) for k, v in split.items()}
    print(f"GRPO iteration   ours {ours:.3f} s (mean answer {ours_len:.1f} tokens; rollout {split['t_rollout']:.3f} s, "
          f"reference {split['t_score']:.3f} s, update the rest)   TRL GRPOTrainer {trl:.3f} s "
          f"(mean answer {trl_len:.1f} tokens)   ours is {trl / ours:.2f}x faster")
    print(f"  ours decodes rollouts with the compiled step (grpo.compile_rollout=true); its first iteration, "
          f"compile included, took up to {warm:.1f} s (TRL's first: up to {max(trl_warm):.1f} s). With the eager "
          f"step (the default): {eager:.3f} s per iteration, "
          f"rollout {statistics.median(eager_split['t_rollout']):.3f} s "
          f"(first iteration up to {eager_warm:.1f} s), {trl / eager:.2f}x TRL")
    print(f"PPO iteration    {ppo['total']:.3f} s = rollout {ppo['rollout']:.3f} s "
          f"({ppo['rollout'] / ppo['total']:.0%}) + scoring (policy, reference, critic, reward model) "
          f"{ppo['score']:.3f} s ({ppo['score'] / ppo['total']:.0%}) "
          f"+ updates ({a.ppo_epochs} epochs x {a.minibatches} minibatches) {ppo['updates']:.3f} s "
          f"({ppo['updates'] / ppo['total']:.0%})")
    print(f"RESULT ours_s={ours:.4f} trl_s={trl:.4f} ratio={trl / ours:.2f} ppo_s={ppo['total']:.4f} "
          f"eager_s={eager:.4f} eager_ratio={trl / eager:.2f} iters={len(ours_t)} "
          f"trl_iters={len(trl_t)}")

if __name__ == "__main__":
    main()
