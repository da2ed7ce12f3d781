"""Terminal chat through a pseudo-terminal (pexpect): a two-turn conversation keeps its history, /clear
forgets it, --prompt answers once; the context-overflow policy drops the oldest turns and says so."""
import subprocess

import pytest
import torch

from chatfactory.inference.chat import ChatSession, last_finished_stage
from chatfactory.inference.engine import Engine
from chatfactory.inference.sampling import SamplingParams
from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.store.checkpoint import save_checkpoint, unique_state_dict
from chatfactory.text.tokenizer import Tokenizer
from conftest import cli_cmd

TEXT = ["the cat sat on the mat and the dog ran in the park with a red ball " * 30,
        "hello how are you today i am fine thank you very much " * 30]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory with a tokenizer and two tiny stages (random weights: the test checks plumbing,
    comparing the CLI's replies with the engine's greedy answers to the same conversations)."""
    root = tmp_path_factory.mktemp("chatrun")
    tok = Tokenizer.train(TEXT, vocab_size=300)
    tok.save(root / "tokenizer.json")
    cfg = GPTConfig(depth=1, n_embd=64, vocab_size=tok.vocab_size, block_size=96)
    for i, stage in enumerate(("pretrain", "sft")):
        torch.manual_seed(i)
        save_checkpoint(root / stage, unique_state_dict(GPT(cfg)),
                        {"stage": stage, "model": cfg.to_dict(), "finished": True})
    return root, tok


def greedy_reply(run_dir, tok, conv, max_tokens=8):
    from chatfactory.store.load import load_model

    model, _ = load_model(run_dir / "sft")
    p = SamplingParams(max_tokens=max_tokens, temperature=0, stop_ids=tuple(tok.special.values()))
    ids = Engine(model).generate([tok.chat_prompt(conv)], p)[0]
    ids = ids[:-1] if ids and ids[-1] in tok.special.values() else ids
    return tok.decode(ids)


def tty(s):  # a pseudo-terminal turns "\n" into "\r\n" and passes every other character through
    return s.replace("\n", "\r\n")


def test_default_stage_is_last_finished(run, tmp_path):
    root, _ = run
    assert last_finished_stage(root) == "sft"
    # a run whose last policy stage is RLOO alone chats with (and samples from) RLOO by default
    import shutil

    from chatfactory.store.checkpoint import latest_stage

    shutil.copytree(root, tmp_path / "r")
    shutil.copytree(tmp_path / "r" / "sft", tmp_path / "r" / "rloo")
    assert last_finished_stage(tmp_path / "r") == "rloo" and latest_stage(tmp_path / "r") == "rloo"


@pytest.mark.slow
def test_two_turn_conversation_and_clear_through_a_pty(run):
    pexpect = pytest.importorskip("pexpect")
    root, tok = run
    u1, u2 = "hello how are you", "the cat sat on the mat"
    first = greedy_reply(root, tok, [{"role": "user", "content": u1}])
    second = greedy_reply(root, tok, [{"role": "user", "content": u1}, {"role": "assistant", "content": first},
                                      {"role": "user", "content": u2}])
    fresh = greedy_reply(root, tok, [{"role": "user", "content": u2}])
    assert second not in fresh and fresh not in second and len(first) >= 3, \
        "prompts whose answer depends on the history"
    cmd = cli_cmd("chat", "--run", root, "--temperature", "0", "--max-tokens", "8")
    child = pexpect.spawn(cmd[0], cmd[1:], encoding="utf-8", codec_errors="replace", timeout=60, dimensions=(50, 400))
    try:
        child.expect("you> ")
        assert "sft" in child.before  # the default stage is announced

        def say(text):
            child.sendline(text)
            child.expect("you> ")
            return child.before.split(text, 1)[-1]  # what followed the echoed input

        out1 = say(u1)
        assert "assistant> " + tty(first) + "\r\n" in out1
        out2 = say(u2)  # the second answer is conditioned on the first turn
        assert "assistant> " + tty(second) + "\r\n" in out2
        hist = say("/history")
        assert hist.count("user: ") == 2 and hist.count("assistant: ") == 2
        assert "conversation cleared" in say("/clear")
        assert "(empty)" in say("/history")
        out3 = say(u2)  # after /clear the same question gets the fresh answer
        assert "assistant> " + tty(fresh) + "\r\n" in out3
        assert "temperature 0.5" in say("/temperature 0.5")
        assert "unknown command" in say("/bogus")
        assert "shorten it" in say("word " * 200)  # longer than the whole context: an error, not the end
        child.sendintr()  # Ctrl-C at the prompt does not end the program
        child.expect("you> ")
        assert "Ctrl-D leaves" in child.before
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


@pytest.mark.slow
def test_prompt_mode_prints_only_the_answer(run):
    root, tok = run
    expect = greedy_reply(root, tok, [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello"}])
    out = subprocess.run(cli_cmd("chat", "--run", root, "--prompt", "hello", "--system", "be kind",
                                 "--temperature", "0", "--max-tokens", "8"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expect + "\n"  # greedy ids in two processes: any host, barring a near tie within round-off
    bad = subprocess.run(cli_cmd("chat", "--run", root / "nowhere", "--prompt", "x"), capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "no trained stage" in bad.stderr


def test_context_overflow_drops_oldest_turns_and_says_so(run):
    root, tok = run
    from chatfactory.store.load import load_model

    model, _ = load_model(root / "sft")
    notes = []
    s = ChatSession(model, tok, SamplingParams(max_tokens=8, temperature=0), system="be kind")
    for i in range(12):  # 96-token context, ~8 reserved for the answer: a few turns fit
        s.reply(f"hello how are you today {i}", note=notes.append)
    assert any("dropped" in n and "system prompt stays" in n for n in notes)
    conv = s.messages()
    assert conv[0] == {"role": "system", "content": "be kind"} and conv[1]["role"] == "user"
    assert conv[-2]["content"] == "hello how are you today 11"
    assert len(tok.chat_prompt(conv[:-1])) <= 96  # what the model saw for the last answer fitted
    assert "today 0" not in str(conv)


@pytest.mark.slow
def test_ctrl_c_stops_a_reply_not_the_program(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    tok = Tokenizer.train(TEXT, vocab_size=300)
    tok.save(tmp_path / "tokenizer.json")
    cfg = GPTConfig(depth=1, n_embd=64, vocab_size=tok.vocab_size, block_size=4096)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():  # never a special token: the reply runs until Ctrl-C (or 4000 tokens)
        model.lm_head.weight[list(tok.special.values())] = 0.0
    save_checkpoint(tmp_path / "sft", unique_state_dict(model),
                    {"stage": "sft", "model": cfg.to_dict(), "finished": True})
    cmd = cli_cmd("chat", "--run", tmp_path, "--temperature", "0", "--max-tokens", "4000")
    # started with SIGINT ignored, as a background job of a non-interactive shell (CI under nohup)
    # starts it: the chat must still stop a reply on Ctrl-C
    cmd = ["bash", "-c", 'trap "" INT; exec "$0" "$@"', *map(str, cmd)]
    child = pexpect.spawn(cmd[0], cmd[1:], encoding="utf-8", codec_errors="replace", timeout=60)
    try:
        child.expect("you> ")
        child.sendline("hello")
        child.expect("assistant> ")
        child.expect(".{20}")  # the reply is streaming
        child.sendintr()
        child.expect(r"\[stopped\]")
        child.expect("you> ")  # still running, ready for the next message
        child.sendline("/history")
        child.expect("you> ")
        assert "user: hello" in child.before and "assistant: " in child.before  # the partial reply is kept
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
