"""Exact evaluation metrics over a whole split (never an average of per-worker values)."""

from __future__ import annotations

import numpy as np


def evaluate(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC and logloss of predicted click probabilities over every row given.

    Args:
        labels: (N,) 0/1.
        probs: (N,) predicted probabilities.

    Returns:
        ``{"auc", "logloss", "rows", "positive_rate"}``; AUC is NaN when only one class is present.
    """
    from sklearn.metrics import log_loss, roc_auc_score  # here: importing scikit-learn costs ~1 s, paid by every
    # process that imports the training loop (the trial, the Train controller), where only rank 0 evaluates

    labels = np.asarray(labels, dtype=np.float64)
    probs = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    both = 0 < labels.sum() < len(labels)
    return {
        "auc": float(roc_auc_score(labels, probs)) if both else float("nan"),
        "logloss": float(log_loss(labels, probs, labels=[0, 1])),
        "rows": int(len(labels)),
        "positive_rate": float(labels.mean()) if len(labels) else float("nan"),
    }
