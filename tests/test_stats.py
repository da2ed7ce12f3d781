"""eval/stats.py: the exact McNemar test against hand counts, a brute-force enumeration and scipy's binomial
test; mean/SE against numpy and ``statistics``; the paired seed comparison by hand; the logistic fit against
scipy's optimiser; and the length-controlled win rate on synthetic judges, one that rewards length alone
and one that rewards A whatever its length."""

import itertools
import math
import statistics

import numpy as np
import pytest

from chatfactory.eval.stats import (
    _binom_half_cdf_exact,
    _binom_half_cdf_log,
    binom_half_cdf,
    format_mean_se,
    length_controlled_win_rate,
    logistic_fit,
    mcnemar,
    mean_se,
    paired_seeds,
    proportion_se,
)


def items(a_only: int, b_only: int, both: int, neither: int, seed: int = 0) -> tuple[list[bool], list[bool]]:
    """Per-item pass/fail of two systems with the given 2x2 counts, in a shuffled order."""
    rows = [(True, False)] * a_only + [(False, True)] * b_only + [(True, True)] * both + [(False, False)] * neither
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i][0] for i in order], [rows[i][1] for i in order]


def brute_force_p(a_only: int, b_only: int) -> float:
    """Two-sided p by enumerating every outcome of the discordant coin flips (2**d of them, each 1/2**d):
    the mass of outcomes whose count is at least as far from d/2 as the one observed."""
    d = a_only + b_only
    far = abs(b_only - d / 2)
    hits = sum(1 for flips in itertools.product((0, 1), repeat=d) if abs(sum(flips) - d / 2) >= far)
    return hits / 2 ** d


def test_mcnemar_hand_cases():
    a, b = items(0, 10, 5, 7)  # ten discordant items, all won by B
    r = mcnemar(a, b)
    assert (r["n"], r["a_only"], r["b_only"], r["both"], r["neither"]) == (22, 0, 10, 5, 7)
    assert r["p"] == 2 * 0.5 ** 10
    assert r["diff"] == pytest.approx(10 / 22)
    assert mcnemar(b, a)["p"] == 2 * 0.5 ** 10 and mcnemar(b, a)["diff"] == pytest.approx(-10 / 22)
    # 2 against 8: 2 * (1 + 10 + 45) / 1024
    assert mcnemar(*items(2, 8, 3, 3))["p"] == pytest.approx(2 * 56 / 1024, rel=1e-15)
    assert mcnemar(*items(5, 5, 1, 1))["p"] == 1.0  # an even split is capped at 1
    r = mcnemar([True, False, True], [True, False, True])  # no discordant item: nothing to test
    assert r["p"] == 1.0 and r["diff"] == 0.0 and (r["both"], r["neither"]) == (2, 1)


@pytest.mark.parametrize("a_only,b_only", [(0, 1), (1, 3), (3, 9), (6, 6), (7, 2), (4, 12)])
def test_mcnemar_matches_brute_force_enumeration(a_only, b_only):
    assert mcnemar(*items(a_only, b_only, 4, 4))["p"] == pytest.approx(brute_force_p(a_only, b_only), rel=1e-12)


def test_mcnemar_matches_scipy_binomtest_on_random_tables():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(7)
    for _ in range(25):
        a_only, b_only, both, neither = (int(v) for v in rng.integers(0, 60, size=4))
        ours = mcnemar(*items(a_only, b_only, both, neither))["p"]
        d = a_only + b_only
        ref = 1.0 if d == 0 else stats.binomtest(b_only, d, 0.5, alternative="two-sided").pvalue
        assert ours == pytest.approx(ref, rel=1e-9, abs=1e-300), (a_only, b_only)
    big = mcnemar(*items(1400, 1530, 500, 500))["p"]  # thousands of items: still exact in integers
    assert big == pytest.approx(stats.binomtest(1530, 2930, 0.5).pvalue, rel=1e-9)


def test_binomial_tail_log_space_agrees_with_exact():
    for k, d in [(3, 40), (480, 1000), (2300, 5000), (10, 4000)]:
        assert _binom_half_cdf_log(k, d) == pytest.approx(_binom_half_cdf_exact(k, d), rel=1e-9)
    assert binom_half_cdf(-1, 5) == 0.0 and binom_half_cdf(5, 5) == 1.0
    assert binom_half_cdf(4990, 10000) == pytest.approx(_binom_half_cdf_exact(4990, 10000), rel=1e-9)


def test_mismatched_or_empty_inputs_are_named():
    with pytest.raises(ValueError, match="a has 3, b has 2"):
        mcnemar([True, False, True], [True, False])
    with pytest.raises(ValueError, match="empty"):
        mcnemar([], [])
    with pytest.raises(ValueError, match="a has 1, b has 2"):
        paired_seeds([0.1], [0.2, 0.3])
    with pytest.raises(ValueError, match="wins has 2, len_b has 3"):
        length_controlled_win_rate([1, 0], [10, 20], [10, 20, 30])
    with pytest.raises(ValueError, match="wins has 2, len_a has 1"):
        length_controlled_win_rate([1, 0], [10], [10, 20])
    with pytest.raises(ValueError, match=r"wins must be in \[0, 1\]"):
        length_controlled_win_rate([2, 0], [10, 20], [10, 20])
    with pytest.raises(ValueError):
        mean_se([])
    with pytest.raises(ValueError):
        proportion_se(1.5, 10)


def test_mean_se_matches_numpy_and_statistics():
    values = list(np.random.default_rng(3).normal(0.4, 0.05, size=9))
    m, se = mean_se(values)
    assert m == pytest.approx(np.mean(values), rel=1e-12)
    assert se == pytest.approx(statistics.stdev(values) / math.sqrt(9), rel=1e-12)
    assert se == pytest.approx(np.std(values, ddof=1) / 3, rel=1e-12)
    assert mean_se([1.0, 3.0]) == (2.0, 1.0)  # sd sqrt(2), / sqrt(2)
    m1, se1 = mean_se([0.7])
    assert m1 == 0.7 and math.isnan(se1)


def test_paired_seeds_by_hand():
    # differences 0.02, 0.04, 0.00: mean 0.02, sd 0.02, se 0.02/sqrt(3)
    r = paired_seeds([0.40, 0.42, 0.44], [0.42, 0.46, 0.44])
    se = 0.02 / math.sqrt(3)
    assert r["n"] == 3
    assert r["mean_a"] == pytest.approx(0.42) and r["mean_b"] == pytest.approx(0.44)
    assert r["diff"] == pytest.approx(0.02) and r["se_diff"] == pytest.approx(se)
    assert r["lower"] == pytest.approx(0.02 - 2 * se) and r["upper"] == pytest.approx(0.02 + 2 * se)
    # seed luck shared by both systems cancels: the paired SE is far below either system's own SE
    a, b = [0.30, 0.50, 0.70], [0.31, 0.52, 0.71]
    assert paired_seeds(a, b)["se_diff"] < mean_se(a)[1] / 10
    one = paired_seeds([0.4], [0.5])
    assert one["diff"] == pytest.approx(0.1) and math.isnan(one["se_diff"]) and math.isnan(one["lower"])


def test_proportion_se_and_format():
    assert proportion_se(0.5, 100) == pytest.approx(0.05)
    assert proportion_se(0.0, 10) == 0.0
    assert format_mean_se(0.4123, 0.0131) == "0.412 ± 0.013"
    assert format_mean_se(0.4123, 0.0131, digits=2) == "0.41 ± 0.01"
    assert format_mean_se(0.4123, float("nan")) == "0.412 ± n/a"


def test_logistic_fit_matches_scipy_optimiser():
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(11)
    x = rng.normal(size=300)
    y = (rng.random(300) < 1 / (1 + np.exp(-(0.3 + 1.2 * x)))).astype(float)
    y[:30] = 0.5  # ties as fractional outcomes

    def neg(bt):
        z = bt[0] + bt[1] * x
        return np.sum(y * np.logaddexp(0, -z) + (1 - y) * np.logaddexp(0, z)) + 1e-3 / 2 * bt @ bt

    ref = optimize.minimize(neg, np.zeros(2), method="BFGS", options={"gtol": 1e-10}).x
    assert logistic_fit(x, y) == pytest.approx(ref, abs=1e-5)
    separated = logistic_fit(np.linspace(-1, 1, 20), np.ones(20))  # A always wins: the ridge keeps it finite
    assert np.isfinite(separated).all() and 1 / (1 + np.exp(-separated[0])) > 0.99


def lengths(rng: np.random.Generator, n: int, a_longer: float) -> tuple[np.ndarray, np.ndarray]:
    """Reply lengths for n prompts: B's uniform in [100, 400], A's about ``a_longer`` times as long."""
    lb = rng.integers(100, 400, size=n)
    la = np.maximum(1, np.round(lb * a_longer * np.exp(rng.normal(0, 0.35, size=n)))).astype(int)
    return la, lb


def test_length_controlled_win_rate_removes_a_win_bought_by_length():
    rng = np.random.default_rng(2024)
    la, lb = lengths(rng, 3000, a_longer=1.4)
    z = (la - lb) / np.std(la - lb)
    p_win = 1 / (1 + np.exp(-2.0 * z))  # the judge looks at length only
    wins = (rng.random(3000) < p_win).astype(float)
    r = length_controlled_win_rate(list(wins), list(la), list(lb))
    assert r["n"] == 3000 and r["mean_len_a"] > 1.3 * r["mean_len_b"]
    assert r["win_rate"] > 0.65  # raw: A looks clearly better
    assert abs(r["lc_win_rate"] - 0.5) < 0.08
    assert 100 < r["n_matched"] < 3000 and abs(r["matched_win_rate"] - 0.5) < 0.1  # 0.57: the band leaves some
    assert r["matched_win_rate"] < r["win_rate"] - 0.1


def test_length_controlled_win_rate_keeps_a_real_win():
    rng = np.random.default_rng(5)
    la, lb = lengths(rng, 3000, a_longer=0.8)  # A is better and, if anything, shorter
    wins = (rng.random(3000) < 0.8).astype(float)
    wins[rng.random(3000) < 0.05] = 0.5  # a few ties
    r = length_controlled_win_rate(wins, la, lb)
    assert r["win_rate"] == pytest.approx(0.8, abs=0.03)
    assert r["lc_win_rate"] > 0.72 and r["matched_win_rate"] > 0.72


def test_length_controlled_edge_cases():
    r = length_controlled_win_rate([0.5] * 6, [10, 20, 30, 40, 50, 60], [60, 50, 40, 30, 20, 10])
    assert r["lc_win_rate"] == pytest.approx(0.5, abs=1e-12)  # all ties: the fit sits at 0.5
    r = length_controlled_win_rate([1, 0, 1], [100, 300, 50], [10, 20, 400])  # no pair within 20%
    assert r["matched_win_rate"] is None and r["n_matched"] == 0
    r = length_controlled_win_rate([1, 1, 0, 1], [100, 100, 100, 100], [110, 50, 95, 100], band=0.2)
    assert r["n_matched"] == 3 and r["matched_win_rate"] == pytest.approx(2 / 3)
    r = length_controlled_win_rate([1, 1, 0, 1], [50] * 4, [50] * 4)  # equal lengths: lc is the raw rate
    assert r["lc_win_rate"] == pytest.approx(0.75, abs=1e-3)
