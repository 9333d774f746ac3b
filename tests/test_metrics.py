"""Exact validation metrics: the AUC and its standard error over the whole split."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mmctr_ray.metrics import auc_with_se, compare_aucs, evaluate, evaluate_logits, logloss, midranks, to_probabilities


def _scores(rng: np.random.Generator, n: int, shift: float = 1.4):
    labels = rng.random(n) < 0.25
    return labels, rng.normal(size=n) + shift * labels


def test_delong_auc_is_scikit_learns_ties_included():
    rng = np.random.default_rng(0)
    labels, scores = _scores(rng, 3_000)
    scores = np.round(scores, 1)  # many ties: each counts half
    auc, _ = auc_with_se(labels, scores)
    assert auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_midranks_and_logloss_are_scipys_and_scikit_learns():
    """Written with NumPy so that a training worker's first validation does not import scipy.stats and
    scikit-learn's metrics (~2 s); the libraries stay the references."""
    from scipy.stats import rankdata
    from sklearn.metrics import log_loss

    rng = np.random.default_rng(5)
    for x in (np.round(rng.normal(size=2_001), 1),  # many ties
              rng.normal(size=500).astype(np.float32),  # none
              np.array([3.0, -np.inf, np.inf, 3.0, -0.0, 0.0, 1e300]),  # infinities, signed zeros
              np.full(7, 2.5), np.array([1.0]), np.zeros(0)):
        assert np.array_equal(midranks(x), rankdata(x))
    with_nan = np.array([0.3, np.nan, 0.1])
    assert np.isnan(midranks(with_nan)).all() and np.isnan(rankdata(with_nan)).all()
    labels = (rng.random(3_000) < 0.3).astype(np.float64)
    probs = np.clip(rng.random(3_000), 1e-7, 1 - 1e-7)
    probs[:5] = [1e-7, 1 - 1e-7, 0.5, 1e-7, 1 - 1e-7]
    assert logloss(labels, probs) == pytest.approx(log_loss(labels, probs), rel=1e-12)
    assert evaluate(labels, probs)["logloss"] == pytest.approx(log_loss(labels, probs), rel=1e-12)
    assert logloss(np.zeros(4), np.full(4, 0.2)) == pytest.approx(log_loss(np.zeros(4), np.full(4, 0.2),
                                                                             labels=[0, 1]), rel=1e-12)


def _bootstrap_se(rng: np.random.Generator, labels: np.ndarray, scores: np.ndarray, times: int = 1_000) -> float:
    boot = []
    for _ in range(times):
        i = rng.integers(0, len(labels), len(labels))
        boot.append(roc_auc_score(labels[i], scores[i]))
    return float(np.std(boot))


def test_the_standard_error_is_the_spread_of_the_auc_over_resampled_rows():
    rng = np.random.default_rng(1)
    labels, scores = _scores(rng, 2_000)
    _, se = auc_with_se(labels, scores)
    assert se == pytest.approx(_bootstrap_se(rng, labels, scores), rel=0.1)
    # few positives, scored far tighter than the negatives: each class's placement variance is over its own count
    # (a mutation that swapped the two counts gave 0.0111 here for 0.0045, and moved the case above by ~3% only)
    skewed = rng.random(4_000) < 0.1
    tight = np.where(skewed, rng.normal(1.5, 0.3, 4_000), rng.normal(0.0, 1.0, 4_000))
    assert auc_with_se(skewed, tight)[1] == pytest.approx(_bootstrap_se(rng, skewed, tight), rel=0.15)
    # and it shrinks as the square root of the rows
    labels4, scores4 = _scores(rng, 8_000)
    assert auc_with_se(labels4, scores4)[1] == pytest.approx(se / 2, rel=0.15)


def test_evaluate_reports_the_standard_error_and_nan_for_one_class():
    rng = np.random.default_rng(2)
    labels, scores = _scores(rng, 1_000)
    probs = 1 / (1 + np.exp(-scores))
    got = evaluate(labels, probs)
    assert got["auc_se"] == pytest.approx(auc_with_se(labels, probs)[1]) and 0 < got["auc_se"] < 0.05
    assert got["rows"] == 1_000 and got["positive_rate"] == pytest.approx(labels.mean())  # "N clicks of M rows"
    assert 0.2 < labels.mean() < 0.45  # so a rate counted from the other class would differ
    for one_class in (np.zeros(10), np.ones(10)):  # either class alone: no AUC, and no error
        one = evaluate(one_class, np.full(10, 0.3))
        assert np.isnan(one["auc"]) and np.isnan(one["auc_se"]) and one["rows"] == 10
    with pytest.raises(ValueError, match="both classes: 0 positives, 10 negatives"):
        auc_with_se(np.zeros(10), np.full(10, 0.3))


def test_auc_ranks_the_logits_not_the_clipped_probabilities():
    """Probabilities clipped into (0, 1) tie every logit beyond ±16 (and fp32 ones close logits near 0 or 1): the
    AUC of these four rows was 0.625 where the model's own ranking gives 0.75."""
    from sklearn.metrics import roc_auc_score

    labels = np.array([1, 0, 1, 0])
    logits = np.array([17, 16.5, 0.3, 0.1], dtype=np.float32)
    probs = to_probabilities(logits)
    assert evaluate(labels, probs)["auc"] == 0.625  # 17 and 16.5 tie once clipped
    got = evaluate(labels, probs, scores=logits)
    assert got["auc"] == pytest.approx(roc_auc_score(labels, logits)) == pytest.approx(0.75)
    assert got["logloss"] == evaluate(labels, probs)["logloss"]  # from the probabilities, as before
    # what validation and `mmctr predict` call: a mutation that ranked the probabilities there passed every test
    assert evaluate_logits(labels, logits) == got


def test_the_paired_test_knows_that_runs_on_the_same_rows_err_alike():
    rng = np.random.default_rng(3)
    labels, signal = _scores(rng, 3_000)
    a = signal + rng.normal(scale=0.3, size=len(labels))
    b = signal + 0.15 * labels + rng.normal(scale=0.3, size=len(labels))  # a little better, mostly the same order
    first, second = compare_aucs(labels, [a, b])
    assert first["diff"] == 0 and first["p"] == 1.0
    assert second["auc"] == pytest.approx(roc_auc_score(labels, b)) and second["diff"] > 0
    assert second["diff_se"] < 0.5 * np.hypot(first["se"], second["se"])  # far below the independent bound
    diffs = []
    for _ in range(1_000):
        i = rng.integers(0, len(labels), len(labels))
        diffs.append(roc_auc_score(labels[i], b[i]) - roc_auc_score(labels[i], a[i]))
    assert second["diff_se"] == pytest.approx(np.std(diffs), rel=0.1)
    assert second["p"] == pytest.approx(math.erfc(second["diff"] / second["diff_se"] / math.sqrt(2)))
    same = compare_aucs(labels, [a, a.copy()])[1]
    assert same["diff"] == 0 and same["diff_se"] == 0 and same["p"] == 1.0
    # a difference of moderate z (the case above is at z ~ 7, where any p is ~0): the normal's two-sided p
    from scipy.stats import norm

    moderate = []
    for scale in (0.0, 0.01, 0.05):  # z -2.27, -0.58 and 3.2 on these rows
        c = a + scale * labels + rng.normal(scale=0.2, size=len(labels))
        row = compare_aucs(labels, [a, c])[1]
        assert row["p"] == pytest.approx(2 * norm.sf(abs(row["z"])), rel=1e-9)
        assert row["z"] == pytest.approx(row["diff"] / row["diff_se"], rel=1e-12)
        moderate.append(0.01 < row["p"] < 0.9)
    assert moderate[:2] == [True, True]


def test_undefined_figures_are_nan_never_a_certain_difference():
    """A run that scored NaN, or a class of one row, has no standard error: never p = 0."""
    labels = np.array([1, 1, 0, 0, 0])
    ok, broken = np.array([0.9, 0.8, 0.2, 0.3, 0.1]), np.array([0.9, np.nan, 0.2, 0.3, 0.1])
    row = compare_aucs(labels, [ok, broken])[1]
    assert all(np.isnan(row[k]) for k in ("se", "diff_se", "z", "p"))
    single = compare_aucs(np.array([1, 0, 0, 0]), [ok[:4], np.array([0.1, 0.8, 0.2, 0.3])])
    assert single[1]["diff"] == -1.0 and all(np.isnan(single[1][k]) for k in ("se", "diff_se", "z", "p"))
    # placements that vary by nothing (a run of one constant score against one that separates the classes): no
    # spread to test a difference of 0.5 against; it was z = -inf, p = 0 (helper-140)
    flat = compare_aucs(np.array([1, 1, 0, 0]), [np.array([2.0, 2, 1, 1]), np.ones(4)])[1]
    assert flat["diff"] == -0.5 and flat["diff_se"] == 0 and math.isnan(flat["z"]) and math.isnan(flat["p"])


def test_groups_of_runs_get_the_mean_the_sd_welchs_test_and_the_rows_error_of_their_difference():
    """`compare --group`: one config trained with several seeds. Welch's test over the runs' AUCs (scipy's own is
    the reference), and DeLong's error of the difference of group means: for groups of two copies of one vector
    each, the paired error of those two vectors."""
    from scipy.stats import ttest_ind

    from mmctr_ray.metrics import auc_covariance, compare_groups

    rng = np.random.default_rng(3)
    labels = rng.random(2000) < 0.3
    signal = labels + rng.normal(0, 1.2, 2000)
    scores = [signal + rng.normal(0, s, 2000) for s in (0.3, 0.4, 0.35, 0.8, 0.9, 0.7, 0.85)]
    aucs, cov = auc_covariance(labels, scores)
    first, second = compare_groups(aucs, cov, [[0, 1, 2], [3, 4, 5, 6]])
    assert (first["runs"], second["runs"]) == (3, 4) and math.isnan(first["p"]) and math.isnan(first["diff"])
    assert first["mean"] == pytest.approx(aucs[:3].mean()) and first["sd"] == pytest.approx(aucs[:3].std(ddof=1))
    assert second["mean"] == pytest.approx(aucs[3:].mean()) and second["sd"] == pytest.approx(aucs[3:].std(ddof=1))
    welch = ttest_ind(aucs[3:], aucs[:3], equal_var=False)
    assert second["p"] == pytest.approx(welch.pvalue) and second["diff"] / second["diff_se"] == pytest.approx(
        welch.statistic)
    twice = [scores[0], scores[0], scores[3], scores[3]]
    paired = compare_aucs(labels, [scores[0], scores[3]])[1]
    (_, copies) = compare_groups(*auc_covariance(labels, twice), [[0, 1], [2, 3]])
    assert copies["diff_se_rows"] == pytest.approx(paired["diff_se"])
    assert copies["diff"] == pytest.approx(paired["diff"])
    assert copies["sd"] == 0 and math.isnan(copies["p"])  # runs that repeat each other: no spread to test against
    with pytest.raises(ValueError, match="a group of 1 run: its spread over seeds needs 2 or more"):
        compare_groups(aucs, cov, [[0, 1], [2]])



def test_holm_multiplies_the_kth_smallest_p_by_the_tests_left_keeps_the_order_and_skips_nan():
    from mmctr_ray.metrics import holm

    # sorted 0.005, 0.01, 0.03, 0.04 → ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 → raised to the running max: 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0] and holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1
    got = holm([0.02, math.nan, 0.01])  # NaN (an undefined test) is not one of the m tests
    assert got[0] == pytest.approx(0.02) and math.isnan(got[1]) and got[2] == pytest.approx(0.02)
    assert holm([]) == [] and holm([0.04]) == [0.04]  # one test: nothing to adjust


def test_every_pair_is_the_paired_test_of_each_two_runs_and_of_each_two_groups():
    """`compare --pairs all`: pair (i, j) is what comparing run j against run i alone gives, and a pair of groups
    what `compare_groups` gives for those two groups alone; p_holm adjusts each table's p over its own pairs."""
    from mmctr_ray.metrics import auc_covariance, compare_groups, every_group_pair, every_pair, holm

    rng = np.random.default_rng(5)
    labels, signal = _scores(rng, 2_000)
    scores = [signal + rng.normal(scale=s, size=len(labels)) for s in (0.3, 0.5, 0.4, 0.9, 0.35, 0.8)]
    aucs, cov = auc_covariance(labels, scores)
    rows = every_pair(aucs, cov, among=4)  # the first four: the RUNs given; the rest are groups' runs
    assert [(r["i"], r["j"]) for r in rows] == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    for r in rows:
        alone = compare_aucs(labels, [scores[r["i"]], scores[r["j"]]])[1]
        for key in ("diff", "diff_se", "z", "p"):
            assert r[key] == pytest.approx(alone[key], rel=1e-9, abs=1e-12), (r, key)
    assert [r["p_holm"] for r in rows] == pytest.approx(holm([r["p"] for r in rows]))
    assert all(r["p_holm"] >= r["p"] for r in rows) and any(r["p_holm"] > r["p"] for r in rows)
    assert every_pair(aucs, cov)[-1]["j"] == 5 and len(every_pair(aucs, cov)) == 15
    groups = [[0, 2], [1, 4], [3, 5]]
    pairs = every_group_pair(aucs, cov, groups)
    assert [(g["i"], g["j"]) for g in pairs] == [(0, 1), (0, 2), (1, 2)]
    for g in pairs:  # the pair's own figures; each group's mean and sd are the groups table's, not the pair's
        alone = compare_groups(aucs, cov, [groups[g["i"]], groups[g["j"]]])[1]
        assert set(g) == {"i", "j", "diff", "diff_se", "df", "p", "diff_se_rows", "p_holm"}
        assert {k: g[k] for k in ("diff", "diff_se", "df", "p", "diff_se_rows")} == pytest.approx(
            {k: alone[k] for k in ("diff", "diff_se", "df", "p", "diff_se_rows")})
    assert [g["p_holm"] for g in pairs] == pytest.approx(holm([g["p"] for g in pairs]))
    with pytest.raises(ValueError, match="a group of 1 run: its spread over seeds needs 2 or more"):
        every_group_pair(aucs, cov, [[0, 1, 2], [3]])


def test_the_standard_error_is_written_to_four_places_and_left_out_where_undefined():
    from mmctr_ray.metrics import se_text

    assert se_text(0.00483) == " ± 0.0048" and se_text(math.nan) == ""
