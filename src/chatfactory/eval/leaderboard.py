"""The arena's leaderboard: Bradley–Terry scores with bootstrap intervals, and online Elo beside them.

A battle is one anonymous side-by-side vote: two model versions answered the same prompt and a person chose
``"a"``, ``"b"``, ``"tie"`` or ``"both_bad"`` (ranked as a tie: neither side earned it). From a list of
battles this module computes, with no HTTP or CLI around it:

* ``bradley_terry``: the maximum-likelihood Bradley–Terry strengths. The model says P(i beats j) =
  1 / (1 + 10 ** ((s_j - s_i) / 400)), so a gap of 400 points is 10:1 odds, as on the Elo scale; a tie counts
  as half a win to each side. Scores are shifted so that the anchor (by default the alphabetically first
  model) sits at 1000.
* ``bootstrap_intervals``: battles resampled with replacement, refitted, and the percentile interval of each
  model's score; the per-round scores are kept so that a difference between two models can be judged per
  round (``separated``), not by comparing two marginal intervals, whose shared uncertainty would be counted
  twice.
* ``elo``: the classic online Elo update, in the battles' order, shown beside BT as FastChat's arena does.
* ``leaderboard``: one row per model, sorted by BT score, with interval, Elo, win / tie / loss counts, and a
  rank that respects overlapping intervals (1 + the number of models whose lower bound is above this one's
  upper bound: models whose intervals overlap share a rank).

Why Bradley–Terry rather than online Elo alone: online Elo depends on the order of the battles. A model
that won its early battles and lost its late ones ends lower than one with the same results the other way
round, and with a small K the ratings also lag behind a newly added version for hundreds of battles. The
votes are exchangeable (nothing about a model changes between them: a version's weights are fixed), so the
right estimate uses them all at once: the Bradley–Terry fit is the same for any order of the same battles,
it is the maximum-likelihood version of what Elo approximates step by step, and it can be bootstrapped.

Numpy only; everything is deterministic for a given input and seed.

    from chatfactory.eval.leaderboard import leaderboard, separated
    board = leaderboard([{"a": "v1", "b": "v2", "winner": "b"}, ...], rounds=200, seed=0)
    board[0]["model"], board[0]["score"], board[0]["lo"], board[0]["hi"]
    separated(board, "v2", "v1")    # True: the 95% interval of score(v2) - score(v1) excludes 0
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

WINNERS = ("a", "b", "tie", "both_bad")
SCALE = 400.0 / math.log(10.0)  # natural-log strength -> Elo-like points (400 points = 10:1 odds)
BASE = 1000.0  # the anchor's score
# The regularisation that keeps a model which never lost (or never won) finite: a ridge penalty
# RIDGE / 2 * sum(theta ** 2) on the natural-log strengths theta, that is a symmetric Gaussian prior
# N(0, 1 / RIDGE) = N(0, 10 ** 2) on each, about 1,700 points on the Elo scale. It is the same for every
# model (so it favours none), tiny beside the information of a few dozen battles, and it also fixes the
# scale's free offset (the penalised optimum has sum(theta) = 0), so each Newton step is well posed.
RIDGE = 1e-2


@dataclass(frozen=True)
class Battle:
    """One arena vote: versions ``a`` and ``b`` and the ``winner``: "a", "b", "tie" or "both_bad"."""

    a: str
    b: str
    winner: str


class Leaderboard(list):
    """The rows of ``leaderboard`` (a plain list of dicts, so it serialises as JSON), plus what
    ``separated`` needs: ``samples`` (model -> its score in each bootstrap round) and ``level``."""

    def __init__(self, rows: list[dict], samples: dict[str, np.ndarray], level: float):
        super().__init__(rows)
        self.samples = samples
        self.level = level


# ---------------------------------------------------------------- input
def _field(battle: object, index: int, name: str) -> object:
    if isinstance(battle, Mapping):
        if name not in battle:
            raise ValueError(f"battle {index}: field {name!r} is missing")
        return battle[name]
    if isinstance(battle, Battle):
        return getattr(battle, name)
    raise ValueError(f"battle {index}: expected a mapping with 'a', 'b', 'winner' or a Battle, "
                     f"got {type(battle).__name__}")


def _parse(battles: Sequence) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Names (sorted), and per battle: index of a, index of b, a's score (1 win, 0.5 tie, 0 loss)."""
    if isinstance(battles, (str, bytes, Mapping)) or not isinstance(battles, Sequence):
        raise ValueError(f"battles: expected a list of battles, got {type(battles).__name__}")
    if not battles:
        raise ValueError("battles: the list is empty; a leaderboard needs at least one battle")
    rows = []
    for index, battle in enumerate(battles):
        a, b, winner = (_field(battle, index, name) for name in ("a", "b", "winner"))
        for name, value in (("a", a), ("b", b)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"battle {index}: field {name!r} must be a non-empty model name, got {value!r}")
        if a == b:
            raise ValueError(f"battle {index}: fields 'a' and 'b' name the same model {a!r}; "
                             "a model cannot battle itself")
        if winner not in WINNERS:
            raise ValueError(f"battle {index}: field 'winner' is {winner!r}; expected one of "
                             + ", ".join(repr(w) for w in WINNERS))
        rows.append((a, b, 1.0 if winner == "a" else 0.0 if winner == "b" else 0.5))
    names = sorted({r[0] for r in rows} | {r[1] for r in rows})
    position = {name: i for i, name in enumerate(names)}
    ia = np.array([position[r[0]] for r in rows], dtype=np.int64)
    ib = np.array([position[r[1]] for r in rows], dtype=np.int64)
    score_a = np.array([r[2] for r in rows], dtype=np.float64)
    return names, ia, ib, score_a


def _anchor_index(names: list[str], anchor: str | None) -> int:
    if anchor is None:
        return 0
    if anchor not in names:
        raise ValueError(f"anchor {anchor!r} is not a model of these battles; they have: {', '.join(names)}")
    return names.index(anchor)


def _check_level(level: float) -> None:
    if not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1 (exclusive), got {level!r}")


def _check_rounds(rounds: int) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")


# ---------------------------------------------------------------- Bradley–Terry
def _wins(n: int, ia: np.ndarray, ib: np.ndarray, score_a: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
    """W[i, j] = (weighted) wins of i over j, ties as half a win to each side."""
    w = np.ones_like(score_a) if weight is None else weight
    flat = np.bincount(ia * n + ib, weights=w * score_a, minlength=n * n)
    flat += np.bincount(ib * n + ia, weights=w * (1.0 - score_a), minlength=n * n)
    return flat.reshape(n, n)


def _penalised_loglik(theta: np.ndarray, wins: np.ndarray, ridge: float) -> float:
    diff = theta[:, None] - theta[None, :]
    # log P(i beats j) = -log(1 + exp(-(theta_i - theta_j))), computed without overflow
    return float(-(wins * np.logaddexp(0.0, -diff)).sum() - 0.5 * ridge * (theta @ theta))


def _fit(wins: np.ndarray, ridge: float, iters: int, tol: float) -> np.ndarray:
    """Natural-log strengths maximising the ridge-penalised BT log-likelihood (Newton with backtracking).

    The penalised log-likelihood is strictly concave, so the optimum is unique; starting from zero and
    taking fixed steps makes the result a deterministic function of ``wins``.
    """
    n = wins.shape[0]
    games = wins + wins.T
    theta = np.zeros(n)
    current = _penalised_loglik(theta, wins, ridge)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))  # P(i beats j)
        grad = (wins - games * p).sum(axis=1) - ridge * theta
        m = games * p * p.T  # games * p * (1 - p): the information of each pair
        info = np.diag(m.sum(axis=1)) - m + ridge * np.eye(n)  # minus the Hessian: positive definite
        step = np.linalg.solve(info, grad)
        size = 1.0
        while True:  # backtracking: a full Newton step can overshoot when one side won (almost) everything
            trial = theta + size * step
            value = _penalised_loglik(trial, wins, ridge)
            if value >= current or size < 1e-8:
                break
            size /= 2.0
        theta, current = trial, value
        if np.max(np.abs(size * step)) < tol:
            break
    return theta


def _to_scores(theta: np.ndarray, anchor: int) -> np.ndarray:
    return BASE + SCALE * (theta - theta[anchor])


def bradley_terry(battles: Sequence, anchor: str | None = None, iters: int = 100, tol: float = 1e-10,
                  ridge: float = RIDGE) -> dict[str, float]:
    """Bradley–Terry scores of every model in ``battles`` on the Elo-like scale, the anchor at 1000.

    ``anchor`` defaults to the alphabetically first model. Ties and both-bad votes count as half a win to
    each side. ``ridge`` is the symmetric Gaussian prior that keeps a model that never lost or never won
    finite (see ``RIDGE``). The result does not depend on the order of the battles.
    """
    names, ia, ib, score_a = _parse(battles)
    at = _anchor_index(names, anchor)
    theta = _fit(_wins(len(names), ia, ib, score_a, None), ridge, iters, tol)
    return dict(zip(names, (float(s) for s in _to_scores(theta, at))))


def _bootstrap(battles: Sequence, rounds: int, seed: int, anchor: str | None,
               ridge: float) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Names, the point scores, and the (rounds, models) scores of the bootstrap refits.

    Every round's scores are recentred so that their mean equals the point fit's mean, rather than pinning
    the anchor at 1000 in every round: pinned, the anchor's interval would have no width and every other
    model's interval would carry the anchor's own uncertainty. Differences between two models, which is
    what ``separated`` looks at, are the same in either frame.
    """
    _check_rounds(rounds)
    names, ia, ib, score_a = _parse(battles)
    n, count = len(names), len(score_a)
    at = _anchor_index(names, anchor)
    point = _to_scores(_fit(_wins(n, ia, ib, score_a, None), ridge, 100, 1e-10), at)
    rng = np.random.default_rng(seed)
    samples = np.empty((rounds, n))
    for r in range(rounds):
        weight = np.bincount(rng.integers(0, count, size=count), minlength=count).astype(np.float64)
        theta = _fit(_wins(n, ia, ib, score_a, weight), ridge, 100, 1e-10)
        scores = _to_scores(theta, at)
        samples[r] = scores - scores.mean() + point.mean()
    return names, point, samples


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [tail, 1.0 - tail])
    return float(lo), float(hi)


def bootstrap_intervals(battles: Sequence, rounds: int = 200, seed: int = 0, level: float = 0.95,
                        anchor: str | None = None, ridge: float = RIDGE) -> dict[str, tuple[float, float]]:
    """Percentile intervals (``level``) of each model's BT score over ``rounds`` bootstrap resamples.

    Battles are drawn with replacement (as many as there are) and refitted; the same ``seed`` gives the
    same intervals. Intervals are on the scale of ``bradley_terry(battles, anchor)`` (see ``_bootstrap``
    for how each round is placed on it).
    """
    _check_level(level)
    names, _, samples = _bootstrap(battles, rounds, seed, anchor, ridge)
    return {name: _interval(samples[:, i], level) for i, name in enumerate(names)}


# ---------------------------------------------------------------- online Elo
def elo(battles: Sequence, k: float = 4.0, base: float = 1000.0) -> dict[str, float]:
    """Online Elo ratings after the battles in their order: every model starts at ``base``, and each battle
    moves both sides by ``k`` times (actual - expected) score, a tie scoring 0.5."""
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not k > 0:
        raise ValueError(f"k must be a positive number, got {k!r}")
    names, ia, ib, score_a = _parse(battles)
    rating = np.full(len(names), float(base))
    for i, j, s in zip(ia.tolist(), ib.tolist(), score_a.tolist()):
        expected = 1.0 / (1.0 + 10.0 ** ((rating[j] - rating[i]) / 400.0))
        rating[i] += k * (s - expected)
        rating[j] -= k * (s - expected)
    return dict(zip(names, (float(r) for r in rating)))


# ---------------------------------------------------------------- the board
def leaderboard(battles: Sequence, rounds: int = 200, seed: int = 0, level: float = 0.95,
                anchor: str | None = None, k: float = 4.0) -> Leaderboard:
    """One row per model, sorted by BT score (best first; ties of score by name):

    ``{"model", "score", "lo", "hi", "elo", "battles", "wins", "ties", "losses", "rank"}`` where ``lo`` and
    ``hi`` are the bootstrap interval at ``level``, ``elo`` the online Elo rating (``k``), ties include
    both-bad votes, and ``rank`` is 1 + the number of models whose ``lo`` is above this model's ``hi``.
    The returned list also keeps the per-round bootstrap scores, for ``separated``.
    """
    _check_level(level)
    elo_ratings = elo(battles, k=k)  # validates the battles first, with their indices
    names, point, samples = _bootstrap(battles, rounds, seed, anchor, RIDGE)
    _, ia, ib, score_a = _parse(battles)
    n = len(names)
    counts = {key: np.zeros(n, dtype=np.int64) for key in ("wins", "ties", "losses")}
    for side, s in ((ia, score_a), (ib, 1.0 - score_a)):
        counts["wins"] += np.bincount(side[s == 1.0], minlength=n)
        counts["ties"] += np.bincount(side[s == 0.5], minlength=n)
        counts["losses"] += np.bincount(side[s == 0.0], minlength=n)
    intervals = [_interval(samples[:, i], level) for i in range(n)]
    rows = []
    for i, name in enumerate(names):
        lo, hi = intervals[i]
        wins, ties, losses = (int(counts[key][i]) for key in ("wins", "ties", "losses"))
        rows.append({"model": name, "score": float(point[i]), "lo": lo, "hi": hi, "elo": elo_ratings[name],
                     "battles": wins + ties + losses, "wins": wins, "ties": ties, "losses": losses,
                     "rank": 1 + sum(1 for other_lo, _ in intervals if other_lo > hi)})
    rows.sort(key=lambda row: (-row["score"], row["model"]))
    return Leaderboard(rows, {name: samples[:, i].copy() for i, name in enumerate(names)}, level)


def difference_interval(board: Leaderboard, x: str, y: str, level: float | None = None) -> tuple[float, float]:
    """The bootstrap percentile interval of score(x) - score(y), the difference taken in each round."""
    samples = getattr(board, "samples", None)
    if samples is None:
        raise ValueError("board has no bootstrap samples: pass the Leaderboard that leaderboard() returned "
                         "(a list of rows read back from JSON has lost them)")
    for name in (x, y):
        if name not in samples:
            raise ValueError(f"model {name!r} is not on the board; it has: {', '.join(sorted(samples))}")
    level = board.level if level is None else level
    _check_level(level)
    return _interval(samples[x] - samples[y], level)


def separated(board: Leaderboard, x: str, y: str, level: float | None = None) -> bool:
    """Whether the bootstrap interval of score(x) - score(y) excludes 0 (at the board's level unless given).

    The difference is taken round by round, so the uncertainty x and y share (both measured against the
    same opponents) cancels, as it does not when two marginal intervals are compared.
    """
    lo, hi = difference_interval(board, x, y, level)
    return lo > 0.0 or hi < 0.0
