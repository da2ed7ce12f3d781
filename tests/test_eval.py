"""Evaluation: log-likelihood scoring checked against hand-computed numbers, prompt building, the
few-shot table on a model that can only answer from its shots, loss/bits-per-byte, win rate, CLI."""
import json
import math
import random

import pytest
import torch
import torch.nn as nn

from chatfactory.cli import main as cli_main
from chatfactory.eval.fewshot import (
    base_prompt,
    encode_pair,
    evaluate_rows,
    few_shot_table,
    load_task,
    pick_shots,
    request_pairs,
    score_continuations,
    task_rows_from,
)
from chatfactory.eval.lm import stream_loss
from chatfactory.eval.winrate import compare, win_rate
from chatfactory.formats.jsonl import DataError
from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.text.tokenizer import Tokenizer


class BigramLM(nn.Module):
    """p(next | previous) read from a fixed table: log-likelihoods can be computed by hand."""

    def __init__(self, probs):
        super().__init__()
        self.cfg = GPTConfig(depth=1, vocab_size=len(probs), block_size=16, n_embd=64)
        self.logp = nn.Parameter(torch.tensor(probs).log())

    def forward(self, idx):
        return self.logp[idx]


# rows: previous token 0..3; columns: next token
P = [[0.1, 0.5, 0.25, 0.15],
     [0.25, 0.25, 0.25, 0.25],
     [0.5, 0.125, 0.125, 0.25],
     [0.2, 0.2, 0.2, 0.4]]


def test_loglikelihood_scoring_matches_hand_computation():
    m = BigramLM(P)
    pairs = [([0], [1, 2]),        # p(1|0) p(2|1) = 0.5 * 0.25, both argmax? 1|0 yes, 2|1 tie -> argmax picks 0: no
             ([0, 1], [0]),        # p(0|1) = 0.25
             ([3, 2], [0, 3, 3]),  # p(0|2) p(3|0) p(3|3) = 0.5 * 0.15 * 0.4 ; 0|2 yes, 3|0 no
             ([2], [0, 1, 1])]     # 0.5 * 0.5 * 0.25 ; 0|2 yes, 1|0 yes, 1|1 tie -> no
    want = [math.log(0.5 * 0.25), math.log(0.25), math.log(0.5 * 0.15 * 0.4), math.log(0.5 * 0.5 * 0.25)]
    got = score_continuations(m, pairs, batch_size=3)  # a batch of 3 and one of 1: padding must not leak
    for (ll, _), w in zip(got, want):
        assert abs(ll - w) < 1e-6, (ll, w)
    assert [g for _, g in got] == [False, True, False, False]
    assert score_continuations(m, [([2], [0]), ([0], [1])]) == [(pytest.approx(math.log(0.5)), True)] * 2
    # longer than the context: the oldest context tokens are dropped, the continuation kept whole
    (ll, _), = score_continuations(m, [([1] * 30 + [2], [0])])
    assert abs(ll - math.log(0.5)) < 1e-6


def test_multiple_choice_acc_and_length_normalised_acc_by_hand():
    """Two choices: the short one wins on total log-likelihood, the long one per character."""
    m = BigramLM(P)

    class IdTok:  # characters '0'..'3' are token ids; bos is 0
        bos_id = 0

        def encode(self, s):
            return [int(c) for c in s if c.isdigit()]

        def document(self, s):  # a document opens with bos, as Tokenizer.document does for our tokenizers
            return [self.bos_id] + self.encode(s)

    # context "2"; choice A "1" -> p(1|2)=0.125 (ll -2.08, -2.08/1 char);
    # choice B "0 1 1 1" -> 0.5*0.5*0.25*0.25 (ll -3.47, -0.87/char): acc picks A, acc_norm picks B
    rows = task_rows_from([{"context": "2", "choices": [" 1", " 0 1 1 1"], "gold": 1}])
    res = evaluate_rows(m, IdTok(), rows, k=0)
    assert res == {"acc": 0.0, "acc_norm": 1.0, "n": 1}
    rows[0]["gold"] = 0
    assert evaluate_rows(m, IdTok(), rows, k=0)["acc"] == 1.0


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["Q: what is 2 + 2?\nA: 4\n\nThe capital of France is Paris. " * 5] * 10, vocab_size=300)


def test_prompts_shots_and_chat_rendering(tok):
    rows = task_rows_from([{"context": f"Q: {i} + 1 =", "answer": f"{i + 1}", "task": "add"} for i in range(6)])
    shots = pick_shots(rows, 2, 3, seed=7)
    assert shots == pick_shots(rows, 2, 3, seed=7) and rows[2] not in shots and len(shots) == 3
    assert shots != pick_shots(rows, 2, 3, seed=8) or shots != pick_shots(rows, 3, 3, seed=7)
    with pytest.raises(ValueError, match="only 5 other rows"):
        pick_shots(rows, 0, 6, seed=0)
    text = base_prompt(rows[0], rows[1:3])
    assert text == "Q: 1 + 1 = 2\n\nQ: 2 + 1 = 3\n\nQ: 0 + 1 ="
    # trailing context spaces move into the continuation; the continuation is the tail of the whole
    ctx, cont = encode_pair(tok, "The capital of France is ", "Paris")
    assert ctx == [tok.bos_id] + tok.encode("The capital of France is")
    assert ctx + cont == [tok.bos_id] + tok.encode("The capital of France is Paris")
    # chat: shots become earlier turns, the candidate the assistant's reply
    (cctx, ccont), = request_pairs(tok, rows[0], rows[1:2], chat=True)
    assert cctx == tok.chat_prompt([{"role": "user", "content": "Q: 1 + 1 ="}, {"role": "assistant", "content": "2"},
                                    {"role": "user", "content": "Q: 0 + 1 ="}])
    assert ccont == tok.encode("1")


def test_task_file_errors_name_file_and_line(tmp_path):
    p = tmp_path / "t.jsonl"
    for text, message in [
        ('{"context": "a", "choices": [" x", " y"], "gold": 1}\n{"context": "b", "choices": [" x"], "gold": 0}\n',
         r"t.jsonl:2: 'choices'"),
        ('{"context": "a", "choices": [" x", " y"], "gold": 5}\n', r"t.jsonl:1: .*gold"),
        ('{"context": "a", "answer": "b"}\n{"text": "no context"}\n', r"t.jsonl:2: .*context"),
        ('{"context": "a", "answer": "b"}\nnot json\n', r"t.jsonl:2: not valid JSON"),
    ]:
        p.write_text(text)
        with pytest.raises(DataError, match=message):
            load_task(p)
    # "answer" as an index, as data/tasks.fewshot_rows writes it, is the gold choice
    p.write_text('{"context": "a", "choices": [" x", " y"], "answer": 1, "task": "t"}\n')
    assert load_task(p)[0]["gold"] == 1


def test_stream_loss_and_bits_per_byte_by_hand(tok):
    """A model with all-zero logits predicts uniformly: loss is exactly ln V."""
    cfg = GPTConfig(depth=1, vocab_size=tok.vocab_size, block_size=16, n_embd=64)
    model = GPT(cfg)
    nn.init.zeros_(model.lm_head.weight)
    ids = [tok.bos_id] + tok.encode("The capital of France is Paris. Q: what is 2 + 2?")
    r = stream_loss(model, tok, ids, seq_len=8)
    assert r["tokens"] == len(ids) - 1
    assert abs(r["loss"] - math.log(tok.vocab_size)) < 1e-5
    n_bytes = sum(len(tok.token_bytes[i]) for i in ids[1:])
    assert r["bytes"] == n_bytes
    assert abs(r["bpb"] - (len(ids) - 1) * math.log2(tok.vocab_size) / n_bytes) < 1e-5


def test_win_rate_counts_ties_as_half(tok):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(4)]
    judge = lambda row, ans: len(ans)  # noqa: E731
    r = compare(rows, ["aa", "a", "aaa", ""], ["a", "a", "aaaa", ""], judge)
    assert (r["wins"], r["ties"], r["losses"], r["n"]) == (1, 2, 1, 4)
    assert r["win_rate"] == pytest.approx((1 + 0.5 * 2) / 4)
    torch.manual_seed(0)
    a = GPT(GPTConfig(depth=1, vocab_size=tok.vocab_size, block_size=64, n_embd=64, init_std=0.3))
    b = GPT(GPTConfig(depth=1, vocab_size=tok.vocab_size, block_size=64, n_embd=64, init_std=0.3))
    same = win_rate(a, a, tok, rows, judge, max_tokens=8)
    assert same["ties"] == 4 and same["win_rate"] == 0.5
    # a judge that rewards exactly what B says: A can only lose or tie
    from chatfactory.eval.winrate import answers
    b_says = dict(zip((r["messages"][0]["content"] for r in rows), answers(b, tok, rows, max_tokens=8)))
    r = win_rate(a, b, tok, rows, lambda row, ans: float(ans == b_says[row["messages"][0]["content"]]), max_tokens=8)
    assert r["score_b"] == 1.0 and r["win_rate"] < 0.5


# ---------------------------------------------------------------- a model that can answer only from its shots
LABELS = ["red", "blue", "green", "gold"]


def _pattern_docs(n=1500, seed=0):
    """Each document repeats ONE label it picked at random: "c = blue\\n\\na = blue\\n\\n…". The label of a
    line is predictable from earlier lines only — exactly what the shots of a few-shot prompt provide."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lab = rng.choice(LABELS)
        docs.append("\n\n".join(f"{rng.choice('abcdefgh')} = {lab}" for _ in range(rng.randint(3, 10))))
    return docs


@pytest.fixture(scope="module")
def pattern_run(tmp_path_factory):
    from chatfactory.config import load_config
    from chatfactory.train.pretrain import run_pretrain

    d = tmp_path_factory.mktemp("fewshot")
    with open(d / "docs.jsonl", "w") as f:
        for doc in _pattern_docs():
            f.write(json.dumps({"text": doc}) + "\n")
    cfg = load_config("tiny", [f"data.source={d / 'docs.jsonl'}", "tokenizer.vocab_size=300", "model.depth=1",
                               "model.n_embd=64", "model.n_head=2", "model.block_size=96", "pretrain.steps=100",
                               "pretrain.batch_size=16", "pretrain.seq_len=32", "pretrain.lr=0.03",
                               "pretrain.warmup_steps=5", "pretrain.eval_every=0", "pretrain.ckpt_every=0",
                               "pretrain.progress=false"])
    run_pretrain(cfg, d / "run")
    # one task per label; every task asks the same questions, so 0-shot prompts are identical across tasks
    rows = [{"task": lab, "context": f"{q} =", "choices": [" " + x for x in LABELS], "gold": LABELS.index(lab)}
            for lab in LABELS for q in "abcdefgh"]
    with open(d / "task.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return d


@pytest.mark.slow
def test_few_shot_beats_zero_shot_when_only_the_shots_carry_the_answer(pattern_run):
    from chatfactory.store.load import load_model

    model, _ = load_model(pattern_run / "run" / "pretrain")
    tok = Tokenizer.load(pattern_run / "run" / "tokenizer.json")
    table = few_shot_table(model, tok, load_task(pattern_run / "task.jsonl"), shots=(0, 1, 4))
    mean = {k: sum(t[k]["acc"] for t in table.values()) / len(table) for k in (0, 1, 4)}
    # 0-shot: the prompt is the same for every task, so exactly one task in four is right per question
    assert mean[0] == pytest.approx(1 / len(LABELS))
    # with shots drawn from the task's own rows the label is in the prompt; the model copies it
    assert mean[1] >= 0.9 and mean[4] >= 0.9, table

    # the same questions as cloze rows: scored by greedy match of the answer, and by generation
    cloze = [{"task": lab, "context": f"{q} =", "answer": lab} for lab in LABELS for q in "abcd"]
    for mode in ("ll", "gen"):
        t = few_shot_table(model, tok, cloze, shots=(0, 2), mode=mode)
        acc = {k: sum(v[k]["acc"] for v in t.values()) / len(t) for k in (0, 2)}
        assert acc[0] <= 1 / len(LABELS) + 1e-9 and acc[2] >= 0.9, (mode, t)


@pytest.mark.slow
def test_eval_cli_prints_table_and_writes_json(pattern_run, tmp_path):
    run = pattern_run / "run"
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"text": d}) + "\n" for d in _pattern_docs(20, seed=1)))
    out = tmp_path / "res.json"
    assert cli_main(["eval", "--run", str(run), "--task", str(pattern_run / "task.jsonl"), "--shots", "0,2",
                     "--text", str(val), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["chat"] is False and res["stage"] == "pretrain"
    t = res["tasks"][str(pattern_run / "task.jsonl")]
    assert set(t) == set(LABELS) and set(t["red"]) == {"0", "2"}
    assert sum(v["2"]["acc"] for v in t.values()) / 4 >= 0.9
    # the trained model knows the pattern: well under the uniform model's log2(V) bits per token
    assert res["text"][str(val)]["loss"] < 0.5 * math.log(300)
    assert cli_main(["eval", "--run", str(run), "--task", str(val)]) == 2  # not a task file: a clear error
    assert cli_main(["eval", "--run", str(run), "--shots", "0,x", "--task", str(pattern_run / "task.jsonl")]) == 2


def test_lm_eval_task_yaml_checks_the_file(tmp_path):
    from chatfactory.eval.fewshot import lm_eval_task_yaml

    p = tmp_path / "t.jsonl"
    p.write_text('{"context": "a", "choices": ["x", "y"], "label": 1}\n')
    y = lm_eval_task_yaml(p, "mine")
    assert "doc_to_target: label" in y and 'target_delimiter: " "' in y and str(p) in y
    p.write_text('{"context": "a", "choices": [" x", "y"], "gold": 1}\n')
    with pytest.raises(ValueError, match="delimiter"):
        lm_eval_task_yaml(p, "mine")


@pytest.mark.slow
def test_lm_eval_local_completions_against_our_server_matches_chatfactory_eval(pattern_run, tmp_path, serve_run):
    """EleutherAI's lm-eval, model local-completions pointed at our OpenAI-compatible server (with the
    exported tokenizer), scores a local task file: same accuracy and per-choice log-likelihoods as ours."""
    import os
    import subprocess
    import sys

    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval's API models need it
    from chatfactory.eval.fewshot import lm_eval_task_yaml
    from chatfactory.store.load import load_model

    run = pattern_run / "run"
    rng = random.Random(3)  # rows with 0, 1 or 2 hints in the context: accuracy well between chance and 1
    rows = []
    for _ in range(24):
        lab, hints = rng.choice(LABELS), rng.randint(0, 2)
        ctx = "".join(f"{rng.choice('abcdefgh')} = {lab}\n\n" for _ in range(hints)) + f"{rng.choice('abcdefgh')} ="
        rows.append({"context": ctx, "choices": [" " + x for x in LABELS], "gold": LABELS.index(lab)})
    task = tmp_path / "pattern.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "cf_pattern.yaml").write_text(lm_eval_task_yaml(task, "cf_pattern"))
    assert cli_main(["export", "--run", str(run), "--stage", "pretrain", "--to", str(tmp_path / "hf")]) == 0

    model, _ = load_model(run / "pretrain")
    tok = Tokenizer.load(run / "tokenizer.json")
    ours = few_shot_table(model, tok, load_task(task), shots=(0,))["all"][0]
    assert 0.4 < ours["acc"] < 1.0, ours  # a task that can tell scorers apart

    url, svc, _ = serve_run(run, "pretrain")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    args = f"model={svc.name},base_url={url}/v1/completions,tokenizer_backend=huggingface," \
           f"tokenizer={tmp_path / 'hf'},num_concurrent=1,max_retries=1"
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
                           "--tasks", "cf_pattern", "--include_path", str(tmp_path / "tasks"),
                           "--output_path", str(tmp_path / "out"), "--log_samples"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["cf_pattern"]
    assert res["acc,none"] == pytest.approx(ours["acc"], abs=1e-9)
    assert res["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-9)
    # and every choice's log-likelihood agrees
    from chatfactory.eval.fewshot import request_pairs, task_rows_from

    norm = task_rows_from(rows)
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_*.jsonl")).read_text().splitlines()]
    assert len(samples) == len(rows)
    for s in samples:
        theirs = [float(r[0][0]) for r in s["resps"]]
        mine = [ll for ll, _ in score_continuations(model, request_pairs(tok, norm[s["doc_id"]], [], chat=False))]
        assert max(abs(a - b) for a, b in zip(theirs, mine)) < 1e-4, (theirs, mine)


def test_win_rate_cli_and_reward_model_judge(tmp_path, tok):
    from chatfactory.eval.winrate import load_judge
    from chatfactory.store.checkpoint import save_checkpoint, unique_state_dict
    from chatfactory.train.reward import RewardModel

    torch.manual_seed(0)
    cfg = GPTConfig(depth=1, vocab_size=tok.vocab_size, block_size=64, n_embd=64, init_std=0.3)
    run = tmp_path / "run"
    tok.save(run / "tokenizer.json")
    for stage in ("sft", "ppo"):
        save_checkpoint(run / stage, unique_state_dict(GPT(cfg)), {"model": cfg.to_dict()})
    rm = RewardModel(cfg).eval()
    save_checkpoint(run / "reward", unique_state_dict(rm), {"model": cfg.to_dict(), "kind": "reward"})
    row = {"messages": [{"role": "user", "content": "what is 2 + 2?"}]}
    judge = load_judge(str(run / "reward"), tok)
    ids = tok.render_chat(row["messages"] + [{"role": "assistant", "content": "4"}])[0]
    with torch.no_grad():
        want = rm.score(torch.tensor([ids]), torch.tensor([len(ids) - 1])).item()
    assert judge(row, "4") == pytest.approx(want, abs=1e-5) and judge(row, "4") != judge(row, "5")

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q {i}"}]}) + "\n"
                               for i in range(3)))
    out = tmp_path / "wr.json"
    args = ["eval", "--run", str(run), "--stage", "ppo", "--prompts", str(prompts), "--max-tokens", "6",
            "--json", str(out)]
    assert cli_main(args + ["--against", "ppo", "--judge", str(run / "reward")]) == 0
    wr = json.loads(out.read_text())["win_rate"]
    assert (wr["ties"], wr["win_rate"], wr["n"]) == (3, 0.5, 3)  # a model against itself only ties
    assert cli_main(args + ["--against", "sft", "--judge", "chatfactory.data.tasks:rubric_score"]) == 0
    wr = json.loads(out.read_text())["win_rate"]
    assert wr["wins"] + wr["ties"] + wr["losses"] == 3 and wr["judge"].endswith("rubric_score")
    assert cli_main(args + ["--against", "sft"]) == 2  # no judge: a clear error
    assert cli_main(args + ["--against", "sft", "--judge", "nomodule:nofn"]) == 2


def test_dev_scores_judge_a_policy_against_sft_and_choose_on_dev(tmp_path, tok):
    """eval/heldout.py on the dev split: a policy (a stage of the run or a model in memory) answers the
    dev prompts; the rubric gives accuracy, gold score and win rate vs SFT (whose replies are cached);
    choose_on_dev picks the best candidate and says what it chose."""
    from chatfactory.config import load_config
    from chatfactory.data.tasks import task_rows
    from chatfactory.eval.heldout import dev_scores
    from chatfactory.store.checkpoint import save_checkpoint, unique_state_dict
    from chatfactory.train.selection import choose_on_dev

    torch.manual_seed(0)
    gcfg = GPTConfig(depth=1, vocab_size=tok.vocab_size, block_size=64, n_embd=64, init_std=0.3)
    run = tmp_path / "run"
    tok.save(run / "tokenizer.json")
    sft = GPT(gcfg)
    save_checkpoint(run / "sft", unique_state_dict(sft), {"model": gcfg.to_dict(), "finished": True})
    (run / "tasks").mkdir()
    (run / "tasks" / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task_rows("dev", 6)))
    cfg = load_config("tiny", ["pipeline.eval_max_tokens=6"])

    own = dev_scores(cfg, run, "sft")
    assert own["n"] == 6 and own["win_rate_vs_sft"] == 0.5 and own["wins_ties_losses"] == [0, 6, 0]
    assert (run / "eval" / "dev" / "sft.json").exists()  # SFT's replies, sampled once
    other = GPT(gcfg)
    other.train()
    theirs = dev_scores(cfg, run, other, n=4)
    assert theirs["n"] == sum(theirs["wins_ties_losses"]) == 4 and other.training  # its mode restored
    wins, ties, _ = theirs["wins_ties_losses"]
    assert theirs["win_rate_vs_sft"] == (wins + 0.5 * ties) / 4  # counted against SFT's cached replies, ties half
    assert set(theirs) >= {"accuracy", "gold_score", "accuracy_by_task"}

    a, b = dict(own, gold_score=0.4), dict(own, gold_score=0.6)
    pick = choose_on_dev("ppo iteration", {"10": a, "20": b, "30": dict(b)})
    assert pick["chose"] == "20" and pick["by"] == "gold_score" and pick["n"] == 6  # a tie: the first listed
    assert list(pick["candidates"]) == ["10", "20", "30"] and pick["candidates"]["20"]["gold_score"] == 0.6
    with pytest.raises(ValueError, match="no candidates"):
        choose_on_dev("beta", {})


# ---------------------------------------------------------------- per language (the bilingual embedded tasks)
def _bilingual_rows():
    from chatfactory.data import tasks

    return [r for r in tasks.task_rows("heldout", 8) if r["task"] in ("arithmetic", "compare", "decline", "sort")][:4]


def test_heldout_figures_per_language_by_hand():
    """eval/heldout.by_language splits one policy's scores by the prompt's language and counts its win
    rate against SFT's replies to the same prompts, ties half."""
    from chatfactory.eval.heldout import by_language, score_replies

    rows = _bilingual_rows()  # en, zh, en, zh
    assert [r["lang"] for r in rows] == ["en", "zh", "en", "zh"]
    mine = [rows[0]["reference"], rows[1]["reference"], "wrong", rows[3]["reference"]]
    sft = [rows[0]["reference"], "错", rows[2]["reference"], "错"]
    res = score_replies(rows, mine)
    res["replies"] = mine
    got = by_language(rows, res, sft)
    assert set(got) == {"en", "zh"} and got["en"]["n"] == got["zh"]["n"] == 2
    assert got["en"]["accuracy"] == 0.5 and got["zh"]["accuracy"] == 1.0
    assert got["zh"]["gold_score"] == 1.0 and got["en"]["gold_score"] == pytest.approx((1.0 + res["scores"][2]) / 2)
    assert got["en"]["win_rate_vs_sft"] == 0.25 and got["zh"]["win_rate_vs_sft"] == 1.0  # en: a tie and a loss
    assert "win_rate_vs_sft" not in by_language(rows, res)["en"]


def test_tokenizer_chars_per_token_on_chinese_and_english():
    """Trained on bilingual task text, the byte-level BPE merges Chinese characters: more than one
    character a token on held-out Chinese text (raw UTF-8 bytes would give 1/3), English above 2."""
    from chatfactory.data import tasks
    from chatfactory.eval.heldout import chars_per_token

    train = ["\n".join(r["messages"][-1]["content"] + "\n" + r["reference"] for r in tasks.task_rows("sft", 3000))]
    bpe = Tokenizer.train(train * 3, vocab_size=800)
    rows = tasks.task_rows("heldout", 400)
    got = chars_per_token(bpe, rows)
    zh_chars = sum(len("\n".join([m["content"] for m in r["messages"]] + [r["reference"]]))
                   for r in rows if r["lang"] == "zh")
    assert got["zh"]["chars"] == zh_chars and got["zh"]["chars_per_token"] == zh_chars / got["zh"]["tokens"]
    assert got["zh"]["chars_per_token"] > 1.0 and got["en"]["chars_per_token"] > 2.0
    # the same text through the bytes alone (no merges): a Chinese character is three tokens
    raw = Tokenizer.train(["ab"], vocab_size=270)
    assert chars_per_token(raw, rows)["zh"]["chars_per_token"] < 0.6


def test_report_has_the_per_language_table(tmp_path, tok):
    """report.json's "by_language" and report.md's "By language" tables: held-out accuracy, gold and win
    rate per language for each model, the reward model's accuracy per language, chars per token."""
    from chatfactory.eval.heldout import by_language, chars_per_token, score_replies
    from chatfactory.eval.report import build_json, write_markdown

    rows = _bilingual_rows()
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok.save(tmp_path / "tokenizer.json")
    evals = {}
    for stage, replies in (("sft", [r["reference"] for r in rows]), ("ppo", ["no", rows[1]["reference"], "no", "不"])):
        e = score_replies(rows, replies)
        e.update(replies=replies, heldout_accuracy=e.pop("accuracy"))
        e["by_language"] = by_language(rows, e, evals["sft"]["replies"] if evals else None)
        evals[stage] = e
    reward = {"status": "done", "heldout": {"accuracy": 0.8, "pairs": 10, "own_sample_accuracy": 0.7,
                                            "own_sample_pairs": 6,
                                            "by_language": {"en": {"pairs": 6, "accuracy": 5 / 6},
                                                            "zh": {"pairs": 4, "accuracy": 0.75}}}}
    rep = build_json(tmp_path, {"stages": {"reward": reward}}, evals)
    bl = rep["by_language"]
    assert bl["langs"] == ["en", "zh"] and bl["reward"]["zh"] == {"pairs": 4, "accuracy": 0.75}
    assert bl["heldout"]["ppo"]["en"]["accuracy"] == 0.0 and bl["heldout"]["ppo"]["zh"]["accuracy"] == 0.5
    assert bl["heldout"]["ppo"]["zh"]["win_rate_vs_sft"] == 0.25
    assert bl["tokenizer"] == chars_per_token(tok, rows)  # the held-out prompts' text through the run's tokenizer
    md = write_markdown(tmp_path, rep, evals, {}, 4, "rubric")
    assert "## By language" in md
    assert "| model | accuracy en | accuracy zh | gold en | gold zh | win rate vs SFT en | win rate vs SFT zh |" in md
    assert "| ppo | 0.000 | 0.500 |" in md and "| sft | 1.000 | 1.000 | 1.000 | 1.000 | — | — |" in md
    assert "| reward model: held-out pairwise accuracy (pairs) | 0.833 (6) | 0.750 (4) |" in md
    cpt = bl["tokenizer"]
    assert (f"| tokenizer: characters per token | {cpt['en']['chars_per_token']:.2f} | "
            f"{cpt['zh']['chars_per_token']:.2f} |") in md
    assert "| held-out prompts | 2 | 2 |" in md
