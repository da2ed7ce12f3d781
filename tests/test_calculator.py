"""The calculator the model calls while it writes (inference/calculator.py): a safe evaluator (no eval: names,
calls, attributes and huge numbers refused), the row tool that answers ``<calc>…</calc>`` with the forced
result, the forced-token mask training uses, and the engine and the scheduler writing a tool's ids in place of
sampled ones (flagged, so RL can mask them)."""

import pytest
import torch

from chatfactory.inference.batching import Request, Scheduler
from chatfactory.inference.calculator import CalcError, CalcRow, evaluate, forced_mask, result_text
from chatfactory.inference.engine import Engine
from chatfactory.inference.sampling import SamplingParams
from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.text.tokenizer import Tokenizer

TEXT = ["What is 347 * 29? <calc>347*29</calc> <result>10063</result> The answer is 10063. "
        "the quick brown fox jumps over the lazy dog 0123456789 + - * / ( ) " * 3] * 4


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXT, vocab_size=300)


@pytest.mark.parametrize("expr, value", [
    ("347*29", "10063"), ("2 + 3 * 4", "14"), ("(2+3)*4", "20"), ("-7 + 2", "-5"), ("7/2", "3.5"),
    ("1/3", "0.333333"), ("2**10", "1024"), ("17 // 5", "3"), ("17 % 5", "2"), ("1.5 * 4", "6"),
    ("123456789 * 987654321", "121932631112635269"),
])
def test_evaluates_arithmetic(expr, value):
    assert evaluate(expr) == value


@pytest.mark.parametrize("expr, why", [
    ("__import__('os').system('ls')", "not arithmetic"), ("open('x')", "not arithmetic"),
    ("(1).__class__", "not arithmetic"), ("x + 1", "not arithmetic"), ("'a' * 3", "not arithmetic"),
    ("1/0", "division by zero"), ("5 % 0", "division by zero"), ("9**9**9", "exponents"),
    ("2**0.5", "exponents"), ("10**60 * 10", "digits"), ("1 +", "not an arithmetic expression"),
    ("1" * 201, "longer than"), ("[1, 2]", "not arithmetic"), ("True + 1", "not arithmetic"),
    # literals past the limits (a demo run's sampled call held one past float's range and crashed the stage)
    ("1e999 + 1", "float's range"), ("-1e999", "float's range"), ("9" * 61, "digits"), ("1e300", "digits"),
])
def test_refuses_what_is_not_safe_arithmetic(expr, why):
    with pytest.raises(CalcError, match=why):
        evaluate(expr)
    assert "error:" in result_text(expr)


def test_row_answers_a_call_once_with_the_result_ids(tok):
    row = CalcRow(tok)
    ids = tok.encode("Let me see. <calc>347*29</calc>")
    forced = [row.add(i) for i in ids]
    assert all(f == [] for f in forced[:-1])
    assert tok.decode(forced[-1]) == " <result>10063</result>"
    for i in tok.encode(" The answer is 10063."):  # after the forced result, nothing more until the next call
        assert row.add(i) == []


def test_forced_mask_marks_only_the_results_the_engine_wrote(tok):
    text = "What? <calc>2+3</calc> <result>5</result> So 5. Not a call: <result>9</result>"
    ids = tok.encode(text)
    mask = forced_mask(tok, ids)
    forced = tok.decode([i for i, m in zip(ids, mask) if m])
    assert forced == " <result>5</result>"
    assert tok.decode(ids[:mask.index(True)]).endswith("</calc>")


class Caller:
    """A stand-in tool: after the model's 2nd id, it writes ``ids`` (as a calculator writes a result)."""

    def __init__(self, ids):
        self.ids, self.seen = ids, 0

    def add(self, token):
        self.seen += 1
        return list(self.ids) if self.seen == 2 else []


def test_engine_and_scheduler_write_a_tools_ids_and_flag_them(tok):
    torch.manual_seed(0)
    model = GPT(GPTConfig(depth=1, n_embd=32, head_dim=16, vocab_size=300, block_size=64)).eval()
    write = tok.encode(" <result>5</result>")
    prompts = [tok.encode("What is 2+3?"), tok.encode("hello there")]
    p = SamplingParams(max_tokens=12, temperature=0)
    forced, lps = [], []
    outs = Engine(model).generate(prompts, p, logprobs=lps, tools=[Caller(write), None], forced=forced)
    assert outs[0][2:2 + len(write)] == write and forced[0][2:2 + len(write)] == [True] * len(write)
    assert not any(forced[0][:2]) and not any(forced[1]) and len(lps[0]) == len(outs[0])
    free = Engine(model).generate(prompts, p)
    assert outs[1] == free[1] and outs[0][:2] == free[0][:2]  # the other row, and what came before, unchanged

    sched = Scheduler(model, slots=2, start=False)
    got = [[], []]
    for i, (x, tool) in enumerate(zip(prompts, [Caller(write), None])):
        sched.submit(Request(x, p, emit=got[i].append, tool=tool))
    sched.run_until_idle()
    assert [s.token for s in got[0]] == outs[0] and [s.forced for s in got[0]] == forced[0]
    assert [s.token for s in got[1]] == outs[1]


def test_calc_tasks_hold_out_operand_values():
    from chatfactory.data.calc_tasks import calc_rows
    from chatfactory.data.rubric import is_correct

    train = calc_rows("sft", 300) + calc_rows("rl", 300)
    held = calc_rows("heldout", 150) + calc_rows("dev", 60)
    seen = {v for r in train for v in r["operands"]}
    assert not seen & {v for r in held for v in r["operands"]}  # no held-out operand in any training prompt
    assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in held}
    assert calc_rows("heldout", 20) == calc_rows("heldout", 20)  # the same rows every time
    for r in held[:30]:
        a, b = r["operands"]
        assert is_correct(r, r["reference"]) and max(a, b) >= 10
        assert not is_correct(r, f"<calc>{a}*{b}</calc> <result>{int(r['answer']) + 1}</result>")
        assert is_correct(r, f"So: <calc>{a}+{b}-{b}</calc> <result>{r['answer']}</result>")  # the result answers
        assert evaluate(r["reference"].split("<calc>")[1].split("</calc>")[0]) == r["answer"]


def test_sft_learns_the_call_not_the_result(tok):
    from chatfactory.train.sft import IGNORE, tokenize_conversations

    conv = [{"role": "user", "content": "What is 347 * 29?"},
            {"role": "assistant", "content": "<calc>347*29</calc> <result>10063</result> The answer is 10063."}]
    xs, ys, _ = tokenize_conversations([conv], tok, seq_len=200)
    learned = tok.decode([int(t) for t in ys[0] if t != IGNORE])
    assert "<calc>347*29</calc>" in learned and " The answer is 10063." in learned
    assert "<result>" not in learned and "10063</result>" not in learned


def test_rollout_masks_what_the_tool_wrote(tok):
    from chatfactory.train.rollout import rollout

    torch.manual_seed(0)
    model = GPT(GPTConfig(depth=1, n_embd=32, head_dim=16, vocab_size=300, block_size=64))
    write = tok.encode(" <result>5</result>")
    prompts = [tok.encode("What is 2+3?"), tok.encode("hello there")]
    batch = rollout(model, prompts, 12, 1.0, tok.end_id, tok.pad_id, seed=0, tools=[Caller(write), None])
    plain = rollout(model, prompts, 12, 1.0, tok.end_id, tok.pad_id, seed=0)
    assert batch["forced_tokens"].tolist() == [len(write), 0]
    assert batch["lengths"].tolist() == plain["lengths"].tolist()  # the tool's tokens count as the answer's
    mask = batch["answer_mask"][0].tolist()
    assert mask[2:2 + len(write)] == [False] * len(write) and mask[:2] == [True, True]
    assert batch["answer_mask"][1].tolist() == plain["answer_mask"][1].tolist()


def test_dpo_pairs_leave_the_tools_output_out_of_the_answer_mask(tok):
    from chatfactory.data.preferences import Pair, collate, encode_pairs

    prompt = [{"role": "user", "content": "What is 2+3?"}]
    pair = Pair(prompt, "<calc>2+3</calc> <result>5</result>", "<calc>2+4</calc> <result>6</result>")
    batch = collate(encode_pairs(tok, [pair], 128), tok.pad_id)
    for row in range(2):
        learned = tok.decode(batch["idx"][row][batch["answer_mask"][row]].tolist())
        assert learned.startswith("<calc>2+") and "<result>" not in learned and learned.endswith("<|end|>")


def test_a_run_with_the_calculators_problems(tmp_path):
    """`run pipeline.calc_rows=N`: the task files gain the calculator's problems (no held-out operand in training),
    and the report gains its table (accuracy with it, right calls, without it) for each evaluated stage."""
    import json
    import subprocess

    from conftest import ROOT, cli_cmd

    out = tmp_path / "run"
    r = subprocess.run(cli_cmd("run", "--config", "pipeline-tiny", "--out", out, "pipeline.calc_rows=40",
                               "pipeline.stages=pretrain,sft"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    files = {n: [json.loads(x) for x in open(out / "tasks" / f"{n}.jsonl")] for n in ("sft", "prompts", "heldout")}
    calc = {n: [x for x in rows if x.get("task") == "calc" or "<calc>" in json.dumps(x)] for n, rows in files.items()}
    assert [len(calc[n]) for n in ("sft", "prompts", "heldout")] == [40, 40, 10]
    held = {v for x in calc["heldout"] for v in x["operands"]}
    assert not held & {v for x in calc["prompts"] for v in x["operands"]}
    assert all(str(v) not in x["messages"][0]["content"].split() for x in calc["sft"] for v in held)
    report = (out / "report.md").read_text()
    assert "The calculator (multi-digit problems" in report and "| sft |" in report.split("The calculator")[1]
    evals = json.loads((out / "eval" / "sft.json").read_text())
    assert evals["calculator"]["n"] == 10 and 0 <= evals["calculator"]["accuracy"] <= 1
