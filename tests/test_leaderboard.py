"""The arena leaderboard's math (eval/leaderboard.py): BT recovery, bootstrap intervals, Elo, ranks, errors."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from chatfactory.eval.leaderboard import (
    Battle,
    bootstrap_intervals,
    bradley_terry,
    difference_interval,
    elo,
    leaderboard,
    separated,
)

TRUE = {"m0": 1000.0, "m1": 1100.0, "m2": 1300.0}  # gaps of 100 and 200 points


def draw(true: dict[str, float], count: int, seed: int, pairs: list[tuple[str, str]] | None = None) -> list[dict]:
    """Battles drawn from known BT strengths (no ties): a beats b with probability 1 / (1 + 10^((b - a) / 400))."""
    rng = np.random.default_rng(seed)
    names = sorted(true)
    pairs = pairs or [(x, y) for x in names for y in names if x < y]
    battles = []
    for _ in range(count):
        a, b = pairs[rng.integers(len(pairs))]
        if rng.random() < 0.5:
            a, b = b, a
        p = 1.0 / (1.0 + 10.0 ** ((true[b] - true[a]) / 400.0))
        battles.append({"a": a, "b": b, "winner": "a" if rng.random() < p else "b"})
    return battles


def on_scale(true: dict[str, float], scores: dict[str, float]) -> dict[str, float]:
    """The true strengths moved onto the frame of the bootstrap intervals: the same mean as the point fit."""
    shift = np.mean(list(scores.values())) - np.mean(list(true.values()))
    return {name: value + shift for name, value in true.items()}


# ---------------------------------------------------------------- Bradley–Terry
def test_bt_recovers_known_gaps_within_30_points():
    scores = bradley_terry(draw(TRUE, 3000, seed=1))
    assert scores["m0"] == 1000.0  # the alphabetically first model is the anchor
    assert abs((scores["m1"] - scores["m0"]) - 100.0) < 30.0, scores
    assert abs((scores["m2"] - scores["m1"]) - 200.0) < 30.0, scores


def test_bt_anchor_moves_the_scale_not_the_gaps():
    battles = draw(TRUE, 1000, seed=2)
    first, second = bradley_terry(battles), bradley_terry(battles, anchor="m2")
    assert second["m2"] == 1000.0
    for name in TRUE:
        assert math.isclose(first[name] - first["m0"], second[name] - second["m0"], abs_tol=1e-6)


def test_bt_is_the_maximum_of_the_likelihood_for_two_models():
    # two models, 30 wins to 10: the MLE odds are 3:1, i.e. 400 * log10(3) points (the tiny prior aside)
    battles = [{"a": "x", "b": "y", "winner": "a"}] * 30 + [{"a": "y", "b": "x", "winner": "a"}] * 10
    scores = bradley_terry(battles)
    assert abs(scores["y"] - scores["x"] - 400.0 * math.log10(1 / 3)) < 1.0, scores


def test_bt_does_not_depend_on_the_order_of_the_battles_but_elo_does():
    battles = draw(TRUE, 600, seed=3)
    shuffled = battles[:]
    random.Random(0).shuffle(shuffled)
    a, b = bradley_terry(battles), bradley_terry(shuffled)
    assert all(math.isclose(a[n], b[n], abs_tol=1e-7) for n in TRUE)
    # the reason for BT: online Elo of the same battles in another order is another board
    e1, e2 = elo(battles), elo(list(reversed(battles)))
    assert max(abs(e1[n] - e2[n]) for n in TRUE) > 1.0


def test_a_model_that_never_lost_or_never_won_gets_a_finite_score():
    battles = ([{"a": "champ", "b": "mid", "winner": "a"}] * 20 + [{"a": "mid", "b": "champ", "winner": "b"}] * 5
               + draw({"mid": 1000.0, "low": 900.0}, 200, seed=4)
               + [{"a": "mid", "b": "zero", "winner": "a"}] * 10)
    scores = bradley_terry(battles)
    assert all(math.isfinite(s) for s in scores.values()), scores
    assert scores["champ"] > scores["mid"] > scores["low"] > scores["zero"]
    assert scores["champ"] - scores["mid"] < 2500.0  # the prior holds it, not a runaway of the optimiser
    board = leaderboard(battles, rounds=50)
    assert all(math.isfinite(row[key]) for row in board for key in ("score", "lo", "hi", "elo"))
    champ = next(row for row in board if row["model"] == "champ")
    assert (champ["wins"], champ["losses"], champ["ties"]) == (25, 0, 0)


def test_ties_count_as_half_a_win_to_each_side_and_both_bad_as_a_tie():
    # 1 win + 2 ties is 2 wins to 1 for a: the same likelihood as 2 wins and 1 loss
    with_ties = [{"a": "p", "b": "q", "winner": "a"}, {"a": "p", "b": "q", "winner": "tie"},
                 {"a": "q", "b": "p", "winner": "both_bad"}]
    plain = [{"a": "p", "b": "q", "winner": "a"}, {"a": "p", "b": "q", "winner": "a"},
             {"a": "p", "b": "q", "winner": "b"}]
    assert bradley_terry(with_ties) == pytest.approx(bradley_terry(plain), abs=1e-9)
    assert bradley_terry(with_ties)["q"] < 1000.0
    # only ties: equal scores, and the board counts them as ties (both-bad included)
    only_ties = [{"a": "p", "b": "q", "winner": "tie"}] * 5 + [Battle("q", "p", "both_bad")] * 5
    scores = bradley_terry(only_ties)
    assert scores["p"] == pytest.approx(scores["q"], abs=1e-9)
    row = leaderboard(only_ties, rounds=20)[0]
    assert (row["wins"], row["ties"], row["losses"], row["battles"]) == (0, 10, 0, 10)


# ---------------------------------------------------------------- bootstrap
def test_bootstrap_interval_contains_the_truth_and_narrows_with_more_battles():
    small, large = draw(TRUE, 300, seed=5), draw(TRUE, 3000, seed=5)
    narrow, wide = bootstrap_intervals(large, rounds=100, seed=0), bootstrap_intervals(small, rounds=100, seed=0)
    truth = on_scale(TRUE, bradley_terry(large))
    for name, (lo, hi) in narrow.items():
        assert lo < truth[name] < hi, (name, lo, hi, truth[name])
    widths = {n: np.mean([hi - lo for lo, hi in intervals.values()]) for n, intervals in ((300, wide), (3000, narrow))}
    # ten times the battles: about sqrt(10) = 3.2 times narrower
    assert widths[3000] < 0.5 * widths[300], widths
    assert widths[3000] > 5.0, widths  # and not collapsed to a point


def test_bootstrap_intervals_cover_the_truth_about_as_often_as_their_level_says():
    # 40 small arenas (300 battles each) from the same true strengths: of the 120 95% intervals about 114
    # should hold the truth; intervals too narrow (or off centre) hold it far less often, too wide always
    hits = total = 0
    for seed in range(40):
        battles = draw(TRUE, 300, seed=100 + seed)
        truth = on_scale(TRUE, bradley_terry(battles))
        for name, (lo, hi) in bootstrap_intervals(battles, rounds=100, seed=seed).items():
            hits += lo < truth[name] < hi
            total += 1
    assert 0.85 <= hits / total <= 0.99, (hits, total)


def test_bootstrap_width_matches_the_standard_error_from_the_likelihood():
    # two models: the MLE of the log-odds has standard error 1 / sqrt(n p (1 - p)), so the 95% interval of
    # the difference should be about 2 * 1.96 of those wide (in points: times 400 / ln 10)
    battles = draw({"new": 1200.0, "old": 1000.0}, 1000, seed=14)
    board = leaderboard(battles, rounds=200)
    p = next(row for row in board if row["model"] == "new")["wins"] / len(battles)
    expected = 2 * 1.96 * (400 / math.log(10)) / math.sqrt(len(battles) * p * (1 - p))
    lo, hi = difference_interval(board, "new", "old")
    assert 0.8 * expected < hi - lo < 1.2 * expected, (hi - lo, expected)


def test_intervals_hold_the_point_score_and_the_anchor_has_width():
    battles = draw(TRUE, 1000, seed=6)
    scores, intervals = bradley_terry(battles), bootstrap_intervals(battles, rounds=100)
    for name, (lo, hi) in intervals.items():
        assert lo < scores[name] < hi
    lo, hi = intervals["m0"]
    assert hi - lo > 5.0  # each round is recentred, not pinned at the anchor


def test_same_seed_same_board_other_seed_other_intervals():
    battles = draw(TRUE, 500, seed=7)
    one, two = leaderboard(battles, rounds=50, seed=3), leaderboard(battles, rounds=50, seed=3)
    assert one == two
    assert all(np.array_equal(one.samples[n], two.samples[n]) for n in TRUE)
    other = leaderboard(battles, rounds=50, seed=4)
    assert [r["score"] for r in other] == [r["score"] for r in one]  # the point fit has no randomness
    assert [r["lo"] for r in other] != [r["lo"] for r in one]
    assert bootstrap_intervals(battles, rounds=50, seed=3) == bootstrap_intervals(battles, rounds=50, seed=3)


# ---------------------------------------------------------------- Elo
def test_elo_one_battle_and_a_tie():
    assert elo([{"a": "x", "b": "y", "winner": "a"}]) == {"x": 1002.0, "y": 998.0}
    assert elo([{"a": "x", "b": "y", "winner": "tie"}], k=32, base=1500) == {"x": 1500.0, "y": 1500.0}
    two = elo([{"a": "x", "b": "y", "winner": "a"}, {"a": "x", "b": "y", "winner": "b"}], k=32)
    assert two["y"] > two["x"]  # the upset after the win moves more than the win did


def test_elo_orders_the_synthetic_models_as_bt_does():
    battles = draw(TRUE, 3000, seed=1)
    bt, ratings = bradley_terry(battles), elo(battles)
    assert sorted(TRUE, key=bt.get) == sorted(TRUE, key=ratings.get) == ["m0", "m1", "m2"]


# ---------------------------------------------------------------- the board, ranks, separation
def test_board_rows_sorted_with_counts_ranks_and_json():
    battles = draw(TRUE, 3000, seed=1)
    board = leaderboard(battles, rounds=100)
    assert [row["model"] for row in board] == ["m2", "m1", "m0"]
    assert [row["rank"] for row in board] == [1, 2, 3]
    assert set(board[0]) == {"model", "score", "lo", "hi", "elo", "battles", "wins", "ties", "losses", "rank"}
    assert sum(row["battles"] for row in board) == 2 * len(battles)
    assert sum(row["wins"] for row in board) == sum(row["losses"] for row in board) == len(battles)
    scores = bradley_terry(battles)
    assert all(row["score"] == scores[row["model"]] for row in board)
    assert all(row["elo"] == elo(battles)[row["model"]] for row in board)
    assert json.loads(json.dumps(board)) == list(board)  # serialises as a plain list of rows


def test_overlapping_intervals_share_a_rank():
    true = {"a": 1200.0, "b": 1000.0, "c": 1000.0, "d": 800.0}
    board = leaderboard(draw(true, 1200, seed=8), rounds=100)
    ranks = {row["model"]: row["rank"] for row in board}
    assert ranks["a"] == 1 and ranks["d"] == 4
    assert ranks["b"] == ranks["c"] == 2  # b and c are the same model: their intervals overlap
    for row in board:
        assert row["rank"] == 1 + sum(1 for other in board if other["lo"] > row["hi"])


def test_separated_for_a_200_point_gap_not_for_identical_models():
    gap = leaderboard(draw({"new": 1200.0, "old": 1000.0}, 600, seed=9), rounds=200)
    assert separated(gap, "new", "old") and separated(gap, "old", "new")
    lo, hi = difference_interval(gap, "new", "old")
    assert 100.0 < lo < 200.0 < hi < 300.0
    same = leaderboard(draw({"twin1": 1000.0, "twin2": 1000.0}, 600, seed=9), rounds=200)
    assert not separated(same, "twin1", "twin2")


def test_separated_takes_the_difference_per_round_not_the_marginal_intervals():
    # x and y battle each other a lot (their gap is well measured) but meet the rest of the field rarely,
    # so each one's place in the field is uncertain and their marginal intervals overlap; the per-round
    # difference is still clearly above 0
    true = {"x": 1080.0, "y": 1000.0, "f1": 1000.0, "f2": 1050.0}
    battles = (draw(true, 2000, seed=10, pairs=[("x", "y")]) + draw(true, 600, seed=11, pairs=[("f1", "f2")])
               + draw(true, 12, seed=12, pairs=[("x", "f1"), ("y", "f2")]))
    board = leaderboard(battles, rounds=200)
    rows = {row["model"]: row for row in board}
    assert rows["x"]["lo"] < rows["y"]["hi"], rows  # the marginal intervals overlap ...
    assert separated(board, "x", "y")  # ... yet the paired difference excludes 0


def test_separated_needs_the_board_with_its_samples():
    board = leaderboard(draw(TRUE, 300, seed=13), rounds=20)
    with pytest.raises(ValueError, match="no bootstrap samples"):
        separated(json.loads(json.dumps(board)), "m1", "m0")
    with pytest.raises(ValueError, match="'nobody' is not on the board"):
        separated(board, "nobody", "m0")


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("battles, message", [
    ([], "empty"),
    ({"a": "x", "b": "y", "winner": "a"}, "expected a list"),
    ([{"a": "x", "b": "y", "winner": "a"}, {"a": "x", "winner": "a"}], "battle 1: field 'b' is missing"),
    ([{"a": "x", "b": "y", "winner": "a"}, {"a": "x", "b": "y", "winner": "c"}], "battle 1: field 'winner' is 'c'"),
    ([{"a": "x", "b": "x", "winner": "a"}], "battle 0: fields 'a' and 'b' name the same model 'x'"),
    ([{"a": "", "b": "y", "winner": "a"}], "battle 0: field 'a' must be a non-empty model name"),
    ([{"a": "x", "b": 3, "winner": "tie"}], "battle 0: field 'b' must be a non-empty model name"),
    ([{"a": "x", "b": "y", "winner": "a"}, ("x", "y", "a")], "battle 1: expected a mapping"),
])
def test_bad_battles_are_clear_errors_naming_index_and_field(battles, message):
    for call in (bradley_terry, elo, leaderboard, bootstrap_intervals):
        with pytest.raises(ValueError, match=message):
            call(battles)


def test_bad_options_are_clear_errors():
    battles = [{"a": "x", "b": "y", "winner": "a"}]
    with pytest.raises(ValueError, match="anchor 'z' is not a model"):
        bradley_terry(battles, anchor="z")
    with pytest.raises(ValueError, match="rounds must be a positive integer"):
        bootstrap_intervals(battles, rounds=0)
    with pytest.raises(ValueError, match="level must be between 0 and 1"):
        leaderboard(battles, level=95)
    with pytest.raises(ValueError, match="k must be a positive number"):
        elo(battles, k=0)
