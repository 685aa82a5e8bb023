"""The statistics, against hand-computed answers (each test fails when its function is broken)."""
import pytest

from iclvsft.metrics import (
    baselines,
    fmt_ci,
    mcnemar,
    paired_difference,
    rate,
    rows_to_match,
    seed_item_interval,
    shortcut_balanced,
    verdict,
    wilson,
)


def test_wilson_interval_by_hand():
    # z = 1.959964: 5/10 -> centre 0.5, half-width z*sqrt(0.025 + z^2/400)/(1 + z^2/10) = 0.26340
    assert wilson(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    # 0/10 -> [0, 2 * (z^2/20)/(1 + z^2/10)] = [0, 0.27753]
    assert wilson(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    assert rate([True, False, True, True]) == {"k": 3, "n": 4, "mean": 0.75, "ci95": list(wilson(3, 4))}


def test_seed_item_interval_carries_item_and_seed_variance():
    one = seed_item_interval([[1, 0, 1, 1, 0, 1, 0, 1, 1, 1]])  # one seed: the Wilson interval of 7/10
    assert one["mean"] == 0.7 and one["ci95"] == list(wilson(7, 10))
    assert seed_item_interval([[1] * 8, [1] * 8])["ci95"] == [1.0, 1.0]
    # Two demo sets that disagree completely: every item is 1 under one, 0 under the other. Resampling
    # seeds gives 0, 0.5 or 1 (probabilities 1/4, 1/2, 1/4): the interval must span [0, 1].
    split = seed_item_interval([[1] * 10, [0] * 10])
    assert split["mean"] == 0.5 and split["ci95"] == [0.0, 1.0] and split["seed_means"] == [1.0, 0.0]
    # Two seeds that agree: only item variance; 5/10 over 10 items bootstraps to about [0.2, 0.8].
    agree = seed_item_interval([[1, 0] * 5, [1, 0] * 5])
    assert 0.1 <= agree["ci95"][0] <= 0.3 and 0.7 <= agree["ci95"][1] <= 0.9
    assert fmt_ci(split) == "50.0 [0.0, 100.0]"


def test_paired_difference_is_paired_and_mcnemar_by_hand():
    items = [1, 0, 1, 1, 0, 0, 1, 0, 1, 0] * 3
    same = paired_difference([items], [items])
    # paired: every replicate uses the same items on both sides, so equal rows differ by exactly 0
    assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0] and same["mcnemar_p"] == 1.0
    better = paired_difference([[1] * 10], [[0] * 10])
    assert better["diff"] == 1 and better["ci95"] == [1.0, 1.0]
    assert better["mcnemar_p"] == pytest.approx(2 / 1024)  # 10 discordant pairs, all one way: 2 * 0.5^10
    # 8 items right only for a, 2 only for b: P(X <= 2) + P(X >= 8), X ~ Bin(10, 1/2) = 112 / 1024
    a, b = [True] * 8 + [False] * 2 + [True] * 5, [False] * 8 + [True] * 2 + [True] * 5
    assert mcnemar(a, b) == pytest.approx(112 / 1024)
    with pytest.raises(ValueError, match="same items"):
        paired_difference([[1, 0]], [[1, 0, 1]])


def test_verdict_and_rows_to_match_by_hand():
    assert verdict({"ci95": [0.01, 0.3]}) == "supports"
    assert verdict({"ci95": [-0.3, -0.01]}) == "contradicts"
    assert verdict({"ci95": [-0.1, 0.2]}) == "no clear difference"
    assert verdict(None) == "incomplete"
    ci = lambda hi: {"ci95": [0.0, hi]}  # noqa: E731 - a table of hand-made intervals
    assert rows_to_match([(16, ci(0.4)), (64, ci(0.6)), (256, ci(0.9))], 0.5) == 64
    # reached at 16 but lost at 64: only 256 reaches it and stays there
    assert rows_to_match([(256, ci(0.9)), (16, ci(0.6)), (64, ci(0.4))], 0.5) == 256
    assert rows_to_match([(16, ci(0.6)), (64, ci(0.4))], 0.5) is None
    assert rows_to_match([(16, ci(0.6)), (64, None)], 0.5) is None


def test_baselines_and_a_shortcut_measure_a_constant_cannot_fake():
    b = baselines(["Yes", "Yes", "No"], ["Yes", "No", "No"])
    assert (b["majority_answer"], b["majority_accuracy"], b["majority_shortcut_rate"], b["shortcut_accuracy"]) == \
        ("Yes", 2 / 3, 1 / 3, 2 / 3)
    assert baselines(["3", "5"], [None, None])["shortcut_accuracy"] is None
    shortcut = ["Yes"] * 8 + ["No"] * 2
    # always "Yes": a 100% shortcut rate on every item whose shortcut says Yes, 0 on the others -> 0.5
    assert shortcut_balanced(["Yes"] * 10, shortcut)["mean"] == 0.5
    assert shortcut_balanced(shortcut, shortcut)["mean"] == 1.0
    assert shortcut_balanced(["No", "Yes"] * 5, shortcut)["mean"] == pytest.approx((4 / 8 + 1 / 2) / 2)
    assert shortcut_balanced(["3"], ["3"]) is None  # one label: not measurable
