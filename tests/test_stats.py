"""The transfer report's paired t-test against textbook values."""

from __future__ import annotations

import math

import pytest

from tune_jobs.stats import bonferroni, paired_t_test, paired_test, sign_test_p, student_t_two_sided_p


@pytest.mark.parametrize("t, df, p", [(12.706, 1, 0.05), (4.303, 2, 0.05), (2.228, 10, 0.05), (2.576, 10_000, 0.01),
                                      (0.0, 5, 1.0), (1.0, 1, 0.5)])
def test_student_t_critical_values(t, df, p):
    assert student_t_two_sided_p(t, df) == pytest.approx(p, abs=2e-4)
    assert student_t_two_sided_p(-t, df) == pytest.approx(p, abs=2e-4)


def test_paired_t_test_by_hand():
    a, b = [0.9, 0.8, 0.85], [0.7, 0.75, 0.6]
    diffs = [0.2, 0.05, 0.25]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    t, p = paired_t_test(a, b)
    assert t == pytest.approx(mean / (sd / math.sqrt(3)))
    assert p == pytest.approx(student_t_two_sided_p(t, 2))
    assert 0.05 < p < 0.2  # t ~ 2.9 on 2 degrees of freedom
    assert math.isnan(paired_t_test([1.0], [0.0])[1])
    # the same gain every time: t is infinite, p the sign test's (2 of 2 pairs one way: 2 / 2^2), never 0
    assert paired_t_test([1.0, 2.0], [0.0, 1.0]) == (math.inf, 0.5)
    # the same gain in accuracies, whose differences round apart (0.95 - 0.94 != 0.94 - 0.93 in floats)
    assert paired_t_test([0.95, 0.94, 0.95], [0.94, 0.93, 0.94]) == (math.inf, 0.25)
    assert paired_t_test([0.93, 0.92], [0.94, 0.93]) == (-math.inf, 0.5)
    t, _ = paired_t_test([0.95, 0.94, 0.96], [0.94, 0.93, 0.94])  # a real spread stays finite
    assert math.isfinite(t) and t > 0
    t, p = paired_t_test([0.1 + 0.2, 0.5], [0.3, 0.5])  # no gain, up to rounding: nothing favours either side
    assert math.isnan(t) and p == 1.0
    with pytest.raises(ValueError):
        paired_t_test([1.0], [1.0, 2.0])


def test_bonferroni():
    assert bonferroni(0.01, 4) == pytest.approx(0.04) and bonferroni(0.4, 4) == 1.0 and math.isnan(bonferroni(math.nan, 3))


def test_transfer_significance_pairs_inits_by_seed():
    from tune_jobs.stats import paired_t_test
    from tune_jobs.transfer import TransferConfig, significance

    config = TransferConfig(targets={"imdb": ["rotten_tomatoes"]}, shots=[0, 8], inits=["random", "tpv", "spot"],
                            seeds=[1, 2, 3])
    rows = []
    for seed, (random, tpv, spot) in zip([1, 2, 3], [(0.5, 0.7, 0.5), (0.6, 0.75, 0.6), (0.55, 0.8, 0.56)]):
        for k in (0, 8):
            rows += [{"target": "imdb", "init": init, "shots": k, "seed": seed, "test": value + k / 100}
                     for init, value in (("random", random), ("tpv", tpv), ("spot", spot))]
    tests = significance(config, "imdb", rows)
    assert [(r["shots"], r["init"]) for r in tests] == [(0, "TPV"), (0, "SPoT"), (8, "TPV"), (8, "SPoT")]
    tpv0 = tests[0]
    t, p = paired_t_test([0.7, 0.75, 0.8], [0.5, 0.6, 0.55])
    assert tpv0["gain"] == pytest.approx(0.2) and tpv0["t"] == pytest.approx(t) and tpv0["p"] == pytest.approx(p)
    assert tpv0["p (Bonferroni)"] == pytest.approx(min(1.0, 4 * p))
    assert significance(config.model_copy(update={"seeds": [1]}), "imdb", rows) == []  # one seed: no test
    assert [r["significant"] for r in tests] == ["no"] * 4
    # one sentence more on every seed (results/gpu/reports/gpu-yelp's SPoT at k=32): no spread, so the sign test
    # decides, and 3 of 3 seeds one way is p 0.25: not significant (the t-test's p 0 called it significant)
    random = {(r["shots"], r["seed"]): r["test"] for r in rows if r["init"] == "random"}
    even = [{**r, "test": random[(r["shots"], r["seed"])] + (0.01 if r["shots"] == 8 else 0.0)}
            if r["init"] == "spot" else r for r in rows]
    spot8 = next(r for r in significance(config, "imdb", even) if (r["shots"], r["init"]) == (8, "SPoT"))
    assert (spot8["t"], spot8["p"], spot8["p (Bonferroni)"], spot8["significant"]) == (math.inf, 0.25, 1.0, "no")


@pytest.mark.parametrize("wins, n, p", [(3, 3, 0.25), (0, 3, 0.25), (2, 3, 1.0), (5, 5, 0.0625), (9, 10, 22 / 1024),
                                        (0, 0, 1.0)])
def test_sign_test_against_the_binomial_by_hand(wins, n, p):
    assert sign_test_p(wins, n) == pytest.approx(p)


def test_a_gain_without_spread_is_named_so_and_its_design_floor_stated():
    """`paired_test` says which test decided and the least p it allows, for the verdicts' "cannot reach alpha"."""
    even = paired_test([0.95, 0.94, 0.95], [0.94, 0.93, 0.94])
    assert (even.spread, even.method, even.n, even.p, even.least_p) == (False, "sign test (no spread)", 3, 0.25, 0.25)
    assert even.mean_gain == pytest.approx(0.01)
    spread = paired_test([0.9, 0.8, 0.85], [0.7, 0.75, 0.6])
    assert (spread.spread, spread.method, spread.least_p) == (True, "paired t-test", 0.0)
    assert (spread.t, spread.p) == paired_t_test([0.9, 0.8, 0.85], [0.7, 0.75, 0.6])
    one = paired_test([0.9], [0.5])
    assert math.isnan(one.p) and math.isnan(one.least_p) and one.mean_gain == pytest.approx(0.4)
