"""The IFEval pass (eval/ifeval.py) and what it runs on: ``complete_all``'s continuous batching gives each
prompt the engine's own greedy answer whatever the slots; ``chatfactory eval --task`` on an IFEval file
writes the responses and the four figures, resumes an interrupted pass and reuses a finished one; a bad
row is an error naming file and line."""
import json
import subprocess

import pytest
import torch

from builders import write_jsonl
from chatfactory.eval import ifeval
from chatfactory.formats.jsonl import DataError
from chatfactory.inference.engine import Engine
from chatfactory.inference.generate import complete_all
from chatfactory.inference.sampling import SamplingParams
from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.store.load import load_model
from chatfactory.text.tokenizer import Tokenizer
from conftest import cli_cmd, make_run

ROWS = [{"key": 1, "prompt": "Say hello without commas.", "instruction_id_list": ["punctuation:no_comma"],
         "kwargs": [{}]},
        {"key": 2, "prompt": "Write in lower case only, at least 3 words.",
         "instruction_id_list": ["change_case:english_lowercase", "length_constraints:number_words"],
         "kwargs": [{}, {"relation": "at least", "num_words": 3}]},
        {"key": 3, "prompt": "End your reply with 'Bye.'", "instruction_id_list": ["startend:end_checker"],
         "kwargs": [{"end_phrase": "Bye."}]},
        {"key": 4, "prompt": "Wrap your whole answer in double quotes.",
         "instruction_id_list": ["startend:quotation"], "kwargs": [{}]},
        {"key": 5, "prompt": "Answer in JSON.", "instruction_id_list": ["detectable_format:json_format"],
         "kwargs": [{}]}]


@pytest.mark.parametrize("slots", [1, 2, 8])
def test_continuous_batching_gives_each_prompt_its_own_greedy_answer(slots):
    """Five prompts of different lengths through 1, 2 or 8 slots (rows leave and join at every step)
    end as the engine generates each alone; a stop id ends a row and is left out of its answer."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(depth=2, n_embd=64, head_dim=32, n_kv_head=1, vocab_size=97, block_size=64)).eval()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42], [3, 3, 3, 3], [11, 12]]
    alone = [Engine(model).generate([p], SamplingParams(max_tokens=10, temperature=0))[0] for p in prompts]
    stop = alone[1][3]  # a token one answer produces: its row must stop there
    params = SamplingParams(max_tokens=10, temperature=0, stop_ids=(stop,))
    order = []
    got = complete_all(model, prompts, params, slots=slots, on_done=lambda i, ids: order.append(i))
    want = [a[: a.index(stop)] if stop in a else a for a in alone]
    assert got == want and sorted(order) == list(range(5))


def test_a_context_shorter_than_the_block_ends_rows_at_it():
    torch.manual_seed(0)
    model = GPT(GPTConfig(depth=1, n_embd=64, head_dim=32, vocab_size=97, block_size=64)).eval()
    out = complete_all(model, [[1, 2, 3], [4] * 10], SamplingParams(max_tokens=50, temperature=0), context=16)
    assert [len(o) for o in out] == [13, 6]  # each row stops when prompt + answer fill its 16 positions
    with pytest.raises(ValueError, match="16-token context"):
        complete_all(model, [[1] * 16], SamplingParams(max_tokens=5, temperature=0), context=16)


def test_ifeval_pass_writes_resumes_and_reuses(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", block=256)
    data = write_jsonl(tmp_path / "ifeval.jsonl", ROWS)
    out = run / "eval" / "sft"
    responses, results, partial_name = ifeval.files(data)
    assert responses == "ifeval_ifeval_responses.jsonl"  # named after a file that is not IFEval's own
    r = subprocess.run(cli_cmd("eval", "--run", run, "--task", data, "--max-tokens", "12", "--json",
                               tmp_path / "res.json"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "prompt-level strict" in r.stdout and "at most 12 new tokens" in r.stdout
    rows = [json.loads(x) for x in open(out / responses)]
    assert [x["key"] for x in rows] == [1, 2, 3, 4, 5] and [x["prompt"] for x in rows] == [x["prompt"] for x in ROWS]
    res = json.loads((out / results).read_text())
    assert set(res) >= {"prompt_strict", "inst_strict", "prompt_loose", "inst_loose", "per_type", "seconds"}
    assert res["settings"]["max_tokens"] == 12 and res["per_type"]["punctuation:no_comma"]["n"] == 1
    # the figures are the checkers' on the written responses: anyone can rescore the file
    from chatfactory.data.constraints import score
    assert score(ROWS, [x["response"] for x in rows])["inst_loose"] == res["inst_loose"]
    assert json.loads((tmp_path / "res.json").read_text())["ifeval"]["inst_loose"] == res["inst_loose"]

    # a finished pass with the same settings is read back, not generated again
    model, _ = load_model(run / "sft", inference=True)
    tok = Tokenizer.load(run / "tokenizer.json")
    monkeypatch.setattr(ifeval, "complete_all", lambda *a, **k: pytest.fail("generated again"))
    assert ifeval.run_ifeval(model, tok, data, out, run / "sft", max_tokens=12, progress=False) == res
    monkeypatch.undo()

    # an interrupted pass: the partial file keeps the responses written so far, and a rerun generates the rest
    (out / results).unlink()
    settings = res["settings"]
    partial = [json.dumps({"settings": settings})] + [json.dumps({"key": x["key"], "response": x["response"]})
                                                      for x in rows[:3]]
    (out / partial_name).write_text("\n".join(partial) + "\n{\"key\": 4, \"resp")  # torn last line
    asked = []
    real = ifeval.complete_all
    monkeypatch.setattr(ifeval, "complete_all", lambda m, prompts, *a, **k: asked.append(len(prompts)) or
                        real(m, prompts, *a, **k))
    again = ifeval.run_ifeval(model, tok, data, out, run / "sft", max_tokens=12, progress=False)
    assert asked == [2] and not (out / partial_name).exists()
    assert [json.loads(x)["response"] for x in open(out / responses)] == [x["response"] for x in rows]
    figures = ("prompt_strict", "inst_strict", "prompt_loose", "inst_loose")
    assert {k: again[k] for k in figures} == {k: res[k] for k in figures}


@pytest.mark.parametrize("row, message", [
    ({"key": 1, "prompt": "x", "instruction_id_list": ["punctuation:no_semicolon"], "kwargs": [{}]},
     "unknown instruction id"),
    ({"key": 1, "prompt": "x", "instruction_id_list": ["punctuation:no_comma"], "kwargs": []}, "1 instructions but 0"),
    ({"key": "1", "prompt": "x", "instruction_id_list": [], "kwargs": []}, "'key' must be of type int"),
])
def test_a_bad_ifeval_row_names_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], row])
    with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{message}"):
        ifeval.load_ifeval(path)


def test_pipeline_ifeval_on_two_stages_compares_them_on_the_same_prompts(tmp_path):
    """``pipeline.ifeval=sft,ppo``: a pass per stage, the second compared with the first by McNemar on the
    same prompts, and the report's section with the four figures and the types that moved."""
    from chatfactory.model.gpt import GPTConfig
    from chatfactory.store.checkpoint import save_checkpoint, unique_state_dict

    run = make_run(tmp_path / "run", block=256)
    for name, seed in (("sft", 0), ("ppo", 1)):
        torch.manual_seed(seed)
        cfg = GPTConfig(depth=1, n_embd=64, head_dim=32, vocab_size=320, block_size=256)
        save_checkpoint(run / name, unique_state_dict(GPT(cfg)), {"model": cfg.to_dict(), "finished": True})
    data = write_jsonl(tmp_path / "ifeval.jsonl", ROWS)
    res = ifeval.ifeval_stages(run, ["sft", "ppo", "dpo"], data, 8, log=lambda *a: None)
    assert list(res) == ["sft", "ppo"] and "vs" not in res["sft"]  # dpo: not trained, left out
    vs = res["ppo"]["vs"]
    assert vs["stage"] == "sft" and vs["n"] == len(ROWS) and 0 <= vs["p"] <= 1
    assert vs["diff"] == pytest.approx(res["ppo"]["prompt_loose"] - res["sft"]["prompt_loose"])
    for stage in res:  # startend:quotation is a held-back type, the other five instructions are trained ones
        g = res[stage]["groups"]
        assert (g["held_back"]["n"], g["trained"]["n"]) == (1, 5)
        assert (g["held_back"]["inst_loose"] + 5 * g["trained"]["inst_loose"]) / 6 == pytest.approx(
            res[stage]["inst_loose"])
    assert res["ppo"]["groups"]["trained"]["vs"]["n"] == 5 and "vs" not in res["sft"]["groups"]["trained"]
    md = "\n".join(ifeval.ifeval_markdown(res))
    assert "## IFEval" in md and "| ppo |" in md and "McNemar p=" in md and "moved most" in md
    assert "hold back from training" in md and " of 1" in md
