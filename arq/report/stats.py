"""Uncertainty of certification results and paired tests between methods certified on the same images.

Accuracies are binomial proportions over the certified images: Clopper–Pearson intervals. ACR is a mean of
per-image radii (zero where wrong or abstained): percentile bootstrap over images. Two methods certified on the
same images are compared pairwise, which removes the between-image variance: McNemar's exact test on
"certified at radius r" and a paired bootstrap of the ACR difference.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact two-sided interval of a binomial proportion k/n."""
    if n == 0:
        return float("nan"), float("nan")
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def bootstrap_mean(values: np.ndarray, resamples: int, seed: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (images resampled with replacement)."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(resamples, len(values)))
    means = values[idx].mean(1)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def mcnemar(a: np.ndarray, b: np.ndarray) -> dict:
    """Exact McNemar test of two paired binary outcomes (e.g. certified at r) over the same images.

    Only discordant images carry information: under the null each is equally likely to favour a or b."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if only_a + only_b == 0 else float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return {"only_a": only_a, "only_b": only_b, "diff": (only_a - only_b) / len(a), "p": p}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int, seed: int,
                     confidence: float = CONFIDENCE) -> dict:
    """Mean difference a − b over the same images, its percentile bootstrap interval and a two-sided bootstrap
    p-value (twice the smaller share of resampled differences on either side of zero, counted as (k + 1) / (B + 1)
    so that a finite number of resamples never claims p = 0)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(resamples, len(d)))
    means = d[idx].mean(1)
    tail = (1 - confidence) / 2
    if np.all(d == 0):
        p = 1.0
    else:
        side = min(int((means <= 0).sum()), int((means >= 0).sum()))
        p = float(min(1.0, 2 * (side + 1) / (resamples + 1)))
    return {"diff": float(d.mean()), "low": float(np.quantile(means, tail)), "high": float(np.quantile(means, 1 - tail)),
            "p": p}
