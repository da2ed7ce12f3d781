"""The server's compiled decode step (inference/decode_step.py ``SlotStep``, ``BatchOptions(compile=True)``): the
same greedy tokens as the eager scheduler through joins, preemption, cancellation and a window boundary;
logits within fp32 round-off of a plain forward for rows at different lengths; int8/int4 models on it; the eager
fallback says why; and ``chatfactory serve --compile`` over HTTP."""

import time
import warnings

import pytest
import torch

from chatfactory.inference.batching import BatchOptions, Request, Scheduler
from chatfactory.inference.decode_step import SlotStep
from chatfactory.inference.kv_cache import KVCache
from chatfactory.inference.sampling import SamplingParams
from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.model.quant import quantize_model, set_kernel_dtype


def _model(block=256, width=64):
    torch.manual_seed(0)
    return GPT(GPTConfig(depth=2, n_embd=width, head_dim=16, n_kv_head=2, vocab_size=300, block_size=block)).eval()


def _generate(model, compile, cancel_after=None, slots=3):
    """7 requests from two clients on 3 slots (rows join, leave, and one client's rows are preempted for the
    other's), greedy, some long enough to cross the 64-slot window; -> (the requests, the scheduler)."""
    sched = Scheduler(model, slots=slots, start=False, options=BatchOptions(compile=compile))
    reqs = []
    for i in range(7):
        prompt = [1 + (i * 7 + j) % 290 for j in range(2 + 6 * i)]
        req = Request(prompt, SamplingParams(max_tokens=15 + 9 * i, temperature=0.0), emit=lambda st: None,
                      client="a" if i < 4 else "b")
        reqs.append(req)
    for req in reqs[:4]:  # client a fills the slots; b arrives later and takes its share back
        sched.submit(req)
    for _ in range(3):
        sched.step()
    for req in reqs[4:]:
        sched.submit(req)
    while sched.waiting or sched.active():
        sched.step()
        if cancel_after is not None and sched.steps == cancel_after:
            reqs[1].cancel()
    return reqs, sched


@pytest.mark.slow
@pytest.mark.parametrize("slots,width", [(1, 64), (3, 64), (4, 256)])
def test_compiled_scheduler_gives_the_eager_tokens(slots, width):
    """(4, 256): a model as wide as PACKED_MIN_WIDTH runs 1-2 rows compiled and 3-4 on the eager step."""
    model = _model(width=width)
    eager, plain = _generate(model, compile=False, cancel_after=12, slots=slots)
    fast, sched = _generate(model, compile=True, cancel_after=12, slots=slots)
    assert sched.fast is not None and sched.eager_reason == ""
    assert sched.fast.buckets == {1: [1], 3: [1, 2, 3], 4: [1, 2]}[slots]
    assert [r.generated for r in fast] == [r.generated for r in eager]
    assert max(len(r.prompt) + len(r.generated) for r in fast) > 64  # a row crossed from the 64-slot window to 128
    assert fast[1].cancelled and len(fast[1].generated) < 24  # the cancelled row stopped early
    assert sched.preempted == plain.preempted and (sched.preempted > 0 or slots == 1)  # b took a's slots


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_model_is_served_on_the_compiled_step_at_every_bucket(bits):
    """int4/int8 layers run their own kernels as calls inside the compiled graph: every bucket compiles (the
    packed step is for fp32 linears), with the eager scheduler's greedy tokens. The kernels take fp32 activations
    here: in bfloat16 (the fast default) a fused graph's fp32 round-off can round an activation to the other
    neighbouring bfloat16, and a near tie can then go the other way."""
    model = quantize_model(_model(block=128, width=256), bits)
    set_kernel_dtype(model, torch.float32)
    eager, _ = _generate(model, compile=False, slots=4)
    fast, sched = _generate(model, compile=True, slots=4)
    assert sched.fast is not None and sched.eager_reason == "" and sched.fast.buckets == [1, 2, 4]
    assert [r.generated for r in fast] == [r.generated for r in eager]


def test_slot_step_logits_match_a_plain_forward_at_different_lengths():
    """Rows at lengths 5, 9 and idle: one step of the (uncompiled) slot step against the model on each whole
    sequence, within fp32 round-off."""
    model = _model()
    cache = KVCache.for_model(model, 3, 128)
    seqs = [[3, 5, 7, 9, 11], [2, 4, 6, 8, 10, 12, 14, 16, 18]]
    with torch.no_grad():
        T = max(map(len, seqs))
        cache.prefill([0, 1], [len(s) for s in seqs])
        model.hidden_states(torch.tensor([s + [0] * (T - len(s)) for s in seqs]), cache=cache,
                            positions=torch.arange(T))
        step = SlotStep(model, cache, compile=False)
        logits = step([0, 1], [21, 22])
        for row, (s, tok) in enumerate(zip(seqs, (21, 22))):
            want = model(torch.tensor([s + [tok]]))[0, -1]
            torch.testing.assert_close(logits[row], want, rtol=1e-4, atol=1e-4)
    assert cache.lengths == [6, 10, 0]


def test_the_eager_fallback_says_why(monkeypatch):
    def broken(self, *a, **k):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(SlotStep, "warm", broken)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        sched = Scheduler(_model(), slots=2, start=False, options=BatchOptions(compile=True))
    assert sched.fast is None and "no C++ compiler" in sched.eager_reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Scheduler(_model(), slots=2, start=False).eager_reason == "compile=False"


@pytest.mark.slow
def test_serve_compile_over_http_answers_as_the_eager_server(tmp_path):
    """`chatfactory serve --compile`: its start line names the compiled step (compiled before /health answers),
    and four concurrent greedy chats get the eager server's replies word for word."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import make_run, post, start_serve

    run = make_run(tmp_path / "run")
    asks = [{"model": "run/sft", "messages": [{"role": "user", "content": f"Say something about {w}."}],
             "temperature": 0, "max_tokens": 24 + 8 * i} for i, w in enumerate(["bold", "code", "add", "text"])]
    replies = {}
    for args in ((), ("--compile",)):
        proc, url = start_serve(run, "--slots", "2", *args)
        try:
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(post, [url] * len(asks), ["/v1/chat/completions"] * len(asks), asks))
        finally:
            proc.terminate()
            out = proc.communicate(timeout=30)[0].decode(errors="replace")
        assert all(status == 200 for status, _ in answers), answers
        replies[args] = [body["choices"][0]["message"]["content"] for _, body in answers]
        assert ("compiled decode step" in out) == bool(args), out[-2000:]
        assert all(replies[args]), replies[args]
    assert replies[("--compile",)] == replies[()]


def test_a_lora_stage_is_served_on_the_compiled_step(tmp_path):
    """A stage trained with LoRA loads for serving with its adapters merged (store/load.py), so the compiled
    step serves it, with the greedy tokens of the adapter model itself."""
    from chatfactory.inference.engine import Engine
    from chatfactory.model.lora import apply_lora
    from chatfactory.serve.service import load_service
    from chatfactory.store.checkpoint import save_checkpoint, unique_state_dict
    from conftest import make_run

    run = make_run(tmp_path / "lora")
    torch.manual_seed(0)
    model = GPT(GPTConfig(depth=1, n_embd=64, head_dim=32, vocab_size=320, block_size=128))
    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["attn.qkv", "mlp.fc"]}
    apply_lora(model, lora, seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".lora_B"):
                p.normal_(0, 0.5)  # adapters that change the answers
    save_checkpoint(run / "sft", unique_state_dict(model), {"model": model.cfg.to_dict(), "lora": lora})
    svc = load_service(run, "sft", slots=2, device="cpu", options=BatchOptions(compile=True))
    try:
        sched = svc.scheduler
        assert sched.fast is not None, sched.eager_reason
        out = []
        sched.submit(Request([5, 6, 7, 8], SamplingParams(max_tokens=10, temperature=0.0), out.append))
        deadline = time.time() + 60
        while not (out and out[-1].finish) and time.time() < deadline:
            time.sleep(0.02)
        greedy = SamplingParams(max_tokens=10, temperature=0.0)
        want = Engine(model.eval(), vocab_limit=svc.tok.vocab_size).generate([[5, 6, 7, 8]], greedy)[0]
        assert [s.token for s in out if s.token is not None] == want
    finally:
        svc.close()


def test_the_scheduler_thread_loads_and_runs_its_model_and_a_failed_load_raises_in_the_caller():
    """Given a loader, the scheduler's own thread calls it and runs every forward after (inference/owner.py: a
    second thread running torch's parallel ops halves a decode's speed), with the tokens of the same model run
    in the caller; a load that fails raises in the caller, naming what failed, and leaves no thread behind."""
    import threading

    from chatfactory.inference.engine import Engine

    loaded_in = []

    def load():
        loaded_in.append(threading.current_thread())
        return _model()

    sched = Scheduler(load, slots=2)
    try:
        assert loaded_in == [sched._thread] and sched._thread is not threading.current_thread()
        out, ran_in = [], set()

        def emit(step):
            ran_in.add(threading.current_thread())
            out.append(step)

        sched.submit(Request([5, 6, 7], SamplingParams(max_tokens=8, temperature=0.0), emit=emit))
        deadline = time.time() + 60
        while not (out and out[-1].finish) and time.time() < deadline:
            time.sleep(0.01)
        want = Engine(_model()).generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0.0))[0]
        assert [s.token for s in out if s.token is not None] == want and ran_in == {sched._thread}
    finally:
        sched.close()

    def broken():
        raise FileNotFoundError("runs/x/sft/model.safetensors: no such file")

    before = {t for t in threading.enumerate() if t.name == "chatfactory-scheduler"}
    with pytest.raises(FileNotFoundError, match="runs/x/sft/model.safetensors"):
        Scheduler(broken, slots=1)
    assert {t for t in threading.enumerate() if t.name == "chatfactory-scheduler"} <= before
