"""GRPO and RLOO: group-normalised and leave-one-out advantages by hand, the KL as a per-token reward
(k1), the rollout/training log-prob mismatch, and learning on the gold rule itself (the tiny world of
builders/rl_world.py: the SFT policy answers "blue" about a quarter of the time)."""


import pytest
import torch

from builders.rl_world import collect, first_micro_batch, gold, policy_kl
from chatfactory.config import Config, GRPOConfig, RLOOConfig
from chatfactory.store.load import load_model
from chatfactory.train.grpo import GRPO, group_advantages, kl_shaped_advantages, run_grpo
from chatfactory.train.rl import RLStage
from chatfactory.train.rl_models import ActorCritic, Reward
from chatfactory.train.rloo import leave_one_out_advantages, run_rloo
from chatfactory.train.selection import gold_score


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(r, group_size=4)
    s = (4 * 0.25 / 3) ** 0.5  # unbiased std of 1, 0, 0, 1
    assert torch.allclose(adv, torch.tensor([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0]), atol=1e-3)
    # without scaling (Dr. GRPO): the mean is still removed, the scale kept
    assert torch.allclose(group_advantages(r, 4, scale=False), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_leave_one_out_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = leave_one_out_advantages(r, group_size=4)
    # answer 0: 1 - mean(0, 0, 1) = 2/3; answer 1: 0 - mean(1, 0, 1) = -2/3; a tied group: 0
    assert torch.allclose(adv, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0]), atol=1e-6)
    # K/(K-1) times GRPO's unscaled advantage
    assert torch.allclose(adv, 4 / 3 * group_advantages(r, 4, scale=False), atol=1e-6)


def test_k1_is_a_per_token_reward_hand_computed():
    """kl_estimator=k1: -beta * k1 on every token and the answer's advantage on its last; a token's
    advantage is the sum from it to the end."""
    adv = torch.tensor([1.0, -1.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    got = kl_shaped_advantages(adv, kl * m, m, kl_coef=0.5)
    # row 0: rewards -0.05, -0.1, -0.15 + 1 -> 0.7, 0.75, 0.85; row 1: -0.25 - 1 on its only token
    assert torch.allclose(got, torch.tensor([[0.7, 0.75, 0.85], [-1.25, 0.0, 0.0]]), atol=1e-6)


def test_k1_kl_is_measured_on_the_sampling_policy_not_a_loss_term(world):
    """With k1 the old log-probs are computed even for one update per rollout (the KL reward needs
    them), the advantages vary along an answer with the KL still to come, and the loss has no KL term."""
    from chatfactory.data.preferences import load_prompts

    root, run, tok = world
    tc = GRPOConfig(prompts=str(root / "prompts.jsonl"), reward="rl_gold:score", rollout_batch=4, group_size=4,
                    max_new_tokens=6, kl_coef=0.5, kl_estimator="k1", seed=5)
    policy, info = load_model(run / "sft")
    ac = ActorCritic(policy)
    ref = load_model(run / "pretrain")[0]  # far from the policy: a large KL
    stage = RLStage("grpo", tc, GRPO(tc), tok, load_prompts(tc.prompts), ac, ref, Reward(tc.reward, run, tok, "cpu"),
                    info["model"])
    batch, exp, log = first_micro_batch(stage)
    assert "old_logp" in batch
    m = exp["answer_mask"]
    kl = (exp["old_logp"] - exp["ref_logp"]) * m
    # along each answer, consecutive advantages differ by exactly beta * k1 of the earlier token
    step = exp["advantages"][:, 1:] - exp["advantages"][:, :-1]
    both = m[:, 1:] & m[:, :-1]
    assert both.any() and torch.allclose(step[both], 0.5 * kl[:, :-1][both], atol=1e-5)
    stage.algo.loss(ac, batch, log)
    assert "kl_loss" not in log.updates[0]


def test_grpo_and_rloo_reject_bad_settings(tmp_path):
    cfg = Config()
    cfg.grpo = GRPOConfig(kl_estimator="k2")
    with pytest.raises(ValueError, match="grpo.kl_estimator"):
        run_grpo(cfg, tmp_path)
    cfg.grpo = GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="grpo.group_size"):
        run_grpo(cfg, tmp_path)
    cfg.rloo = RLOOConfig(group_size=1)
    with pytest.raises(ValueError, match="rloo.group_size"):
        run_rloo(cfg, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_group_baselines_on_the_gold_rule_raise_gold(world, algo):
    """GRPO (run_grpo) and RLOO (`chatfactory rloo`, run in this process), 12 iterations of 8 prompts x 4
    answers, rewarded by the gold rule itself: held-out gold rises by far, the KL to SFT stays bounded."""
    import json

    from chatfactory.cli import main
    from chatfactory.data.preferences import load_prompts

    root, run, tok = world
    held = load_prompts(str(root / "heldout.jsonl")) * 4
    sft = load_model(run / "sft")[0]
    before = gold_score(sft, tok, held, gold, max_new_tokens=6, seed=1)
    settings = dict(prompts=str(root / "prompts.jsonl"), reward="rl_gold:score", steps=12, rollout_batch=8,
                    group_size=4, max_new_tokens=6, lr=3e-4, kl_coef=0.05, ppo_epochs=2, minibatches=2, eval_every=0,
                    ckpt_every=5, progress=False, device="cpu", seed=3, eval_prompts=str(root / "heldout.jsonl"),
                    gold="rl_gold:score")
    if algo == "grpo":
        cfg = Config()
        cfg.grpo = GRPOConfig(**settings)
        res = run_grpo(cfg, run)
    else:
        assert main(["rloo", "--config", "tiny", "--out", str(run),
                     *(f"rloo.{k}={v}" for k, v in settings.items())]) == 0
        res = [r for r in map(json.loads, open(run / "rloo" / "metrics.jsonl")) if "gold" in r][-1]
    policy = load_model(run / algo)[0]
    after = gold_score(policy, tok, held, gold, max_new_tokens=6, seed=1)
    kl = policy_kl(policy, sft, tok, held)
    print(f"{algo} on the gold rule: gold {before:.3f} -> {after:.3f}, KL {kl:.3f}; {res}")
    assert before < 0.5 and after > before + 0.3
    assert kl < 10.0
    assert res["gold"] > before  # the stage's own held-out evaluation agrees


def test_one_update_per_rollout_skips_the_old_logprob_pass(world):
    """With a single update per rollout the old log-probs are the live ones detached: the rollout
    skips that forward pass, and the loss and its gradient are what the explicit old log-probs give."""
    from chatfactory.data.preferences import load_prompts
    from chatfactory.train.rollout import answer_logprobs, forward_answers

    root, run, tok = world
    tc = GRPOConfig(prompts=str(root / "prompts.jsonl"), reward="rl_gold:score", rollout_batch=4, group_size=4,
                    max_new_tokens=6, kl_coef=0.05, seed=5)
    policy, info = load_model(run / "sft")
    ac = ActorCritic(policy)
    stage = RLStage("grpo", tc, GRPO(tc), tok, load_prompts(tc.prompts), ac, load_model(run / "sft")[0],
                    Reward(tc.reward, run, tok, "cpu"), info["model"])
    batch, _, log = first_micro_batch(stage)
    assert "old_logp" not in batch and "ref_logp" in batch
    loss = stage.algo.loss(ac, batch, log)
    loss.backward()
    g1 = [p.grad.clone() for p in ac.parameters()]
    ac.zero_grad()
    with torch.no_grad():
        batch["old_logp"] = (answer_logprobs(forward_answers(policy, batch), batch["tokens"], batch["start"], 1.0)
                             * batch["answer_mask"])
    loss2 = stage.algo.loss(ac, batch, log)
    loss2.backward()
    assert torch.allclose(loss, loss2, atol=1e-6)
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(g1, ac.parameters()))
    assert log.updates[0]["ratio"] == 1.0 and "entropy" in log.updates[0]  # exp(0), any host: one forward, detached


def test_compile_rollout_decodes_with_the_static_step(world):
    """``compile_rollout`` gives the stage one Engine(compile=True) for all its rollouts; its static
    step (run uncompiled here, none of the compile time) samples the eager rollout's tokens."""
    from chatfactory.data.preferences import load_prompts
    from chatfactory.inference.decode_step import DecodeStep

    root, run, tok = world
    batches = []
    for compile_rollout in (False, True):
        tc = GRPOConfig(prompts=str(root / "prompts.jsonl"), reward="rl_gold:score", rollout_batch=4, group_size=4,
                        max_new_tokens=6, kl_coef=0.05, seed=5, compile_rollout=compile_rollout)
        policy, info = load_model(run / "sft")
        policy.train()
        stage = RLStage("grpo", tc, GRPO(tc), tok, load_prompts(tc.prompts), ActorCritic(policy),
                        load_model(run / "sft")[0], Reward(tc.reward, run, tok, "cpu"), info["model"])
        assert (stage.rollouts.engine.compiled is not None) == compile_rollout
        assert policy.training  # making the engine left the policy's mode alone
        if compile_rollout:
            stage.rollouts.engine.compiled = DecodeStep(policy, compile=False)
        batches.append(first_micro_batch(stage)[0])
    # ids, not floats (the static step's logits match the eager step's within round-off): equal on any host
    # unless a draw lands within round-off of the boundary between two tokens' probabilities
    assert torch.equal(batches[0]["tokens"], batches[1]["tokens"])


@pytest.mark.parametrize("updates", [1, 4])
def test_rollout_and_training_logprobs_agree_and_a_gap_warns(world, updates, monkeypatch):
    """Every iteration measures |log pi_rollout - log pi_train| on the sampled tokens: the log-probs the
    engine sampled with (here the static decode step of compile_rollout, run uncompiled) against the
    trainer's forward pass, from the old log-prob pass (several updates) or the loss's own (one). On
    CPU in fp32 they agree to round-off; rollouts from another distribution make it large, and warn."""
    from chatfactory.data.preferences import load_prompts
    from chatfactory.inference.decode_step import DecodeStep
    from chatfactory.train import experience
    from chatfactory.train.loop import Dist

    root, run, tok = world
    tc = GRPOConfig(prompts=str(root / "prompts.jsonl"), reward="rl_gold:score", rollout_batch=4, group_size=4,
                    max_new_tokens=6, kl_coef=0.05, ppo_epochs=updates, seed=5, compile_rollout=True)
    policy, info = load_model(run / "sft")
    policy.train()
    ac = ActorCritic(policy)
    stage = RLStage("grpo", tc, GRPO(tc), tok, load_prompts(tc.prompts), ac, load_model(run / "sft")[0],
                    Reward(tc.reward, run, tok, "cpu"), info["model"])
    stage.rollouts.engine.compiled = DecodeStep(policy, compile=False)

    def iteration(it):
        exp, log = collect(stage, it)
        for micro_batches in stage.rollouts.minibatches(exp, it, 0, 1):
            for batch in micro_batches:  # the updates' losses, no optimizer steps: the weights stay those that sampled
                stage.algo.loss(ac, batch, log)
        return stage.report(log, it + 1, Dist())

    res = iteration(0)
    print(f"{updates} update(s): mismatch mean {res['logp_mismatch_mean']:.1e}, max {res['logp_mismatch_max']:.1e}")
    assert res["logp_mismatch_max"] < 1e-4 and res["logp_mismatch_mean"] < 1e-5
    real = experience.rollout

    def off(*a, **k):  # rollouts that report log-probs 0.1 above what the policy gives their tokens
        batch = real(*a, **k)
        batch["rollout_logp"] = batch["rollout_logp"] + 0.1
        return batch

    monkeypatch.setattr(experience, "rollout", off)
    with pytest.warns(UserWarning, match="log-probs differ from the trainer's by 0.1"):
        res = iteration(1)
    assert res["logp_mismatch_mean"] == pytest.approx(0.1, abs=1e-4)
