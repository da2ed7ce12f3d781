"""Streamed (offloaded) layers, the block schedule and ``chatfactory generate`` (model/offload.py,
store/streamed.py, cli.py).

What a streamed model must compute, and how exactly (each claim holds on any host, since both sides of a
comparison run in one process on one CPU):
- bitwise the resident model's logits wherever it runs the same modules on the same shapes: resident or
  streamed blocks (the same bits, fetched later), the embedding read by row (a copy), for fp32, int8, int4
  and LoRA stages alike: the same kernels on the same operands give the same bits;
- where the operations differ -- the LM head streamed in chunks of the vocabulary, a batch run through a
  layer in micro-batches while the head sees the whole batch -- what reaches the head is still bitwise the
  resident model's, and the logits agree within the fp32 round-off bound of the head's dot products
  (``head_roundoff``): which BLAS kernel sums a chunk's products, and in what order, depends on the shape
  and on the CPU, so bitwise equality there would hold on some hosts only.
The streamed path keeps the checkpoint's rules (the last complete save, save ids, a damaged file named), and
its peak resident memory stays under the budget plus a stated overhead."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from chatfactory import cli
from chatfactory.inference.engine import Engine
from chatfactory.inference.kv_cache import KVCache
from chatfactory.inference.sampling import SamplingParams
from chatfactory.model import quant
from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.model.offload import StreamedHead, memory_mode, parse_size
from chatfactory.store import load
from chatfactory.store.checkpoint import save_checkpoint, unique_state_dict
from chatfactory.store.files import CheckpointError
from chatfactory.store.load import load_model
from chatfactory.store.safetensors import SafetensorsFile
from conftest import make_run, serve_subprocess


def load_streamed(stage, budget, **kw):
    """A stage loaded with ``budget`` bytes of weights (``chatfactory … --max-memory``)."""
    return load_model(stage, inference=True, max_memory=budget, **kw)


def save_stage(path, cfg: GPTConfig, seed: int = 0, extra: dict | None = None) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    save_checkpoint(path, {**unique_state_dict(model), **(extra or {})}, {"model": cfg.to_dict()})
    return model


CFG = dict(depth=6, n_embd=128, head_dim=32, n_kv_head=2, vocab_size=1000, block_size=64)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]  # unequal: left padding and masks


def decode_logits(model, prompts=PROMPTS, steps: int = 4) -> list[torch.Tensor]:
    """The prefill's logits, then each decode step's (greedy), through the model's own KV cache."""
    with torch.no_grad():
        L = max(map(len, prompts))
        idx = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
        cache = KVCache.for_model(model, len(prompts), L + steps)
        pos = torch.tensor([[max(0, i - (L - len(p))) for i in range(L)] for p in prompts])
        valid = pos.new_tensor([[i >= L - len(p) for i in range(L)] for p in prompts], dtype=torch.bool)
        mask = (torch.ones(L, L, dtype=torch.bool).tril()[None] & valid[:, None]) | torch.eye(L, dtype=torch.bool)[None]
        out = [model(idx, cache=cache, positions=pos, attn_mask=mask[:, None])]
        keys = torch.cat([valid, torch.ones(len(prompts), steps, dtype=torch.bool)], 1)[:, None, None]
        for _ in range(steps):
            pos = pos[:, -1:] + 1
            nxt = out[-1][:, -1].argmax(-1, keepdim=True)
            out.append(model(nxt, cache=cache, positions=pos, attn_mask=keys[..., : cache.length + 1]))
        return out


def assert_same(streamed, full):
    """Bitwise (any host): the same modules on the same shapes, so the same kernels on the same operands."""
    a, b = decode_logits(streamed), decode_logits(full)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "streamed logits differ from the resident model's"
    p = SamplingParams(max_tokens=10, temperature=0.9, seed=3)
    la, lb = [], []
    assert Engine(streamed).generate(PROMPTS, p, la) == Engine(full).generate(PROMPTS, p, lb)
    assert all(torch.equal(torch.tensor(x), torch.tensor(y)) for x, y in zip(la, lb))


U = 2.0 ** -24  # fp32's unit round-off


def head_roundoff(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """How far apart two fp32 computations of the logits ``h @ w.T`` may lie, elementwise.

    Each logit is a dot product of length K (the width). Computed in fp32 with its products summed in any
    order -- one pass, blocked, pairwise, with or without fused multiply-adds, which is all a BLAS kernel
    chooses among -- it is within gamma_K * sum_k |h_k w_k| of the exact value, gamma_K = K u / (1 - K u),
    u = 2^-24 (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 3.5 and section 3.1).
    Two such computations of the same dot product are within twice that of each other. For this file's models
    (K = 128, logits ~1) that is ~1e-5 of sum |h_k w_k|, while a wrong weight row or a skipped layer moves a
    logit by ~0.1 or more (``test_the_head_tolerance_fails_a_wrong_chunk_or_a_skipped_layer`` shows both)."""
    K = h.size(-1)
    gamma = K * U / (1 - K * U)
    return 2 * gamma * (h.double().abs() @ w.double().abs().T)


def within_roundoff(got: torch.Tensor, want: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the logits ``got`` are ``want`` (the resident head's on ``h``) up to the head's fp32 round-off."""
    return bool(((got.double() - want.double()).abs() <= head_roundoff(h, w)).all())


def head_inputs(model, run):
    """(run(model), the inputs its LM head was given meanwhile)."""
    seen = []
    hook = model.lm_head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        return run(model), seen
    finally:
        hook.remove()


def assert_within_head_roundoff(streamed, full):
    """The head streamed in chunks: what reaches it is bitwise the resident model's (any host: the same
    modules on the same shapes), and the logits agree within ``head_roundoff`` (the chunks' products may be
    summed in another order than one matmul's). Greedy steps pick the same ids wherever the top two logits
    are further apart than the bound, checked here, so the decode steps compare like with like."""
    a, ha = head_inputs(streamed, decode_logits)
    b, hb = head_inputs(full, decode_logits)
    assert len(ha) == len(hb) and all(torch.equal(x, y) for x, y in zip(ha, hb)), "what reaches the head differs"
    w = full.lm_head.weight
    for got, want, h in zip(a, b, hb):
        assert within_roundoff(got, want, h, w), "streamed logits beyond the head's round-off"
        top = want[:, -1].topk(2, -1).values
        assert ((top[:, 0] - top[:, 1]).double() > head_roundoff(h[:, -1], w).amax(-1)).all()
    p = SamplingParams(max_tokens=10, temperature=0)
    assert Engine(streamed).generate(PROMPTS, p) == Engine(full).generate(PROMPTS, p)


def test_parse_size():
    assert parse_size("300MB") == 300_000_000 and parse_size("1.5GB") == 1_500_000_000
    assert parse_size("64MiB") == 64 * 2**20 and parse_size(" 2048 ") == 2048 and parse_size("10kb") == 10_000
    for bad in ("", "MB", "300 XB", "-5MB", "0MB", "1e3MB", "lots"):
        with pytest.raises(ValueError, match="--max-memory"):
            parse_size(bad)


def budget_for(stage, depth: int, mode: str) -> int:
    """A budget that makes the plan take ``mode``, from the stage's own sizes."""
    with SafetensorsFile(stage / "model.safetensors") as r:
        blk = r.nbytes("blocks.0.")
        base = r.nbytes() - sum(r.nbytes(f"blocks.{i}.") for i in range(depth))  # embeddings, head, final norm
    return {"one-block-resident": base + 3 * blk, "all-blocks-streamed": base + 2 * blk,
            "head-streamed": base + 2 * blk - 1}[mode]


@pytest.mark.parametrize("flavour,tie", [("modern", True), ("modern", False), ("gpt2", True)])
@pytest.mark.parametrize("mode", ["one-block-resident", "all-blocks-streamed", "head-streamed"])
def test_streamed_fp32_computes_the_resident_model(tmp_path, flavour, tie, mode):
    """Bitwise with the head resident; with the head streamed in chunks, within its fp32 round-off."""
    cfg = GPTConfig(**{**CFG, "vocab_size": 4000, "flavour": flavour, "tie_embeddings": tie,
                       "n_kv_head": 2 if flavour == "modern" else 0})
    save_stage(tmp_path / "s", cfg)
    full, _ = load_model(tmp_path / "s")
    budget = budget_for(tmp_path / "s", cfg.depth, mode)
    streamed, _ = load_streamed(tmp_path / "s", budget)
    plan = streamed.offload
    assert plan.resident_bytes <= budget, plan.describe()
    want = {"one-block-resident": cfg.depth - 1, "all-blocks-streamed": cfg.depth}.get(mode)
    assert len(plan.streamed_blocks) == want if want else len(plan.streamed_blocks) > 0
    # below embedding + head + two slots: the embedding is read by row, the head streamed in chunks
    assert plan.base_resident == (mode != "head-streamed")
    assert isinstance(streamed.lm_head, StreamedHead) == (mode == "head-streamed")
    if mode == "head-streamed":
        assert_within_head_roundoff(streamed, full)
    else:
        assert_same(streamed, full)


def test_block_schedule_loads_each_streamed_layer_once_per_pass_for_the_whole_batch(tmp_path):
    save_stage(tmp_path / "s", GPTConfig(**CFG))
    full, _ = load_model(tmp_path / "s")
    streamed, _ = load_streamed(tmp_path / "s", 2_800_000, micro_tokens=8)  # 8 tokens: one 7-token row a micro-batch
    pf = streamed.blocks[-1]._streamer
    n = len(streamed.offload.streamed_blocks)
    assert n >= 3
    x = torch.randint(0, 1000, (6, 7))
    with torch.no_grad():
        # the blocks run each micro-batch (one row) as the resident model runs that row alone, so what reaches
        # the head is bitwise the same (any host); the head itself sees all six rows at once, a matmul of
        # another shape than one row's, so the logits agree within its round-off (a batch of six run whole
        # through the resident model would differ from the rows alone in the blocks too)
        rowwise, h = head_inputs(full, lambda m: torch.cat([m(x[i: i + 1]) for i in range(6)]))
        h = torch.cat(h)
        pf.jobs.join()  # the first slots' loads done (the thread keeps the count)
        before = pf.loads
        for _ in range(3):
            logits, seen = head_inputs(streamed, lambda m: m(x))
            assert torch.equal(seen[0], h), "the micro-batches differ from the resident model on each row"
            assert within_roundoff(logits, rowwise, h, full.lm_head.weight)
    pf.jobs.join()
    # each pass loads every streamed block exactly once (the last pass's loads include the next pass's
    # first slots, as the first pass's came before it): each layer serves all six micro-batches
    assert pf.loads - before == 3 * n
    # greedy ids, not floats: equal wherever no step's top two logits lie within round-off of each other
    p = SamplingParams(max_tokens=8, temperature=0)
    assert Engine(streamed).generate(PROMPTS, p) == Engine(full).generate(PROMPTS, p)


@pytest.mark.parametrize("bits", [8, 4])
def test_streamed_quantized_stage_is_bitwise_the_resident_one(tmp_path, bits):
    """Bitwise (any host): the head stays resident, the blocks' QuantLinears hold the same codes."""
    save_stage(tmp_path / "fp32", GPTConfig(**CFG, tie_embeddings=False))
    stage = load.quantize_stage(tmp_path, "fp32", bits, 64, f"q{bits}")
    # the reference quantizes the fp32 weights in memory: the same codes quantize_stage wrote
    ref = quant.quantize_model(load_model(tmp_path / "fp32")[0], bits, 64)
    budget = budget_for(stage, CFG["depth"], "all-blocks-streamed")
    streamed, _ = load_streamed(stage, budget)
    assert len(streamed.offload.streamed_blocks) == CFG["depth"] and streamed.quantization["bits"] == bits
    assert streamed.offload.base_resident
    assert memory_mode(streamed) == {"memory": "streamed", "memory_budget_mb": round(budget / 1e6, 1)}
    assert_same(streamed, ref)


def test_streamed_lora_stage_merges_as_load_model_does(tmp_path):
    cfg = GPTConfig(**CFG)
    torch.manual_seed(1)
    rank, d = 4, cfg.n_embd
    extra = {f"blocks.{i}.mlp.fc.lora_{ab}":
             torch.randn(*((rank, d) if ab == "A" else (2 * cfg.ffn_hidden, rank))) * 0.05
             for i in range(cfg.depth) for ab in "AB"}
    save_stage(tmp_path / "s", cfg, extra=extra)
    info = json.loads((tmp_path / "s/config.json").read_text())
    (tmp_path / "s/config.json").write_text(json.dumps({**info, "lora": {"rank": rank, "alpha": 8.0,
                                                                         "targets": ["mlp.fc"]}}))
    full, _ = load_model(tmp_path / "s")
    streamed, _ = load_streamed(tmp_path / "s", 3_000_000)
    assert streamed.offload.streamed_blocks and streamed.offload.base_resident  # bitwise: the head resident
    assert_same(streamed, full)


def test_server_scheduler_on_a_streamed_model(run):
    from chatfactory.inference.batching import Request, Scheduler
    from chatfactory.serve.service import Service
    from chatfactory.text.tokenizer import Tokenizer

    answers = []
    for model in (load_model(run / "sft")[0], load_streamed(run / "sft", 2_200_000)[0]):
        sched = Scheduler(model, slots=2, start=False)  # rows fill their own slots: slot-wise steps
        got = {i: [] for i in range(3)}
        for i, prompt in enumerate(PROMPTS):
            sched.submit(Request(prompt, SamplingParams(max_tokens=6, temperature=0),
                                 emit=lambda st, i=i, got=got: got[i].append(st.token)))
        sched.run_until_idle()
        answers.append(got)
        memory = Service(model, Tokenizer.load(run / "tokenizer.json"), "x", scheduler=sched).memory
    # the same ids on any host: at 2.2 MB the head stays resident and the blocks run the whole batch, the same ops
    assert answers[0] == answers[1] and all(len(v) == 6 for v in answers[1].values())
    assert memory == {"memory": "streamed", "memory_budget_mb": 2.2}
    everything = load_streamed(run / "sft", 10**9)[0]
    assert memory_mode(everything) == {"memory": "resident", "memory_budget_mb": 1000.0}


@pytest.mark.slow
def test_serve_max_memory_over_http(run):
    import urllib.request

    with serve_subprocess(run, "--stage", "sft", "--max-memory", "2.2MB",
                          env={**os.environ, "OMP_NUM_THREADS": "1"}) as url:
        (card,) = json.load(urllib.request.urlopen(url + "/v1/models", timeout=10))["data"]
        assert (card["memory"], card["memory_budget_mb"]) == ("streamed", 2.2)
        body = json.dumps({"model": card["id"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                           "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        answer = json.load(urllib.request.urlopen(req, timeout=60))
    # the resident model's greedy answer, in this process (greedy ids, not floats: the same wherever no step's
    # top two logits lie within round-off of each other, as in the block schedule's test)
    from chatfactory.text.tokenizer import Tokenizer

    tok = Tokenizer.load(run / "tokenizer.json")
    ids = Engine(load_model(run / "sft")[0], vocab_limit=tok.vocab_size).generate(
        [tok.chat_prompt([{"role": "user", "content": "hi"}])],
        SamplingParams(max_tokens=5, temperature=0, stop_ids=tok.stop_ids))[0]
    text = [t for t in ids if t not in tok.stop_ids]
    assert answer["usage"]["completion_tokens"] == len(ids)
    assert answer["choices"][0]["message"]["content"] == tok.decode(text)


def test_bad_budget_and_bad_file_errors(tmp_path):
    save_stage(tmp_path / "s", GPTConfig(**CFG))
    with pytest.raises(ValueError, match=r"too small for this model: the smallest that streams it is"):
        load_streamed(tmp_path / "s", 500_000)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(CheckpointError, match=r"bad/model.safetensors: corrupt or truncated checkpoint"):
        SafetensorsFile(tmp_path / "bad/model.safetensors")


def test_the_head_tolerance_fails_a_wrong_chunk_or_a_skipped_layer(tmp_path):
    """The round-off bound is tight enough to catch real bugs: a head chunk read one row off, a streamed
    block skipped, each fails it, while the correct streamed model passes."""
    cfg = GPTConfig(**{**CFG, "vocab_size": 4000})
    save_stage(tmp_path / "s", cfg)
    full, _ = load_model(tmp_path / "s")
    x = torch.tensor(PROMPTS[0])[None]
    with torch.no_grad():
        want, (h,) = head_inputs(full, lambda m: m(x))

        def passes(model) -> bool:
            return within_roundoff(model(x), want, h, full.lm_head.weight)

        streamed, _ = load_streamed(tmp_path / "s", budget_for(tmp_path / "s", cfg.depth, "head-streamed"))
        assert isinstance(streamed.lm_head, StreamedHead) and passes(streamed)
        head = streamed.lm_head

        def one_row_off(buf, start):  # a chunk read from the wrong offset (its last row stays as it was)
            n = min(head.chunk, head.vocab - start - 1)
            head.reader.read_rows(head.key, start + 1, buf[:n])

        head._streamer.load = one_row_off
        head._streamer._restart(head._streamer.order[0])  # drop the chunks already loaded right
        assert not passes(streamed)
        skipped, _ = load_streamed(tmp_path / "s", budget_for(tmp_path / "s", cfg.depth, "head-streamed"))
        assert passes(skipped)
        skipped.blocks[3].forward = lambda x, rope=None, cache=None, attn_mask=None: x  # a missed layer
        assert not passes(skipped)


def _outcome(load):
    """What a load gives: (its config's step, its logits on a fixed input) or the error it raises."""
    try:
        model, info = load()
    except CheckpointError as e:
        return f"CheckpointError: {e}"
    with torch.no_grad():
        return info["step"], model(torch.tensor([PROMPTS[0]]))


def assert_both_paths(stage, budget) -> object:
    """The resident and the streamed load of ``stage`` give the same step and logits, or the same error."""
    resident = _outcome(lambda: load_model(stage))
    streamed = _outcome(lambda: load_streamed(stage, budget))
    if isinstance(resident, str) or isinstance(streamed, str):
        assert streamed == resident
        return resident
    assert streamed[0] == resident[0] and torch.equal(streamed[1], resident[1])  # bitwise: the head resident
    return resident[0]


def test_streamed_path_keeps_the_checkpoint_rules(tmp_path):
    """The streamed load reads through ``load_checkpoint`` as every load does: a save in progress, a torn
    first save, weights and config of two saves, a truncated file -- the same step and logits, or the same
    error, as the resident load; and a save renaming a new file over the one a streamed model reads
    changes nothing it computes (one descriptor: never a mix of two saves)."""
    from chatfactory.store.checkpoint import CONFIG, MODEL

    cfg = GPTConfig(**CFG)
    stage = tmp_path / "s"
    save_stage(stage, cfg)
    budget = budget_for(stage, cfg.depth, "all-blocks-streamed")
    assert assert_both_paths(stage, budget) == 0
    # a save in progress: the writer's temps of step 9 beside the complete step-0 checkpoint
    torch.manual_seed(9)
    save_checkpoint(tmp_path / "next", unique_state_dict(GPT(cfg)), {"model": cfg.to_dict()}, step=9)
    for name in os.listdir(tmp_path / "next"):
        os.replace(tmp_path / "next" / name, stage / (name + ".tmp"))
    assert assert_both_paths(stage, budget) == 0
    os.replace(stage / (MODEL + ".tmp"), stage / MODEL)  # between the writer's renames: the step-9 set is read
    assert assert_both_paths(stage, budget) == 9
    os.replace(stage / (CONFIG + ".tmp"), stage / CONFIG)
    assert assert_both_paths(stage, budget) == 9
    # a torn first save: nothing complete to read
    (tmp_path / "first").mkdir()
    (tmp_path / "first" / (MODEL + ".tmp")).write_bytes(b"torn")
    assert "no complete checkpoint" in assert_both_paths(tmp_path / "first", budget)
    # config.json of another save than model.safetensors
    save_stage(tmp_path / "other", cfg, seed=1)
    (tmp_path / "mixed").mkdir()
    os.link(stage / MODEL, tmp_path / "mixed" / MODEL)
    os.link(tmp_path / "other" / CONFIG, tmp_path / "mixed" / CONFIG)
    assert "config.json: belongs to another save" in assert_both_paths(tmp_path / "mixed", budget)
    # a truncated file: named, whichever way it is loaded
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / MODEL).write_bytes((stage / MODEL).read_bytes()[:-100])
    os.link(stage / CONFIG, tmp_path / "cut" / CONFIG)
    err = assert_both_paths(tmp_path / "cut", budget)
    assert f"{tmp_path / 'cut' / MODEL}: corrupt or truncated checkpoint" in err
    # a new save renamed over the file a streamed model reads: it goes on with the save it opened
    streamed, _ = load_streamed(stage, budget)
    with torch.no_grad():
        before = streamed(torch.tensor([PROMPTS[0]]))
        save_stage(stage, cfg, seed=2)
        assert torch.equal(streamed(torch.tensor([PROMPTS[0]])), before)
        assert not torch.equal(load_model(stage)[0](torch.tensor([PROMPTS[0]])), before)


def test_quantize_and_max_memory_refusals(tmp_path):
    """Streaming is for inference and for the CPU; --quantize with --max-memory streams a quantized stage
    only; a quantized stage is never requantized, streamed or not; training refuses it."""
    save_stage(tmp_path / "fp32", GPTConfig(**CFG, tie_embeddings=False))
    q4 = load.quantize_stage(tmp_path, "fp32", 4, 64, "q4")
    with pytest.raises(ValueError, match="pass inference=True"):
        load_model(tmp_path / "fp32", max_memory="3MB")
    with pytest.raises(ValueError, match="CPU only for now"):
        load_streamed(tmp_path / "fp32", "3MB", device="cuda")
    with pytest.raises(ValueError, match="--quantize with --max-memory: quantize the stage once"):
        load_streamed(tmp_path / "fp32", "3MB", quantize="int8")
    with pytest.raises(ValueError, match="int4 stage already \\(groups of 64\\): --quantize int8 cannot requantize"):
        load_streamed(q4, "3MB", quantize="int8")
    assert load_streamed(q4, "3MB", quantize="int4:64")[0].quantization["group"] == 64  # what it is: no change
    with pytest.raises(CheckpointError, match="a quantized stage \\(int4\\), for inference only"):
        load_model(q4)


# ---------------------------------------------------------------- chatfactory generate
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = make_run(tmp_path_factory.mktemp("gen") / "r")
    save_stage(root / "sft", GPTConfig(**{**CFG, "vocab_size": 320, "block_size": 128}))
    rows = [{"prompt": f"hello {i} " * (1 + i % 3)} for i in range(5)]
    rows.insert(2, {"messages": [{"role": "system", "content": "be short"}, {"role": "user", "content": "hi"}]})
    (root / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def generate(run, out, *extra) -> int:
    return cli.main(["generate", "--run", str(run), "--stage", "sft", "--prompts", str(run / "p.jsonl"), "--out",
                     str(out), "--batch", "4", "--max-new-tokens", "12", *extra])


def test_generate_streamed_matches_resident_and_resumes(run, tmp_path, capsys):
    assert generate(run, tmp_path / "resident.jsonl") == 0
    assert generate(run, tmp_path / "streamed.jsonl", "--max-memory", "2.2MB") == 0
    assert "streamed" in capsys.readouterr().err  # the plan is printed
    resident = (tmp_path / "resident.jsonl").read_text()
    # byte for byte on any host: the head stays resident and a batch fits one micro-batch, so the same ops run
    assert (tmp_path / "streamed.jsonl").read_text() == resident
    rows = [json.loads(x) for x in resident.splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[2]["messages"][-1]["content"] == "hi"
    from chatfactory.text.tokenizer import Tokenizer

    tok = Tokenizer.load(run / "tokenizer.json")
    for r in rows:  # each row counts its prompt's tokens and its answer's, and ends by its stop id or the limit
        messages = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
        assert r["prompt_tokens"] == len(tok.chat_prompt(messages))
        assert (r["finish_reason"], r["completion_tokens"] == 12) in (("length", True), ("stop", False)), r
    # resume: a run cut after its first batch answers the other rows only, the same way
    (tmp_path / "cut.jsonl").write_text("".join(resident.splitlines(True)[:4]))
    assert generate(run, tmp_path / "cut.jsonl", "--max-memory", "2.2MB") == 0
    assert "6 answers (2 new" in capsys.readouterr().out
    assert (tmp_path / "cut.jsonl").read_text() == resident
    assert generate(run, tmp_path / "cut.jsonl") == 0 and "(0 new" in capsys.readouterr().out


def test_generate_errors_name_the_file_line_and_the_budget(run, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n\n{"messages": [{"role": "user", "content": 3}]}\n')
    assert cli.main(["generate", "--run", str(run), "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert f"{bad}:3: messages[0]: a message needs a string" in capsys.readouterr().err
    bad.write_text('{"prompt": "ok"}\n{"text": "no"}\n')
    assert cli.main(["generate", "--run", str(run), "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert f"{bad}:2: a prompt row needs" in capsys.readouterr().err
    assert generate(run, tmp_path / "o.jsonl", "--max-memory", "300 apples") == 2
    assert "--max-memory '300 apples': give a size such as 300MB" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


# ---------------------------------------------------------------- peak memory
MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from chatfactory.model.gpt import GPT, GPTConfig
    from chatfactory.store.load import load_model
    from chatfactory.inference.engine import Engine, SamplingParams

    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

    # torch's one-time costs come first, whatever the model: building on the meta device (~70 MB of
    # kernel registrations) and a first forward; neither grows with the model
    with torch.device("meta"):
        GPT(GPTConfig(depth=1, n_embd=64, vocab_size=64))
    tiny = GPT(GPTConfig(depth=1, n_embd=64, head_dim=32, vocab_size=64))
    Engine(tiny).generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=2, temperature=0))
    del tiny
    base = status("VmRSS")
    model, _ = load_model(sys.argv[1], inference=True, max_memory=int(sys.argv[2]))
    prompts = [[(7 * i + j) % 4000 + 1 for j in range(24)] for i in range(4)]
    out = Engine(model).generate(prompts, SamplingParams(max_tokens=8, temperature=0))
    print(json.dumps({"base": base, "hwm": status("VmHWM"), "tokens": sum(map(len, out)),
                      "streamed": len(model.offload.streamed_blocks), "weights": model.offload.resident_bytes}))
""")


@pytest.mark.slow
def test_peak_memory_stays_under_the_budget_plus_overhead(tmp_path):
    cfg = GPTConfig(depth=16, n_embd=384, head_dim=64, vocab_size=4096, block_size=64)
    model = save_stage(tmp_path / "big", cfg)
    size = sum(t.numel() * t.element_size() for t in unique_state_dict(model).values())
    del model
    assert size >= 100e6
    budget = size // 4
    # the stated overhead beyond the budget (which pays for the resident weights and every slot):
    kv = 2 * cfg.depth * 4 * cfg.n_kv_head * 40 * cfg.head_dim * 4  # KV cache: 4 rows x 40 positions, fp32
    acts = 4 * 24 * (2 * cfg.ffn_hidden + 4 * cfg.n_embd + cfg.vocab_size) * 4 * 3  # prefill activations, ~3 alive
    slack = 24 * 2**20  # allocator arenas of the prefetch thread, page rounding, Python objects
    overhead = kv + acts + slack
    assert budget + overhead < 0.6 * size  # a resident load (the whole size, and more) could not pass
    res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "big"), str(budget)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["tokens"] == 4 * 8 and r["streamed"] >= cfg.depth // 2 and r["weights"] <= budget
    grew = r["hwm"] - r["base"]
    print(f"peak over baseline {grew / 1e6:.1f} MB, budget {budget / 1e6:.1f} MB + overhead {overhead / 1e6:.1f} MB")
    assert grew < budget + overhead, (f"peak grew {grew / 1e6:.1f} MB over the baseline: budget {budget / 1e6:.1f} MB "
                                      f"+ overhead {overhead / 1e6:.1f} MB (model {size / 1e6:.1f} MB)")
