"""Uncertainty of certification results and paired tests between methods certified on the same images.

Accuracies of one model are binomial proportions over the certified images: Clopper–Pearson intervals. ACR is a
mean of per-image radii (zero where wrong or abstained): percentile bootstrap over images. Two models certified on
the same images are compared pairwise, which removes the between-image variance: McNemar's exact test on
"certified at radius r" and a paired bootstrap of the ACR difference.

A method run with several seeds (one search, finetune and certification each) is a seeds × images table, seeds and
images crossed. Its uncertainty has two sources, the seed (which policy and finetune one gets) and the images, so
its intervals and paired tests come from a **hierarchical bootstrap** that resamples both: each resample draws the
seeds with replacement and, independently, the images with replacement, and averages the table over the drawn
rows and columns (the crossed-effects bootstrap). Paired tests draw the same seeds and images for both methods.
With one seed the seed draw is trivial and the image draws are the same random numbers as the plain image
bootstrap, so the two give identical intervals.
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


def _table(values) -> np.ndarray:
    """values as a seeds × images table (a 1-d array is one seed)."""
    v = np.asarray(values, dtype=float)
    return v[None, :] if v.ndim == 1 else v


def hierarchical_means(values, resamples: int, seed: int, block: int = 1000) -> np.ndarray:
    """Bootstrap means of a seeds × images table: images drawn first (the plain image bootstrap's numbers), then
    seeds, both with replacement; in blocks of resamples to bound memory."""
    v = _table(values)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, v.shape[1], size=(resamples, v.shape[1]))
    if v.shape[0] == 1:
        return v[0][images].mean(1)
    seeds = rng.integers(0, v.shape[0], size=(resamples, v.shape[0]))
    return np.concatenate([v[seeds[i:i + block, :, None], images[i:i + block, None, :]].mean((1, 2))
                           for i in range(0, resamples, block)])


def bootstrap_mean(values, resamples: int, seed: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``: images (1-d), or seeds × images hierarchically."""
    means = hierarchical_means(values, resamples, seed)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def mcnemar(a: np.ndarray, b: np.ndarray) -> dict:
    """Exact McNemar test of two paired binary outcomes (e.g. certified at r) over the same images.

    Only discordant images carry information: under the null each is equally likely to favour a or b."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if only_a + only_b == 0 else float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return {"only_a": only_a, "only_b": only_b, "diff": (only_a - only_b) / len(a), "p": p}


def paired_bootstrap(a, b, resamples: int, seed: int, confidence: float = CONFIDENCE) -> dict:
    """Mean difference a − b over the same images (and the same seeds: seeds × images tables, row k of each from
    seed k), its percentile bootstrap interval and a two-sided bootstrap p-value (twice the smaller share of
    resampled differences on either side of zero, counted as (k + 1) / (B + 1) so that a finite number of
    resamples never claims p = 0). Hierarchical with several seeds (module docstring)."""
    d = _table(a) - _table(b)
    means = hierarchical_means(d, resamples, seed)
    tail = (1 - confidence) / 2
    if np.all(d == 0):
        p = 1.0
    else:
        side = min(int((means <= 0).sum()), int((means >= 0).sum()))
        p = float(min(1.0, 2 * (side + 1) / (resamples + 1)))
    return {"diff": float(d.mean()), "low": float(np.quantile(means, tail)), "high": float(np.quantile(means, 1 - tail)),
            "p": p}
