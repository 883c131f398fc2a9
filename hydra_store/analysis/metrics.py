"""How well one contribution ranking agrees with another: sign error rate, Spearman and Pearson
correlation."""

from __future__ import annotations

import numpy as np
import pandas as pd


def sign_error_rate(predicted: np.ndarray, exact: np.ndarray) -> float:
    """Fraction of samples whose predicted contribution has the other sign than the exact one."""
    predicted, exact = np.asarray(predicted), np.asarray(exact)
    return float(np.mean(np.sign(predicted) != np.sign(exact)))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ties get their average rank)."""
    ra = pd.Series(np.asarray(a, dtype=np.float64)).rank().to_numpy()
    rb = pd.Series(np.asarray(b, dtype=np.float64)).rank().to_numpy()
    return pearson(ra, rb)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant or has fewer than two values."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
