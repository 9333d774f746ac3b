"""Exact evaluation metrics over a whole split (never an average of per-worker values)."""

from __future__ import annotations

import math

import numpy as np


PROB_EPS = 1e-7


def to_probabilities(logits: np.ndarray) -> np.ndarray:
    """Click probabilities of logits (the sigmoid in float64), clipped into (0, 1)."""
    with np.errstate(over="ignore"):  # below a logit of -709 exp overflows to inf, and 1 / inf is the right 0
        probs = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
    return np.clip(probs, PROB_EPS, 1 - PROB_EPS)


def evaluate_logits(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """:func:`evaluate` of a model's logits, as validation and ``mmctr predict`` score them: the AUC ranks the logits,
    the logloss takes their clipped probabilities (:func:`to_probabilities`)."""
    return evaluate(labels, to_probabilities(logits), scores=logits)


def evaluate(labels: np.ndarray, probs: np.ndarray, scores: np.ndarray | None = None) -> dict[str, float]:
    """AUC and logloss of predicted click probabilities over every row given.

    Args:
        labels: (N,) 0/1.
        probs: (N,) predicted probabilities.
        scores: (N,) what the AUC ranks, in the order of ``probs`` (the logits: probabilities clipped into (0, 1)
            tie the rows the model is surest of); ``probs`` when not given.

    Returns:
        ``{"auc", "auc_se", "logloss", "rows", "positive_rate"}``: ``auc_se`` is the AUC's standard error
        (:func:`auc_with_se`); both are NaN when only one class is present.
    """
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.clip(np.asarray(probs, dtype=np.float64), PROB_EPS, 1 - PROB_EPS)
    both = 0 < labels.sum() < len(labels)
    ranked = probs if scores is None else np.asarray(scores, dtype=np.float64)
    auc, se = auc_with_se(labels, ranked) if both else (float("nan"), float("nan"))  # scikit-learn's AUC (a test
    # checks it, ties included) and its standard error from one ranking
    return {
        "auc": auc,
        "auc_se": se,
        "logloss": logloss(labels, probs),
        "rows": int(len(labels)),
        "positive_rate": float(labels.mean()) if len(labels) else float("nan"),
    }


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities already clipped into (0, 1) (scikit-learn's ``log_loss`` of
    them; a test checks it). NaN for no rows."""
    if not len(labels):
        return float("nan")
    return float(-np.mean(labels * np.log(probs) + (1 - labels) * np.log1p(-probs)))


def midranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..N of ``x``, ties given the mean of their ranks; all NaN where ``x`` holds a NaN (``scipy.stats``'
    ``rankdata`` with its defaults; a test checks it).

    By hand, with NumPy, because importing ``scipy.stats`` took ~1 s and scikit-learn's metrics ~2 s (2-core VM,
    2026-12-01), paid at the first validation of every training run and every Tune trial, whose workers are new
    processes; both stay the tests' references."""
    x = np.asarray(x, dtype=np.float64)
    if np.isnan(x).any():
        return np.full(len(x), np.nan)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # the rank of each distinct value's last copy
    return ((last - counts + 1 + last) / 2.0)[inverse.reshape(-1)]


def auc_with_se(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """AUC and its standard error by DeLong's method (DeLong, DeLong & Clarke-Pearson, Biometrics 1988).

    Each positive's placement is the share of negatives it outscores (ties count half), each negative's the share
    of positives that outscore it; the AUC is the mean placement of the positives, and its variance is
    ``var(positive placements) / positives + var(negative placements) / negatives``. No distribution of the scores
    is assumed (Hanley–McNeil's formula assumes exponential ones). Two runs scored on the same rows err alike:
    :func:`compare_aucs` gives the standard error of their difference.
    """
    (row,) = compare_aucs(labels, [scores])
    return row["auc"], row["se"]


def compare_aucs(labels: np.ndarray, scores: list[np.ndarray]) -> list[dict[str, float]]:
    """AUC ± standard error of each score vector on the same rows, and the paired DeLong test of each against the
    first: ``[{"auc", "se", "diff", "diff_se", "z", "p"}, ...]`` (``diff`` = this AUC − the first's; ``p``
    two-sided, from the normal approximation). Standard errors, ``z`` and ``p`` are NaN where they are not defined:
    fewer than two rows of a class, or a NaN score (which makes that run's ``auc`` and ``diff`` NaN too; an
    infinite score ranks as the largest or smallest: defined). :func:`auc_covariance`, then :func:`paired_rows`.
    """
    return paired_rows(*auc_covariance(labels, scores))


def auc_covariance(labels: np.ndarray, scores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The AUCs of score vectors on the same rows and their DeLong covariance matrix (NaN where undefined: fewer
    than two rows of a class).

    The covariance of the AUCs is that of the placements (see :func:`auc_with_se`) over the positives plus that over
    the negatives, each divided by its count; placements come from midranks (:func:`midranks`), so this is
    O(N log N) per vector. Scores that order the rows alike have correlated AUCs, so the standard error of their
    difference is far below the root of the sum of their squares.
    """
    labels = np.asarray(labels).astype(bool)
    m, n = int(labels.sum()), int((~labels).sum())
    if not (m and n):
        raise ValueError(f"AUC needs both classes: {m} positives, {n} negatives")
    above, below = [], []
    for s in scores:
        s = np.asarray(s, dtype=np.float64)
        pos, neg = s[labels], s[~labels]
        ranks = midranks(np.concatenate([pos, neg]))
        above.append((ranks[:m] - midranks(pos)) / n)  # per positive: the share of negatives below it
        below.append(1.0 - (ranks[m:] - midranks(neg)) / m)  # per negative: the share of positives above it
    a, b = np.stack(above, axis=1), np.stack(below, axis=1)
    k = len(scores)
    if m < 2 or n < 2:  # one row of a class: its placements have no variance to estimate
        cov = np.full((k, k), np.nan)
    else:
        cov = np.atleast_2d(np.cov(a, rowvar=False)) / m + np.atleast_2d(np.cov(b, rowvar=False)) / n
    return a.mean(axis=0), cov


def paired_rows(aucs: np.ndarray, cov: np.ndarray) -> list[dict[str, float]]:
    """:func:`compare_aucs`' rows from :func:`auc_covariance`'s AUCs and covariance."""
    return [{"auc": float(auc), "se": math.sqrt(max(cov[i, i], 0.0)) if np.isfinite(cov[i, i]) else math.nan,
             **paired_difference(aucs, cov, 0, i)} for i, auc in enumerate(aucs)]


def paired_difference(aucs: np.ndarray, cov: np.ndarray, i: int, j: int) -> dict[str, float]:
    """The paired DeLong test of score vector ``j`` against ``i`` (from :func:`auc_covariance`): ``diff`` (AUC j −
    AUC i), ``diff_se``, ``z`` and the two-sided ``p``; NaN where undefined. A difference of no estimated spread
    (``diff_se`` 0) is p = 1 when there is none (a run against itself) and undefined otherwise: the placements of
    both runs vary by nothing (a run of one constant score against one that separates the classes), which leaves
    nothing to test against, not a certain difference (it was z = ±inf, p = 0)."""
    diff = float(aucs[j] - aucs[i])
    diff_se = math.sqrt(max(cov[j, j] + cov[i, i] - 2 * cov[j, i], 0.0)) if np.isfinite(cov[j, i]) else math.nan
    if not (math.isfinite(diff) and math.isfinite(diff_se)):
        z = math.nan
    elif diff_se > 0:
        z = diff / diff_se
    else:  # the same ordering of the rows (e.g. a run compared with itself)
        z = 0.0 if diff == 0 else math.nan
    return {"diff": diff, "diff_se": diff_se, "z": z,
            "p": math.nan if math.isnan(z) else math.erfc(abs(z) / math.sqrt(2))}


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of p-values tested together: the k-th smallest of m is multiplied by m − k + 1,
    then each is raised to the largest adjusted value before it and capped at 1. It holds the chance of any false
    "significant" among the m at the level read off, under any dependence between the tests (the pairs of a
    comparison share runs). NaN stays NaN and is not counted in m. Written here: scipy.stats adjusts for the false
    discovery rate only (``false_discovery_control``), and statsmodels is not a dependency."""
    order = sorted((i for i, p in enumerate(pvalues) if not math.isnan(p)), key=lambda i: pvalues[i])  # NaN unsortable
    out, running = [math.nan] * len(pvalues), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - k) * pvalues[i]))
        out[i] = running
    return out


def every_pair(aucs: np.ndarray, cov: np.ndarray, among: int | None = None) -> list[dict[str, float]]:
    """The paired test of every pair of the first ``among`` score vectors (all by default), ``i`` before ``j``:
    :func:`paired_difference` of ``j`` against ``i``, and ``p_holm``, its p adjusted over the pairs (:func:`holm`)."""
    n = len(aucs) if among is None else among
    return _with_holm([{"i": i, "j": j, **paired_difference(aucs, cov, i, j)}
                       for i in range(n) for j in range(i + 1, n)])


def _with_holm(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    """``rows`` (tests of pairs, each with its ``p``), each given ``p_holm``: its p adjusted over them (holm)."""
    for row, adjusted in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = adjusted
    return rows


def se_text(se: float | None) -> str:
    """`` ± 0.0048`` for a standard error; empty when there is none (runs from before it was recorded)."""
    return f" ± {se:.4f}" if se is not None and np.isfinite(se) else ""


def compare_groups(aucs: np.ndarray, cov: np.ndarray, groups: list[list[int]]) -> list[dict[str, float]]:
    """Groups of runs (indices into ``aucs``), each the same config trained with other seeds: per group its
    ``runs``, ``mean`` AUC and ``sd`` over its runs, and against the first group :func:`group_difference`'s
    figures (NaN for the first group's difference to itself).

    Raises:
        ValueError: a group of fewer than 2 runs (a spread over seeds needs two).
    """
    _check_group_sizes(groups)
    itself = dict.fromkeys(("diff", "diff_se", "df", "p", "diff_se_rows"), math.nan)
    return [{"runs": len(group), "mean": float(aucs[group].mean()), "sd": float(aucs[group].std(ddof=1)),
             **(group_difference(aucs, cov, groups[0], group) if k else itself)} for k, group in enumerate(groups)]


def group_difference(aucs: np.ndarray, cov: np.ndarray, base: list[int], group: list[int]) -> dict[str, float]:
    """Group ``group`` against group ``base`` (indices into ``aucs``, 2+ runs each): the difference of their mean
    AUCs with Welch's test over the runs' AUCs (``diff``, ``diff_se``, ``df``, ``p``: training noise, the scored
    rows held fixed), and ``diff_se_rows``, the DeLong standard error of that difference of means (the rows' noise,
    the trained models held fixed; from ``cov``, :func:`auc_covariance`). ``df`` and ``p`` are NaN where the runs'
    AUCs have no spread (runs that repeat each other: a zero-spread test would call any difference certain) or one
    is NaN."""
    from scipy import stats  # imported here: training workers import this module and never compare

    nan = math.nan
    values, first = aucs[group], aucs[base]
    va, vb = values.var(ddof=1) / len(group), first.var(ddof=1) / len(base)
    diff, se = float(values.mean() - first.mean()), math.sqrt(va + vb)
    df = p = nan
    if se > 0 and math.isfinite(se) and math.isfinite(diff):
        df = (va + vb) ** 2 / (va ** 2 / (len(group) - 1) + vb ** 2 / (len(base) - 1))
        p = float(2 * stats.t.sf(abs(diff) / se, df))
    w = np.zeros(len(aucs))
    w[group] += 1 / len(group)
    w[base] -= 1 / len(base)
    rows_var = float(w @ cov @ w) if np.isfinite(cov).all() else nan
    return {"diff": diff, "diff_se": se, "df": df, "p": p,
            "diff_se_rows": math.sqrt(max(rows_var, 0.0)) if math.isfinite(rows_var) else nan}


def _check_group_sizes(groups: list[list[int]]) -> None:
    if any(len(group) < 2 for group in groups):
        raise ValueError(f"a group of {min(len(g) for g in groups)} run: its spread over seeds needs 2 or more")


def every_group_pair(aucs: np.ndarray, cov: np.ndarray, groups: list[list[int]]) -> list[dict[str, float]]:
    """:func:`group_difference` of every pair of groups, ``i`` before ``j`` (group j against group i), with
    ``p_holm``, Welch's p adjusted over the pairs (:func:`holm`)."""
    _check_group_sizes(groups)
    return _with_holm([{"i": i, "j": j, **group_difference(aucs, cov, groups[i], groups[j])}
                       for i in range(len(groups)) for j in range(i + 1, len(groups))])
