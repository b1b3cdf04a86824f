"""Statistical soundness of CERTIFY on a classifier whose smoothed version is known in closed form.

For the linear binary classifier f(x) = [w·x + b > 0] and ε ~ N(0, σ²I), w·ε ~ N(0, σ²‖w‖²), so
P[f(x+ε) = c] = Φ(|w·x + b| / (σ‖w‖)) for the class c = f(x), and the smoothed classifier's exact ℓ2
robustness radius is |w·x + b| / ‖w‖ (the distance to the decision hyperplane). A certified radius may
exceed it only with probability ≤ α.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from torch import nn

from arq.smoothing import ABSTAIN, Smooth, certified_radius

SIGMA = 0.5
W = torch.tensor([3.0, 4.0])  # ‖w‖ = 5


class LinearBinary(nn.Module):
    """Two logits (-s, s) with s = w·x + b: argmax is 1 exactly when w·x + b > 0."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w = nn.Parameter(w.clone(), requires_grad=False)
        self.b = b

    def forward(self, x):
        s = x @ self.w + self.b
        return torch.stack([-s, s], dim=1)


def setup(p_a: float, sigma: float = SIGMA):
    """Classifier and input x = 0 such that the top class 1 has probability exactly p_a under noise."""
    true_radius = sigma * norm.ppf(p_a)
    b = float(W.norm()) * true_radius
    model = LinearBinary(W, b)
    x = torch.zeros(2)
    # the closed form the test relies on
    assert abs(float(x @ W + b)) / float(W.norm()) == pytest.approx(true_radius)
    return model, x, true_radius


def test_closed_form_probability_matches_simulation():
    model, x, _ = setup(0.9)
    smooth = Smooth(model, num_classes=2, sigma=SIGMA, batch_size=200_000)
    counts = smooth.sample_counts(x, 200_000, torch.Generator().manual_seed(0))
    # binomial standard error at p = 0.9, n = 2e5 is 6.7e-4; allow 5 of them
    assert counts[1].item() / 200_000 == pytest.approx(0.9, abs=5 * math.sqrt(0.09 / 200_000))


@pytest.mark.parametrize("p_a,runs", [(0.9, 2000), (0.7, 1000)])
def test_certified_radius_exceeds_the_true_radius_at_most_alpha_of_the_time(p_a, runs):
    alpha, n0, n = 0.05, 10, 500
    model, x, true_radius = setup(p_a)
    smooth = Smooth(model, num_classes=2, sigma=SIGMA, batch_size=1000)
    failures = naive_failures = abstains = 0
    for seed in range(runs):
        cert = smooth.certify(x, n0, n, alpha, torch.Generator().manual_seed(10_000 + seed))
        if cert.prediction == ABSTAIN:
            abstains += 1
        elif cert.prediction != 1 or cert.radius > true_radius:
            failures += 1
        # the same counts without the confidence bound (plug-in estimate): must fail about half the time,
        # which shows the experiment has the power to catch an unsound bound
        if cert.prediction == 1 or cert.prediction == ABSTAIN:
            naive_failures += certified_radius(SIGMA, cert.count / n) > true_radius
    se = math.sqrt(alpha * (1 - alpha) / runs)
    rate = failures / runs
    assert rate <= alpha + 3 * se, f"certified radius above the true radius in {rate:.3%} of runs (α = {alpha})"
    assert naive_failures / runs > 0.3
    # Abstentions come (almost) only from selecting the wrong class on the n0 = 10 selection samples, which
    # happens when at most 5 of them vote for class 1 (a 5–5 tie goes to the lower index, class 0).
    p_abstain = binom.cdf(n0 // 2, n0, p_a)
    assert abs(abstains / runs - p_abstain) < 4 * math.sqrt(p_abstain * (1 - p_abstain) / runs) + 1 / runs


def test_mean_certified_radius_converges_to_the_true_radius():
    p_a, alpha, n0, reps = 0.9, 0.001, 100, 20
    model, x, true_radius = setup(p_a)
    smooth = Smooth(model, num_classes=2, sigma=SIGMA, batch_size=100_000)
    sizes = [100, 1_000, 10_000, 100_000]
    means = []
    for n in sizes:
        radii = [smooth.certify(x, n0, n, alpha, torch.Generator().manual_seed(1000 * n + r)).radius
                 for r in range(reps)]
        means.append(float(np.mean(radii)))
    gaps = [true_radius - m for m in means]
    assert means == sorted(means), f"mean certified radius should grow with n: {means}"
    assert all(g > 0 for g in gaps), f"mean certified radius above the true radius: {means} vs {true_radius}"
    # Predicted gap for large n (normal approximation to the one-sided Clopper–Pearson bound):
    #   p_A - p_lower ≈ z_{1-α} √(p_A(1-p_A)/n), and dR/dp = σ / φ(Φ⁻¹(p_A)),
    # i.e. ≈ 0.0167σ = 0.0083 at n = 1e5. The run-to-run spread of the mean of 20 radii is ≈ 0.0006 at
    # n = 1e5, so the measured gap must lie within a factor 0.7–1.5 of the prediction (Clopper–Pearson
    # is slightly more conservative than the normal approximation).
    z = norm.ppf(1 - alpha)
    for n, gap in zip(sizes[1:], gaps[1:]):
        predicted = z * math.sqrt(p_a * (1 - p_a) / n) * SIGMA / norm.pdf(norm.ppf(p_a))
        assert 0.7 * predicted < gap < 1.5 * predicted, (n, gap, predicted)
    # and at n = 1e5 the certified radius is within 2.5% of the true one
    assert gaps[-1] < 0.025 * true_radius


def test_the_hierarchical_bootstrap_with_one_seed_is_the_image_bootstrap():
    from arq.report import stats

    values = np.random.default_rng(1).random(200)
    # the plain image bootstrap, written out
    idx = np.random.default_rng(7).integers(0, 200, size=(5000, 200))
    means = values[idx].mean(1)
    tail = (1 - 0.95) / 2
    expected = (np.quantile(means, tail), np.quantile(means, 1 - tail))
    assert stats.bootstrap_mean(values, 5000, 7) == expected
    assert stats.bootstrap_mean(values[None, :], 5000, 7) == expected  # a one-row seeds × images table
    other = np.random.default_rng(2).random(200)
    assert stats.paired_bootstrap(values, other, 5000, 7) == stats.paired_bootstrap(values[None], other[None], 5000, 7)


def test_the_hierarchical_bootstrap_resamples_seeds_too():
    """Two seeds whose means differ by 0.4 on identical images: the image bootstrap alone would see no spread, the
    hierarchical one sees the seeds' (resamples draw seed 0 twice, seed 1 twice, or one of each)."""
    from arq.report import stats

    table = np.vstack([np.full(100, 0.3), np.full(100, 0.7)])
    means = stats.hierarchical_means(table, 4000, 0)
    assert set(np.round(np.unique(means), 6)) == {0.3, 0.5, 0.7}
    assert abs(np.isclose(means, 0.5).mean() - 0.5) < 0.03
    lo, hi = stats.bootstrap_mean(table, 4000, 0)
    assert (lo, hi) == (pytest.approx(0.3), pytest.approx(0.7))
