"""bench/small_hardware.py's parts at toy size, so the script cannot rot: the agreement measure, the
quality table on a tiny random model (fp32 against itself is exact; a quantized variant is really
quantized and close), the decode timer (what it times, and that it returns plain greedy's tokens), the
held-out text readers, and, where llama-cpp-python and the SmolLM2 GGUF are installed, that llama.cpp
decoding rows together gives each row the tokens it gets alone. (tests/test_benches.py runs the whole
script in its --quick mode.)"""
import sys
import time
from pathlib import Path

import pytest
import torch

from chatfactory.inference.engine import Engine
from chatfactory.inference.sampling import SamplingParams
from chatfactory.model.quant import QuantLinear
from chatfactory.store.load import load_model
from chatfactory.text.tokenizer import Tokenizer
from conftest import TEXT, make_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import small_hardware as sh  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("hw") / "tiny")
    model, _ = load_model(run / "sft")
    return model, Tokenizer.load(run / "tokenizer.json")


def test_agreement_counts_positions_and_common_prefix():
    assert sh.agreement([[1, 2, 3, 4], [5, 6]], [[1, 2, 9, 4], [7, 6]]) == (4 / 6, (2 + 0) / 2)
    assert sh.agreement([[1, 2, 3]], [[1, 2, 3]]) == (1.0, 3.0)
    assert sh.agreement([[1, 2, 3]], [[1, 2]]) == (1.0, 2.0)  # a row that stopped early: its own length
    with pytest.raises(ValueError, match="2 reference rows against 1"):
        sh.agreement([[1], [2]], [[1]])


def test_variant_quantizes_a_copy_and_names_a_bad_spec(tiny):
    model, _ = tiny
    assert sh.variant(model, "fp32") is model
    q = sh.variant(model, "int4:32+head")
    assert isinstance(q.lm_head, QuantLinear) and q.lm_head.bits == 4 and q.lm_head.group == 32
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # the original stays fp32
    int8 = [m for m in sh.variant(model, "int8").modules() if isinstance(m, QuantLinear)]
    assert int8 and all(m.bits == 8 for m in int8)
    with pytest.raises(ValueError, match="int4:32\\+tail.*'\\+head'"):
        sh.variant(model, "int4:32+tail")
    with pytest.raises(ValueError, match="group size goes with int4"):
        sh.variant(model, "int8:32")


def test_quality_table_on_a_tiny_model(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    ids = sum((tok.document(t) for t in TEXT), [])
    prompts = [tok.chat_prompt([{"role": "user", "content": c}]) for c in ("hello", "add two numbers", "bold?")]
    q = sh.quality(model, tok, ids, prompts, ("fp32", "int8", "int4:32"), new=12, seq_len=64)
    assert q["fp32"] == {"bpb": q["fp32"]["bpb"], "delta": 0.0, "agree": 1.0, "prefix": 12.0}
    # bits/byte of a random 320-token model: near log2(320) bits per token, spread over its bytes
    assert 1.0 < q["fp32"]["bpb"] < 10.0
    assert 0 < abs(q["int8"]["delta"]) < 0.005  # really quantized, and close
    assert 0 < abs(q["int4:32"]["delta"]) < 0.05
    assert 0.5 <= q["int8"]["agree"] <= 1.0 and 0 <= q["int4:32"]["prefix"] <= 12


def test_decode_rate_times_the_decode_steps_of_the_best_call_after_a_warm_up():
    """A stream whose prefill takes 0.3 s and whose steps take 20 ms (100 ms in the warm-up call): 2 rows
    x 7 steps in 7 x 20 ms is 100 tokens/s. Timing the prefill (<= 2 x 7 / 0.44 s = 32) or the warm-up
    call (<= 20) falls below the bound; counting 8 steps (114) passes the upper one, which holds because
    a sleep can only overshoot."""
    calls = []

    def start():
        calls.append(len(calls))
        step = 0.1 if len(calls) == 1 else 0.02

        def steps():
            time.sleep(0.3)  # prefill: the first new token comes out before the clock starts
            yield [1, 2]
            for i in range(7):
                time.sleep(step)
                yield [3 + i, 4 + i]
        return steps()

    rate, rows = sh.decode_rate(start, 2, 8, repeats=2)
    assert len(calls) == 3  # the warm-up and two timed calls
    assert 60 < rate <= 100
    assert rows == [[1, 3, 4, 5, 6, 7, 8, 9], [2, 4, 5, 6, 7, 8, 9, 10]]  # per row, from per step
    with pytest.raises(RuntimeError, match="stopped after 3 of 10 steps"):
        sh.decode_rate(lambda: iter([[1], [2], [3]]), 1, 10, repeats=1)


def test_decode_rate_of_the_engine_gives_greedy_tokens(tiny):
    model, _ = tiny
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
    engine = Engine(model)
    p = SamplingParams(max_tokens=10, temperature=0)
    _, rows = sh.decode_rate(lambda: engine.stream(prompts, p), 2, 10, repeats=2)
    assert rows == sh.greedy(model, prompts, 10) and all(len(r) == 10 for r in rows)


def test_held_out_text_readers(tmp_path, tiny):
    _, tok = tiny
    with pytest.raises(FileNotFoundError, match="data/meta.json"):
        sh.run_val_ids(tmp_path, 100)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl.gz"):
        sh.tinystories_ids(tok, 100, tmp_path / "nowhere.jsonl.gz")
    if not sh.TINYSTORIES.exists():
        pytest.skip(f"{sh.TINYSTORIES} is absent (../shared/data beside the checkout)")
    ids = sh.tinystories_ids(tok, 500)
    assert len(ids) == 500 and ids[:50] == sh.tinystories_ids(tok, 50)  # a fixed slice, from its start


def test_result_line_formats_every_key():
    line = sh.result_line({"int8_ppl_delta": 0.00123, "peak_rss_mb": 301.7, "tps_int8_b1": 40.26,
                           "int4_vs_llamacpp_b1": float("nan"), "matmul_peak_gflops": 47.8})
    assert line == ("RESULT int8_ppl_delta=0.0012 peak_rss_mb=302 tps_int8_b1=40.3 int4_vs_llamacpp_b1=nan "
                    "matmul_peak_gflops=47.800")


def test_llamacpp_rows_decoded_together_match_each_alone():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[bench]')")
    from chatfactory.formats.gguf import find_model

    try:
        path = find_model("smollm2")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    prompts = [[1, 4093, 314, 253], [1, 504, 2114, 314]]
    alone = []
    for p in prompts:
        llm = sh.LlamaCpp(path, 1, 1, 16)
        alone.append([s[0] for s in llm.stream([p], 6)])
        llm.close()
    llm = sh.LlamaCpp(path, 1, 2, 16)
    together = [list(r) for r in zip(*llm.stream(prompts, 6))]
    llm.close()
    assert together == alone and alone[0] != alone[1]
