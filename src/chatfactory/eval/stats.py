"""Small statistics for quality claims: paired tests, standard errors, length-controlled win rate.

One seed on one host is an anecdote. "PPO beats SFT" needs the size of the difference next to its
uncertainty, and the uncertainty should come from the right comparison:

* **Paired, not two separate intervals.** Two systems scored on the SAME items (or trained from the
  SAME seeds) share the item's difficulty (the seed's luck). Comparing two separate confidence
  intervals counts that shared variance twice, so a real difference often hides inside overlapping
  intervals; the paired test looks only at the per-item (per-seed) differences, where it cancels.
  ``mcnemar`` does this for pass/fail items, ``paired_seeds`` for one score per seed.
* **Exact, not chi-square.** McNemar's test depends only on the discordant items (one system right,
  the other wrong). Under "no difference" each is a fair coin, so the count is Binomial(d, 1/2) and
  the p-value can be summed exactly. The usual chi-square form is an approximation that is poor for
  the few dozen discordant items a small eval set gives, precisely when the question is close.
* **Length-controlled win rate.** Judges (reward models and LLMs alike) prefer longer answers, so a
  stage can "win" by padding. ``length_controlled_win_rate`` reports the raw win rate beside two
  length-controlled ones: over length-matched pairs only, and a logistic fit's prediction at zero
  length difference.

Standard library and numpy only (no scipy at run time), so the report can use it anywhere.

    from chatfactory.eval.stats import mcnemar, mean_se, paired_seeds, format_mean_se
    mcnemar(sft_pass, ppo_pass)["p"]                # exact two-sided p of "PPO passes the same items as SFT"
    format_mean_se(*mean_se([0.41, 0.43, 0.40]))    # "0.413 ± 0.009"
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Above this many discordant pairs the exact integer sum (bigints of d bits, about d/2 terms) grows slow,
# so the tail is summed in log space instead; below it, the p-value is exact up to the final rounding.
EXACT_LIMIT = 5000
RIDGE = 1e-3  # L2 penalty of the logistic fit: keeps it finite when outcomes separate (A always wins)


def _check_pair(a: Sequence, b: Sequence, name_a: str = "a", name_b: str = "b") -> int:
    """The common length of two paired sequences; a ValueError naming them when they differ or are empty."""
    if len(a) != len(b):
        raise ValueError(f"paired inputs differ in length: {name_a} has {len(a)}, {name_b} has {len(b)}")
    if not len(a):
        raise ValueError(f"paired inputs are empty: {name_a} and {name_b} have no items")
    return len(a)


def _binom_half_cdf_exact(k: int, d: int) -> float:
    """P(X <= k) for X ~ Binomial(d, 1/2), as sum(C(d, i)) / 2**d in integers, rounded once at the end."""
    term, total = 1, 1  # C(d, 0)
    for i in range(k):
        term = term * (d - i) // (i + 1)  # C(d, i + 1), exact: the product is divisible
        total += term
    return total / (1 << d)  # int / int is correctly rounded, and underflows to 0.0 rather than failing


def _binom_half_cdf_log(k: int, d: int) -> float:
    """P(X <= k) for X ~ Binomial(d, 1/2) summed in log space (log-sum-exp), for very large d."""
    logs = [math.lgamma(d + 1) - math.lgamma(i + 1) - math.lgamma(d - i + 1) - d * math.log(2) for i in range(k + 1)]
    top = max(logs)
    return math.exp(top) * math.fsum(math.exp(x - top) for x in logs)


def binom_half_cdf(k: int, d: int) -> float:
    """P(X <= k) for X ~ Binomial(d, 1/2): exact below ``EXACT_LIMIT`` trials, log space above."""
    if k < 0:
        return 0.0
    if k >= d:
        return 1.0
    return _binom_half_cdf_exact(k, d) if d <= EXACT_LIMIT else _binom_half_cdf_log(k, d)


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact McNemar test of two systems' pass/fail on the same items (``a[i]`` and ``b[i]``: item i).

    Returns ``{"n", "a_only", "b_only", "both", "neither", "diff", "p"}``: ``a_only`` counts items only A
    passes, ``b_only`` items only B passes, ``diff`` is mean(b) - mean(a) (positive: B is better), and
    ``p`` the two-sided exact p-value min(1, 2 * P(X <= min(a_only, b_only))), X ~ Binomial(a_only +
    b_only, 1/2). Items both pass or both fail say nothing about which is better and do not enter p;
    with no discordant item p is 1.0. Raises ValueError when the lengths differ or are empty.
    """
    n = _check_pair(a, b)
    pa, pb = [bool(x) for x in a], [bool(x) for x in b]
    a_only = sum(x and not y for x, y in zip(pa, pb))
    b_only = sum(y and not x for x, y in zip(pa, pb))
    both = sum(x and y for x, y in zip(pa, pb))
    d = a_only + b_only
    p = 1.0 if d == 0 else min(1.0, 2.0 * binom_half_cdf(min(a_only, b_only), d))
    return {"n": n, "a_only": a_only, "b_only": b_only, "both": both, "neither": n - d - both,
            "diff": (sum(pb) - sum(pa)) / n, "p": p}


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean: sample sd (n - 1 denominator) / sqrt(n).

    With one value the spread is unknown, not zero, so the SE is ``float("nan")`` (printed as "± n/a"
    by ``format_mean_se``): one run must not look like a certain one. Raises ValueError when empty.
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_se of no values")
    m = math.fsum(values) / n
    if n == 1:
        return m, float("nan")
    var = math.fsum((x - m) ** 2 for x in values) / (n - 1)
    return m, math.sqrt(var / n)


def paired_seeds(a: Sequence[float], b: Sequence[float]) -> dict:
    """Per-seed paired comparison: ``a[i]`` and ``b[i]`` are two systems' scores from the same seed.

    The SE is that of the per-seed differences b[i] - a[i], so the luck a seed brings to both cancels
    (see the module docstring). Returns ``{"n", "mean_a", "mean_b", "diff", "se_diff", "lower", "upper"}``
    with diff = mean(b) - mean(a) and lower/upper = diff -/+ 2 se_diff (about a 95% interval for many
    seeds; with few seeds a t quantile would be wider, so read it as a rough band). One seed gives nan
    for se_diff, lower and upper. Raises ValueError when the lengths differ or are empty.
    """
    n = _check_pair(a, b)
    diff, se = mean_se([y - x for x, y in zip(a, b)])
    return {"n": n, "mean_a": math.fsum(a) / n, "mean_b": math.fsum(b) / n, "diff": diff, "se_diff": se,
            "lower": diff - 2 * se, "upper": diff + 2 * se}


def proportion_se(p: float, n: int) -> float:
    """Binomial standard error sqrt(p (1 - p) / n) of a proportion p measured on n independent items."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"proportion_se: p must be in [0, 1], got {p}")
    if n < 1:
        raise ValueError(f"proportion_se: n must be at least 1, got {n}")
    return math.sqrt(p * (1.0 - p) / n)


def logistic_fit(x: np.ndarray, y: np.ndarray, ridge: float = RIDGE, iters: int = 50) -> np.ndarray:
    """(intercept, slope) maximising sum(y log s + (1 - y) log(1 - s)) - ridge/2 |beta|^2, s = sigmoid(b0 + b1 x).

    ``y`` may be fractional (a tie is 0.5): that likelihood equals duplicating the row as half a win and
    half a loss. Newton's method (IRLS) with step halving, so each step raises the penalised likelihood;
    the ridge makes the problem strictly concave, hence one maximum, finite even when outcomes separate.
    """
    X = np.stack([np.ones_like(x), x], axis=1)
    beta = np.zeros(2)

    def objective(bt: np.ndarray) -> float:
        z = X @ bt  # log sigmoid(z) = -logaddexp(0, -z), stable for large |z|
        return float(np.sum(-y * np.logaddexp(0, -z) - (1 - y) * np.logaddexp(0, z)) - ridge / 2 * bt @ bt)

    current = objective(beta)
    for _ in range(iters):
        s = 1.0 / (1.0 + np.exp(-(X @ beta)))
        grad = X.T @ (y - s) - ridge * beta
        hess = (X * (s * (1 - s))[:, None]).T @ X + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-8 and objective(beta + t * step) < current:
            t /= 2
        beta = beta + t * step
        new = objective(beta)
        if abs(new - current) < 1e-12 * (1 + abs(current)) or np.abs(t * step).max() < 1e-10:
            break
        current = new
    return beta


def length_controlled_win_rate(wins: Sequence[float], len_a: Sequence[int], len_b: Sequence[int],
                               band: float = 0.2) -> dict:
    """A's win rate over B, raw and with the two replies' lengths controlled, two ways.

    ``wins[i]`` is prompt i's outcome for A (1 win, 0 loss, 0.5 tie); ``len_a[i]``, ``len_b[i]`` its
    replies' lengths (tokens or characters, as long as both use the same unit).

    * ``matched_win_rate``: the win rate over prompts whose replies are about as long, |la - lb| <= band *
      max(la, lb); ``n_matched`` of them. Simple and assumption-free, but it drops the other prompts and
      still leaves differences within the band; None when no pair is matched.
    * ``lc_win_rate``: a logistic regression of the outcome on z = (la - lb) / sd(la - lb) (ties as
      fractional outcomes), read at z = 0: the win rate A would have if its replies were as long as B's.
      This is AlpacaEval 2.0's length-controlled win rate in its simplest form: its GLM also squashes the
      difference with tanh and has per-instruction difficulty terms, fitted across many models; here one
      pair of systems, a linear length term, and an L2 ridge of ``RIDGE`` for stability.

    Returns ``{"win_rate", "n", "matched_win_rate", "n_matched", "lc_win_rate", "mean_len_a", "mean_len_b"}``.
    Raises ValueError when the lengths of the three inputs differ, are empty, or hold bad values.
    """
    n = _check_pair(wins, len_a, "wins", "len_a")
    _check_pair(wins, len_b, "wins", "len_b")
    y = np.asarray(wins, dtype=np.float64)
    la, lb = np.asarray(len_a, dtype=np.float64), np.asarray(len_b, dtype=np.float64)
    if ((y < 0) | (y > 1)).any() or not np.isfinite(y).all():
        raise ValueError("wins must be in [0, 1] (1 win for A, 0 loss, 0.5 tie)")
    if (la < 0).any() or (lb < 0).any():
        raise ValueError("len_a and len_b must be non-negative")
    if band < 0:
        raise ValueError(f"band must be non-negative, got {band}")
    matched = np.abs(la - lb) <= band * np.maximum(la, lb)
    n_matched = int(matched.sum())
    delta = la - lb
    sd = float(delta.std())
    z = delta / sd if sd > 0 else np.zeros(n)  # all differences equal: nothing to regress on, the intercept only
    b0, _ = logistic_fit(z, y)
    return {"win_rate": float(y.mean()), "n": n,
            "matched_win_rate": float(y[matched].mean()) if n_matched else None, "n_matched": n_matched,
            "lc_win_rate": float(1.0 / (1.0 + math.exp(-b0))),
            "mean_len_a": float(la.mean()), "mean_len_b": float(lb.mean())}


def format_mean_se(m: float, se: float, digits: int = 3) -> str:
    """``"0.412 ± 0.013"``; ``"0.412 ± n/a"`` when the SE is nan (a single seed or run)."""
    if math.isnan(se):
        return f"{m:.{digits}f} ± n/a"
    return f"{m:.{digits}f} ± {se:.{digits}f}"
