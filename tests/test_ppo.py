"""PPO: the math against hand-computed cases, rollout padding, the first-minibatch identities, and
learning on a tiny model whose gold rule is "the answer says blue" (the SFT policy says it ~1/4 of the
time: the ``world`` fixture, tests/builders/rl_world.py)."""

import json
import math
import sys

import pytest
import torch

from builders.rl_world import first_micro_batch, gold, policy_kl, ppo_config, train_reward_model
from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.store.load import load_model
from chatfactory.train.meters import read_metrics
from chatfactory.train.ppo import PPO, gae, masked_whiten, run_ppo, token_rewards
from chatfactory.train.rl import RLStage
from chatfactory.train.rl_loss import kl_k1, kl_k3, masked_mean
from chatfactory.train.rl_models import ActorCritic, Reward
from chatfactory.train.rollout import answer_logprobs, forward_answers, pad_batch
from chatfactory.train.selection import gold_score
from conftest import cli_cmd


# ---------------------------------------------------------------- hand-computed math
def test_gae_hand_computed():
    r = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 7.0]])
    v = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.6, 9.0]])
    m = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[0.325, 0.45, 0.7], [0.4, -0.6, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.425, 0.65, 1.0], [0.8, 0.0, 0.0]]), atol=1e-6)
    # lambda = 1: advantages are discounted returns minus values
    adv, _ = gae(r[:1], v[:1], m[:1], gamma=0.9, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.81 - 0.1, 0.9 - 0.2, 1.0 - 0.3]]), atol=1e-6)


def test_masked_whitening_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    s = math.sqrt(1.25)  # the variance of 1, 2, 3, 4
    want = torch.tensor([[-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0.0, 0.0]])
    assert torch.allclose(masked_whiten(x, m), want, atol=1e-5)


def test_kl_estimators_signs_and_expectations():
    half, quarter = torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))
    assert kl_k1(half, quarter).item() == pytest.approx(math.log(2))  # pi above ref: positive
    assert kl_k1(quarter, half).item() == pytest.approx(-math.log(2))  # a single k1 term can be negative
    assert kl_k3(half, quarter).item() == pytest.approx(-0.5 + math.log(2))
    assert kl_k3(quarter, half).item() == pytest.approx(1 - math.log(2))  # k3 never is
    # both are unbiased: their expectation under pi is KL(pi || ref)
    pi, ref = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    kl = (pi * (pi / ref).log()).sum()
    assert (pi * kl_k1(pi.log(), ref.log())).sum().item() == pytest.approx(kl.item(), abs=1e-6)
    assert (pi * kl_k3(pi.log(), ref.log())).sum().item() == pytest.approx(kl.item(), abs=1e-6)


def test_reward_lands_on_last_real_token():
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    r = token_rewards(torch.tensor([2.0, -1.0]), torch.ones(2, 3), m, kl_coef=0.1)
    assert torch.allclose(r, torch.tensor([[-0.1, -0.1, 1.9], [-1.1, 0.0, 0.0]]))


def test_clipped_losses_hand_computed():
    from chatfactory.train.ppo import adapt_kl_coef, policy_loss, value_loss

    m = torch.tensor([[1.0, 1.0, 0.0]])
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 9.0]]))  # ratios 1.5 and 0.5 (the pad's is ignored)
    adv = torch.tensor([[1.0, 1.0, 5.0]])
    loss, st = policy_loss(logp, old, adv, m, clip=0.2)
    # token 1: min(1.5, 1.2) * 1 -> 1.2 (clipped); token 2: min(0.5, 0.8) -> 0.5 (not clipped: pessimistic)
    assert masked_mean(loss, m).item() == pytest.approx(-(1.2 + 0.5) / 2)
    assert st["clipfrac"].item() == pytest.approx(0.5)
    v, old_v, ret = torch.tensor([[1.0, -1.0, 7.0]]), torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[2.0, 0.0, 0.0]])
    vl, vst = value_loss(v, old_v, ret, m, vf_clip=0.5)
    # token 1: max((1-2)^2, (0.5-2)^2) = 2.25; token 2: max((-1)^2, (-0.5)^2) = 1
    assert masked_mean(vl, m).item() == pytest.approx(0.5 * (2.25 + 1.0) / 2)
    assert vst["vf_clipfrac"].item() == pytest.approx(0.5)
    # the adaptive controller moves beta by at most 20% x n / horizon toward the target
    assert adapt_kl_coef(0.1, kl=12.0, target=6.0, horizon=100, n=50) == pytest.approx(0.1 * 1.1)
    assert adapt_kl_coef(0.1, kl=3.0, target=6.0, horizon=100, n=50) == pytest.approx(0.1 * 0.9)


# ---------------------------------------------------------------- padding
@pytest.mark.parametrize("flavour", ["modern", "gpt2"])
def test_padded_and_unpadded_logprobs_equal(flavour):
    torch.manual_seed(0)
    model = GPT(GPTConfig(flavour=flavour, depth=2, n_embd=64, head_dim=32, vocab_size=97, block_size=32)).eval()
    prompts = [[1, 5, 9, 11, 13, 40], [1, 7], [1, 3, 3, 8]]
    answers = [[20, 21], [30, 31, 32, 33, 4], [50]]
    full = pad_batch(prompts, answers, pad_id=96, end_id=4)
    assert full["tokens"][1, :4].eq(96).all() and full["tokens"][2, 6 + 1:].eq(96).all()  # left / right pads
    assert full["last"].tolist() == [7, 10, 6] and full["ended"].tolist() == [False, True, False]
    with torch.no_grad():
        lp = answer_logprobs(forward_answers(model, full), full["tokens"], full["start"], 0.7)
        for i in range(3):
            one = pad_batch([prompts[i]], [answers[i]], 96, 4)
            lp1 = answer_logprobs(forward_answers(model, one), one["tokens"], one["start"], 0.7)[0]
            assert torch.allclose(lp[i, :len(answers[i])], lp1, atol=1e-5), i
    # the temperature matters: a different one gives different log-probs
    lp_t1 = answer_logprobs(forward_answers(model, full), full["tokens"], full["start"], 1.0)
    assert not torch.allclose(lp_t1 * full["answer_mask"], lp * full["answer_mask"], atol=1e-3)


# ---------------------------------------------------------------- the tiny world (builders/rl_world.py)
def test_first_minibatch_ratio_is_one(world):
    root, run, tok = world
    cfg = ppo_config(root, reward="rl_gold:score", critic_from="sft")
    from chatfactory.data.preferences import load_prompts

    policy, info = load_model(run / "sft")
    ref = load_model(run / "sft")[0]
    from chatfactory.train.reward import RewardModel

    ac = ActorCritic(policy, RewardModel(load_model(run / "sft")[0]))
    stage = RLStage("ppo", cfg.ppo, PPO(cfg.ppo), tok, load_prompts(cfg.ppo.prompts), ac, ref,
                    Reward("rl_gold:score", run, tok, "cpu"), info["model"])
    batch, exp, log = first_micro_batch(stage)
    # advantages are whitened over real tokens of the whole rollout
    m = exp["answer_mask"]
    assert abs(exp["advantages"][m].mean().item()) < 1e-5 and exp["advantages"][~m].abs().max().item() == 0
    # the policy is the reference: the KL penalty is exactly zero (any host: the same forward on the same weights)
    assert exp["old_logp"].equal(exp["ref_logp"])
    stage.algo.loss(ac, batch, log)
    s = log.updates[0]
    assert s["ratio"] == 1.0 and s["approx_kl"] == 0.0 and s["clipfrac"] == 0.0  # exp(0): the same forward twice


def test_ptx_mixes_in_the_pretraining_loss(world):
    """PPO-ptx: the loss is the PPO loss plus ptx_coef times next-token loss on pretraining text."""
    from chatfactory.data.preferences import load_prompts
    from chatfactory.train.reward import RewardModel

    root, run, tok = world

    class Text:  # a stand-in for PretrainBatches: one fixed window of text
        def micro_batch(self, step, micro, grad_accum, batch_size, rank, world):
            ids = torch.tensor([tok.encode("Pick a color for the car. red blue green")])
            return ids[:, :-1], ids[:, 1:]

    losses = []
    for coef in (0.0, 2.0):
        cfg = ppo_config(root, ptx_coef=coef)
        policy, info = load_model(run / "sft")
        torch.manual_seed(0)  # the critic's head: the same in both
        ac = ActorCritic(policy, RewardModel(load_model(run / "sft")[0]))
        stage = RLStage("ppo", cfg.ppo, PPO(cfg.ppo), tok, load_prompts(cfg.ppo.prompts), ac,
                        load_model(run / "sft")[0], Reward("zero", run, tok, "cpu"), info["model"],
                        ptx=Text() if coef else None)
        batch, _, log = first_micro_batch(stage)
        losses.append(stage.algo.loss(ac, batch, log).item())
    x, y = Text().micro_batch(0, 0, 1, 1, 0, 1)
    lm = load_model(run / "sft")[0](x, targets=y).item()
    assert log.updates[0]["ptx_loss"] == pytest.approx(lm, rel=1e-5)
    assert losses[1] - losses[0] == pytest.approx(2.0 * lm, rel=1e-4)


def test_bad_inputs_name_what_is_wrong(world, tmp_path):
    from chatfactory.formats.jsonl import DataError

    root, run, tok = world
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
                   + '{"messages": [{"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        run_ppo(ppo_config(root, prompts=str(bad), reward="zero", critic_from="sft"), run)
    with pytest.raises(ValueError, match="no_such_module"):
        run_ppo(ppo_config(root, reward="no_such_module:score", critic_from="sft"), run)
    (root / "rl_nan.py").write_text("def score(row, answer):\n    return float('nan')\n")
    with pytest.raises(ValueError, match="rl_nan:score.*finite"):
        run_ppo(ppo_config(root, reward="rl_nan:score", init_from=str(run / "sft"), critic_from=str(run / "sft")),
                tmp_path / "nan")
    assert not (tmp_path / "nan" / "ppo" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="ppo.prompts is not set"):
        run_ppo(ppo_config(root, prompts=""), run)
    assert not (run / "ppo").exists()  # nothing was written for any of these


@pytest.mark.slow
def test_ppo_learned_reward_raises_gold_while_zero_reward_stays(world):
    root, run, tok = world
    from chatfactory.data.preferences import load_prompts

    res = train_reward_model(root, run, tok)
    assert res["val_accuracy"] >= 0.85
    held = load_prompts(str(root / "heldout.jsonl")) * 4
    sft = load_model(run / "sft")[0]
    before = gold_score(sft, tok, held, gold, max_new_tokens=6, seed=1)

    res = run_ppo(ppo_config(root), run)
    ppo = load_model(run / "ppo")[0]
    after = gold_score(ppo, tok, held, gold, max_new_tokens=6, seed=1)
    kl = policy_kl(ppo, sft, tok, held)
    print(f"PPO on the learned reward: gold {before:.3f} -> {after:.3f}, KL(ppo || sft) {kl:.3f} nats/answer; {res}")
    assert before < 0.5 and after > before + 0.3
    assert 0.05 < kl < 10.0  # it moved, but the penalty bounds how far
    assert res["end_rate"] >= 0.8  # and it did not learn to ramble past the end
    assert res["logp_mismatch_max"] < 1e-4  # it trained on the distribution it sampled from

    # the same PPO with the reward replaced by zero: nothing to gain, so the policy stays put
    cfg = ppo_config(root, reward="zero", init_from=str(run / "sft"), critic_from=str(run / "reward"))
    run_ppo(cfg, root / "zero")
    still = load_model(root / "zero" / "ppo")[0]
    kl0, gold0 = policy_kl(still, sft, tok, held), gold_score(still, tok, held, gold, max_new_tokens=6, seed=1)
    print(f"PPO on a zero reward: gold {before:.3f} -> {gold0:.3f}, KL {kl0:.4f}")
    assert kl0 < 0.05 and kl0 < kl / 10 and abs(gold0 - before) < 0.15


@pytest.mark.slow
def test_ppo_resume_is_exact(world, tmp_path):
    """Two iterations, then two more on re-running (the critic and adaptive beta restored from
    state.pt) end with the same policy as four uninterrupted iterations."""
    root, run, tok = world
    kw = dict(reward="rl_gold:score", init_from=str(run / "sft"), critic_from=str(run / "sft"), adaptive_kl=True,
              target_kl=0.5, kl_horizon=100, rollout_batch=8, ckpt_every=1, max_new_tokens=4, ppo_epochs=1)
    run_ppo(ppo_config(root, steps=4, **kw), tmp_path / "a")
    run_ppo(ppo_config(root, steps=2, **kw), tmp_path / "b")
    state = torch.load(tmp_path / "b" / "ppo" / "state.pt", weights_only=True)
    assert "critic" in state and state["kl_coef"] != 0.1  # beta adapted and saved
    run_ppo(ppo_config(root, steps=4, **kw), tmp_path / "b")
    wa, _ = load_model(tmp_path / "a" / "ppo")
    wb, info = load_model(tmp_path / "b" / "ppo")
    assert info["stage"] == "ppo" and info["step"] == 4 * 2
    for (k, a), b in zip(wa.state_dict().items(), wb.state_dict().values()):
        assert torch.equal(a, b), k  # bitwise, same host: the resume repeats the uninterrupted run's operations
    sa = torch.load(tmp_path / "a" / "ppo" / "state.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "ppo" / "state.pt", weights_only=True)
    assert sa["kl_coef"] == sb["kl_coef"]
    assert all(torch.equal(sa["critic"][k], sb["critic"][k]) for k in sa["critic"])


def _env(root):
    import os

    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_rlhf_rounds_cli(world, tmp_path):
    """`chatfactory rlhf --rounds 2`: comparisons from the current policy -> reward model -> PPO, twice;
    round 2 samples from round 1's policy and its reward model sees both rounds' comparisons."""
    import shutil
    import subprocess

    root, run, tok = world
    r = tmp_path / "r"
    r.mkdir()
    shutil.copytree(run / "sft", r / "sft")
    shutil.copy(run / "tokenizer.json", r / "tokenizer.json")
    args = ["rlhf", "--out", r, "--rounds", 2, "--k", 4, "--prompts", root / "prompts.jsonl",
            "comparisons.labeler=rl_gold:score", "comparisons.max_tokens=6",
            "reward.steps=6", "reward.batch_size=8", "reward.seq_len=32", "reward.lr=3e-3", "reward.eval_every=0",
            "reward.progress=false", "reward.device=cpu", "ppo.steps=2", "ppo.rollout_batch=8", "ppo.max_new_tokens=6",
            "ppo.ppo_epochs=1", "ppo.minibatches=2", "ppo.lr=3e-4", "ppo.progress=false", "ppo.device=cpu",
            "ppo.eval_every=0"]
    out = subprocess.run(cli_cmd(*args), capture_output=True, text=True, env=_env(root), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for n in (1, 2):
        d = r / "rlhf" / f"round{n}"
        assert (d / "comparisons.jsonl").stat().st_size > 0
        assert json.loads((d / "reward" / "config.json").read_text())["kind"] == "reward"
        assert json.loads((d / "ppo" / "config.json").read_text())["finished"]
    # round 2's reward model trained on both rounds' pairs; its PPO started from round 1's policy
    import re

    n1 = sum(1 for _ in open(r / "rlhf" / "round1" / "comparisons.jsonl"))
    n2 = sum(1 for _ in open(r / "rlhf" / "round2" / "comparisons.jsonl"))
    round2 = out.stdout.split("rlhf round 1/2")[1]
    train, held = map(int, re.search(r"reward: (\d+) train pairs, (\d+) held out", round2).groups())
    assert train + held == n1 + n2
    assert f"policy from {(r / 'rlhf' / 'round1' / 'ppo').resolve()}" in round2
    # running it again finds everything finished and trains nothing
    again = subprocess.run(cli_cmd(*args), capture_output=True, text=True, env=_env(root), timeout=600)
    assert again.returncode == 0 and "ppo:" not in again.stdout.replace("rlhf", ""), again.stdout[-2000:]


@pytest.mark.slow
def test_ppo_under_torchrun(world, tmp_path):
    """Two gloo processes, each rolling out its own prompts; the same command as one process."""
    import subprocess

    root, run, tok = world
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "chatfactory.cli", "ppo",
           "--out", str(tmp_path), f"ppo.init_from={run / 'sft'}", "ppo.reward=rl_gold:score",
           f"ppo.critic_from={run / 'sft'}", f"ppo.prompts={root / 'prompts.jsonl'}", "ppo.steps=2",
           "ppo.rollout_batch=4", "ppo.max_new_tokens=4", "ppo.minibatches=2", "ppo.ppo_epochs=1",
           "ppo.progress=false", "ppo.device=cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**_env(root), "OMP_NUM_THREADS": "1"}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    policy, info = load_model(tmp_path / "ppo")
    assert info["finished"] and info["step"] == 2 * 2
    rows = [json.loads(line) for line in open(tmp_path / "ppo" / "metrics.jsonl")]
    assert [r["iteration"] for r in rows if "iteration" in r] == [1, 2]
    # every iteration measures the rollouts' log-probs against the trainer's (both ranks' tokens): round-off
    assert all(r["logp_mismatch_max"] < 1e-4 for r in rows if "iteration" in r)


@pytest.mark.slow
def test_ppo_resumes_exactly_after_sigkill(world, tmp_path):
    """`chatfactory ppo` killed with SIGKILL mid-run, then run again, ends with the same policy as an
    uninterrupted run (checkpoints fall on iteration boundaries; a rollout is a function of the weights
    and the seed)."""
    import signal
    import subprocess
    import time

    root, run, tok = world
    over = dict(reward="rl_gold:score", init_from=str(run / "sft"), critic_from=str(run / "sft"), steps=6,
                rollout_batch=8, max_new_tokens=4, ppo_epochs=1, minibatches=2, ckpt_every=1)
    run_ppo(ppo_config(root, **over), tmp_path / "whole")
    base = {k: v for k, v in vars(ppo_config(root, **over).ppo).items()}
    args = ["ppo", "--out", tmp_path / "killed"] + [f"ppo.{k}={v}" for k, v in base.items()]
    proc = subprocess.Popen(cli_cmd(*args), env=_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cfg_json = tmp_path / "killed" / "ppo" / "config.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if cfg_json.exists() and json.loads(cfg_json.read_text() or "{}").get("step", 0) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    out = subprocess.run(cli_cmd(*args), env=_env(root), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "resuming from step" in out.stdout, out.stderr[-2000:]
    a, b = load_model(tmp_path / "whole" / "ppo")[0], load_model(tmp_path / "killed" / "ppo")[0]
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k  # bitwise, same host: two processes, the same operations
    iters = [r["iteration"] for r in map(json.loads, open(tmp_path / "killed" / "ppo" / "metrics.jsonl"))
             if "iteration" in r]
    assert iters == list(range(1, 7))  # no iteration logged twice or lost


@pytest.mark.slow
def test_keep_best_keeps_the_iteration_that_scored_best_on_dev(world, tmp_path):
    """keep_best: the stage ends with the policy of the iteration whose gold score on eval_prompts was
    highest, not the last one. Here the "dev" judge prefers answers WITHOUT blue while the reward pays
    for blue, so dev's gold falls as PPO learns: the kept policy must be an early iteration's, bit for bit
    the policy of a run stopped there, and the choice is recorded for the report."""
    root, run, tok = world
    (root / "rl_not_blue.py").write_text("def score(row, answer):\n    return float('blue' not in answer)\n")
    kw = dict(reward="rl_gold:score", init_from=str(run / "sft"), critic_from=str(run / "sft"), rollout_batch=8,
              max_new_tokens=4, ppo_epochs=1, eval_prompts=str(root / "heldout.jsonl"), gold="rl_not_blue:score",
              eval_every=1, eval_rows=8, ckpt_every=1, lr=1e-3)
    res = run_ppo(ppo_config(root, steps=5, keep_best=True, **kw), tmp_path / "kept")
    golds = {r["iteration"]: r["gold"] for r in read_metrics(tmp_path / "kept" / "ppo" / "metrics.jsonl")
             if "gold" in r}
    best = max(golds, key=lambda it: (golds[it], -it))  # the earlier of equal scores
    assert golds[best] > golds[5], golds  # the judge disagrees with the reward: the last iteration is not the best
    choice = res["dev_choice"]
    assert choice["what"] == "iteration" and choice["chose"] == str(best) and choice["n"] == 8
    assert {int(k): v["gold_score"] for k, v in choice["candidates"].items()} == pytest.approx(golds, abs=1e-4)
    kept, info = load_model(tmp_path / "kept" / "ppo")
    assert info["finished"] and info["kept_iteration"] == best and info["dev_choice"] == choice
    run_ppo(ppo_config(root, steps=best, **kw), tmp_path / "stopped")  # the same run, stopped at the best iteration
    stopped, _ = load_model(tmp_path / "stopped" / "ppo")
    for (k, a), b in zip(kept.state_dict().items(), stopped.state_dict().values()):
        assert torch.equal(a, b), k  # bitwise, same host: the first iterations of one run are the same operations
    assert run_ppo(ppo_config(root, steps=5, keep_best=True, **kw),
                   tmp_path / "kept")["dev_choice"] == choice  # done: kept
    with pytest.raises(ValueError, match="keep_best=true needs eval_prompts and gold"):
        run_ppo(ppo_config(root, steps=1, keep_best=True, reward="rl_gold:score", init_from=str(run / "sft"),
                           critic_from=str(run / "sft")), tmp_path / "no_dev")
