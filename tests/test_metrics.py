"""The statistics, against hand-computed answers (each test fails when its function is broken)."""
import numpy as np
import pytest

from iclvsft.metrics import (
    Z95,
    baselines,
    fmt_ci,
    holm,
    mcnemar,
    paired_difference,
    paired_test,
    rate,
    rows_to_match,
    seed_item_interval,
    shortcut_balanced,
    tango_interval,
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
    # two seeds right on every item: the bootstrap alone says [1, 1]; 8 items cannot show that: Wilson's 8/8
    assert seed_item_interval([[1] * 8, [1] * 8])["ci95"] == list(wilson(8, 8))
    # Two demo sets that disagree completely: every item is 1 under one, 0 under the other. Resampling
    # seeds gives 0, 0.5 or 1 (probabilities 1/4, 1/2, 1/4): the interval must span [0, 1].
    split = seed_item_interval([[1] * 10, [0] * 10])
    assert split["mean"] == 0.5 and split["ci95"] == [0.0, 1.0] and split["seed_means"] == [1.0, 0.0]
    # Two seeds that agree: only item variance; 5/10 over 10 items bootstraps to about [0.2, 0.8].
    agree = seed_item_interval([[1, 0] * 5, [1, 0] * 5])
    assert 0.1 <= agree["ci95"][0] <= 0.3 and 0.7 <= agree["ci95"][1] <= 0.9
    assert fmt_ci(split) == "50.0 [0.0, 100.0]"


def test_paired_difference_one_seed_is_mcnemar_with_tango_interval_by_hand():
    items = [1, 0, 1, 1, 0, 0, 1, 0, 1, 0] * 3
    same = paired_difference([items], [items])
    assert same["diff"] == 0 and same["p"] == 1.0 and same["discordant"] == [0, 0]
    # no discordant item of 30: the score interval solves n d / sqrt(n d (1 - d)) = z -> d = z^2 / (n + z^2)
    half = Z95 ** 2 / (30 + Z95 ** 2)
    assert same["ci95"] == pytest.approx([-half, half], abs=1e-9)
    better = paired_difference([[1] * 10], [[0] * 10])
    assert better["diff"] == 1 and better["p"] == pytest.approx(2 / 1024)  # 10 discordant pairs, all one way
    # 8 items right only for a, 2 only for b: P(X <= 2) + P(X >= 8), X ~ Bin(10, 1/2) = 112 / 1024
    a, b = [True] * 8 + [False] * 2 + [True] * 5, [False] * 8 + [True] * 2 + [True] * 5
    assert mcnemar(a, b) == pytest.approx(112 / 1024)
    assert paired_difference([a], [b])["p"] == pytest.approx(112 / 1024)
    with pytest.raises(ValueError, match="same items"):
        paired_difference([[1, 0]], [[1, 0, 1]])


def test_tango_bounds_are_where_the_score_test_rejects_by_a_second_route():
    """At each bound the score statistic equals -+z; recomputed with the restricted maximum-likelihood
    estimate found numerically (scipy) instead of Tango's closed form."""
    from scipy.optimize import minimize_scalar

    for only_a, only_b, n in ((4, 0, 40), (7, 2, 40), (30, 41, 200)):
        lo, hi = tango_interval(only_a, only_b, n)
        for delta, target in ((lo, Z95), (hi, -Z95)):
            # P(a right, b wrong) = q + delta, P(b right, a wrong) = q; maximise the likelihood over q
            lower, upper = max(0.0, -delta) + 1e-12, (1 - delta) / 2 - 1e-12
            def nll(q, a=only_a, b=only_b, n=n, d=delta):
                return -(a * np.log(q + d) + b * np.log(q) + (n - a - b) * np.log(1 - 2 * q - d))

            q = minimize_scalar(nll, bounds=(lower, upper), method="bounded", options={"xatol": 1e-12}).x
            stat = (only_a - only_b - n * delta) / np.sqrt(n * (2 * q + delta * (1 - delta)))
            assert stat == pytest.approx(target, abs=1e-4)


def test_exact_paired_test_with_seeds_by_hand():
    # a: 2 seeds, b: 1 seed; per-item differences of the seed means 1, 1/2, 0 -> integer weights 2, 1:
    # the sign-flip sums +-2 +-1 = 3, 1, -1, -3 (each 1/4); observed 3: p = P(|T| >= 3) = 1/2
    assert paired_test([[1, 1, 0], [1, 0, 0]], [[0, 0, 0]]) == pytest.approx(0.5)
    # five items all one way at weight 2 (a right on both seeds, b wrong): 2 * 0.5^5
    assert paired_test([[1] * 5, [1] * 5], [[0] * 5]) == pytest.approx(2 / 32)
    assert paired_test([[1, 0]] * 3, [[1, 0]] * 3) == 1.0
    d = paired_difference([[1] * 40] * 3, [[1] * 40] * 3)  # every seed right everywhere: no width from t
    assert d["p"] == 1.0 and d["ci95"][0] < 0 < d["ci95"][1]  # ... but the score interval keeps some


def test_holm_and_the_verdict_rule_by_hand():
    # sorted p 0.01, 0.03, 0.04, 0.5 (None is not in the family): x4, x3, x2, x1, then running maximum
    assert holm([0.01, 0.04, 0.03, None, 0.5]) == pytest.approx([0.04, 0.09, 0.09, None, 0.5])
    assert holm([]) == []
    # The cases, 40 paired items: ICL right and FT wrong on 4 items, the reverse on 0. The old
    # percentile bootstrap said [0.025, 0.20] -> "supports"; McNemar's p is 0.125: no clear difference.
    four = paired_difference([[1] * 4 + [0] * 36], [[0] * 40])
    assert four["p"] == pytest.approx(0.125) and verdict(four) == "no clear difference"
    five = paired_difference([[1] * 5 + [0] * 35], [[0] * 40])
    assert five["p"] == pytest.approx(0.0625) and verdict(five) == "no clear difference"
    six = paired_difference([[1] * 6 + [0] * 34], [[0] * 40])
    assert six["p"] == pytest.approx(0.03125) and verdict(six) == "supports"
    worse = paired_difference([[0] * 40], [[1] * 6 + [0] * 34])
    assert verdict(worse) == "contradicts"
    # ... but one of six verdicts: Holm multiplies the smallest p by 6 -> 0.1875, no verdict
    assert verdict(six, holm([six["p"]] + [1.0] * 5)[0]) == "no clear difference"
    assert verdict(None) == "incomplete"


def test_rows_to_match_from_the_paired_test_by_hand():
    def at(icl_right: int, ft_right: int, n: int = 50) -> dict:  # ICL right on the first items, FT too
        return paired_difference([[1] * icl_right + [0] * (n - icl_right)], [[1] * ft_right + [0] * (n - ft_right)])

    # The case: FT 0/50 at every N, ICL 5% (2.5 of 50 over two seeds; here 3/50 and 2/50). The old
    # rule answered 16. ICL does not clear a constant answer (8%): "not defined".
    icl = rate([True] * 5 + [False] * 95)
    zero = paired_difference([[1] * 3 + [0] * 47, [1] * 2 + [0] * 48], [[0] * 50])
    assert rows_to_match([(16, zero), (64, zero), (256, zero)], icl, 0.08) == "not defined"
    # ICL 40/50 (Wilson lower bound 0.67 > the 0.5 constant): N=16 at 10/50 is significantly worse (p < 1e-6),
    # N=64 at 38/50 and N=256 at 40/50 are not (2 discordant items, p = 0.5; none)
    icl = rate([True] * 40 + [False] * 10)
    points = [(16, at(40, 10)), (64, at(40, 38)), (256, at(40, 40))]
    assert rows_to_match(points, icl, 0.5) == 64
    # matched at 16, lost at 64: only 256 is matched for good
    assert rows_to_match([(256, at(40, 40)), (16, at(40, 38)), (64, at(40, 10))], icl, 0.5) == 256
    assert rows_to_match([(16, at(40, 38)), (64, at(40, 10))], icl, 0.5) == "not reached"
    assert rows_to_match([(16, at(40, 38)), (64, None)], icl, 0.5) == "not reached"  # a missing cell
    assert rows_to_match(points, icl, 0.7) == "not defined"  # lower bound 0.67 <= 0.7
    assert at(40, 38)["p"] == pytest.approx(0.5)


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
