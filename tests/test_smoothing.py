"""Randomized-smoothing statistics and the PREDICT / CERTIFY logic of arq/smoothing.py and arq/certify.py."""
from __future__ import annotations

import pytest
import torch
from scipy.stats import binomtest, norm
from statsmodels.stats.proportion import proportion_confint
from torch import nn

from arq.certify import subset_positions
from arq.smoothing import ABSTAIN, Smooth, certified_radius, lower_confidence_bound, max_radius, upper_confidence_bound


class ConstantClassifier(nn.Module):
    """Always votes for ``label`` (a parameter exists only so that Smooth can find the device)."""

    def __init__(self, label: int, num_classes: int):
        super().__init__()
        self.label, self.num_classes = label, num_classes
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        out = torch.zeros(len(x), self.num_classes)
        out[:, self.label] = 1.0
        return out


class ScriptedVotes(nn.Module):
    """Votes exactly the given sequence of classes, one per noisy sample, across calls and batches."""

    def __init__(self, votes: list[int], num_classes: int):
        super().__init__()
        self.votes = torch.tensor(votes)
        self.num_classes = num_classes
        self.pos = 0
        self.batch_sizes: list[int] = []
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        b = len(x)
        self.batch_sizes.append(b)
        v = self.votes[self.pos:self.pos + b]
        assert len(v) == b, "classifier queried for more samples than scripted"
        self.pos += b
        return nn.functional.one_hot(v, self.num_classes).float()


class SignOfFirstCoordinate(nn.Module):
    """Class 1 if x[0] > 0 else class 0: at x[0] = 0 the noisy votes split 50/50."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        s = x.reshape(len(x), -1)[:, 0]
        return torch.stack([-s, s], dim=1)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------- confidence bounds

GRID = [(k, n, a) for n in (1, 2, 10, 100, 1000, 100_000)
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n} & set(range(n + 1)))
        for a in (0.001, 0.01, 0.05, 0.2)]


@pytest.mark.parametrize("k,n,alpha", GRID)
def test_bounds_match_statsmodels_clopper_pearson(k, n, alpha):
    lo, hi = proportion_confint(k, n, alpha=2 * alpha, method="beta")
    assert lower_confidence_bound(k, n, alpha) == pytest.approx(lo, rel=1e-9, abs=1e-12)
    assert upper_confidence_bound(k, n, alpha) == pytest.approx(hi, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("n", [1, 10, 1000])
def test_bounds_at_the_edges(n):
    assert lower_confidence_bound(0, n, 0.01) == 0.0
    assert upper_confidence_bound(n, n, 0.01) == 1.0
    # all successes: the lower bound solves p^n = alpha
    assert lower_confidence_bound(n, n, 0.01) == pytest.approx(0.01 ** (1 / n), rel=1e-12)
    # no successes: the upper bound solves (1-p)^n = alpha
    assert upper_confidence_bound(0, n, 0.01) == pytest.approx(1 - 0.01 ** (1 / n), rel=1e-12)


def test_bounds_bracket_the_estimate_and_tighten_with_n():
    for n in (10, 100, 1000, 10_000):
        k = int(0.7 * n)
        assert lower_confidence_bound(k, n, 0.001) < k / n < upper_confidence_bound(k, n, 0.001)
    widths = [upper_confidence_bound(int(0.7 * n), n, 0.001) - lower_confidence_bound(int(0.7 * n), n, 0.001)
              for n in (10, 100, 1000, 10_000)]
    assert widths == sorted(widths, reverse=True)


# ------------------------------------------------------------------------------------------------ radius

@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("p", [0.500001, 0.6, 0.9, 0.99, 0.999999])
def test_certified_radius_is_sigma_times_inverse_normal(sigma, p):
    assert certified_radius(sigma, p) == pytest.approx(sigma * norm.ppf(p), rel=1e-12)
    assert certified_radius(sigma, p) > 0


@pytest.mark.parametrize("p", [0.0, 0.1, 0.4999, 0.5])
def test_certified_radius_is_zero_at_or_below_one_half(p):
    assert certified_radius(0.5, p) == 0.0


@pytest.mark.parametrize("sigma,n,alpha", [(0.25, 500, 0.001), (0.5, 100_000, 0.001), (1.0, 1000, 0.05)])
def test_max_radius(sigma, n, alpha):
    expected = sigma * norm.ppf(alpha ** (1 / n))
    assert max_radius(sigma, n, alpha) == pytest.approx(expected, rel=1e-9)
    # it is what CERTIFY returns when all n samples agree
    assert max_radius(sigma, n, alpha) == pytest.approx(certified_radius(sigma, lower_confidence_bound(n, n, alpha)),
                                                        rel=1e-9)


def test_max_radius_of_the_smoke_profile_matches_its_published_value():
    assert round(max_radius(0.25, 500, 0.001), 4) == 0.5513


# ------------------------------------------------------------------------------------------------ certify

def test_certify_abstains_on_a_fifty_fifty_classifier():
    smooth = Smooth(SignOfFirstCoordinate(), num_classes=2, sigma=0.5, batch_size=1000)
    for seed in range(5):
        cert = smooth.certify(torch.zeros(3), n0=100, n=2000, alpha=0.001, gen=gen(seed))
        assert cert.prediction == ABSTAIN
        assert cert.radius == 0.0
        assert cert.p_lower <= 0.5
        assert 800 < cert.count < 1200  # about half of the n votes


@pytest.mark.parametrize("n,alpha,sigma", [(1000, 0.001, 0.25), (100_000, 0.001, 0.5), (50, 0.05, 1.0)])
def test_certify_constant_classifier(n, alpha, sigma):
    smooth = Smooth(ConstantClassifier(3, 10), num_classes=10, sigma=sigma, batch_size=4096)
    cert = smooth.certify(torch.rand(3, 32, 32), n0=100, n=n, alpha=alpha, gen=gen())
    assert cert.prediction == 3
    assert cert.count == n
    assert cert.p_lower == pytest.approx(alpha ** (1 / n), rel=1e-9)
    assert cert.radius == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)), rel=1e-9)


def test_certify_bounds_the_class_selected_on_the_first_n0_samples():
    # selection samples all vote 1, estimation samples vote 0 for 90 of 100: class 1 is bounded → abstain
    votes = [1] * 10 + [0] * 90 + [1] * 10
    smooth = Smooth(ScriptedVotes(votes, 3), num_classes=3, sigma=0.25, batch_size=7)
    cert = smooth.certify(torch.zeros(2), n0=10, n=100, alpha=0.001, gen=gen())
    assert cert.prediction == ABSTAIN
    assert cert.count == 10
    assert cert.p_lower == pytest.approx(lower_confidence_bound(10, 100, 0.001))


def test_certify_uses_fresh_samples_for_the_estimate():
    votes = [2] * 6 + [0] * 4 + [2] * 95 + [1] * 5
    model = ScriptedVotes(votes, 3)
    smooth = Smooth(model, num_classes=3, sigma=0.5, batch_size=32)
    cert = smooth.certify(torch.zeros(2), n0=10, n=100, alpha=0.01, gen=gen())
    p = lower_confidence_bound(95, 100, 0.01)
    assert cert.prediction == 2 and cert.count == 95
    assert cert.p_lower == pytest.approx(p)
    assert cert.radius == pytest.approx(0.5 * norm.ppf(p))
    assert model.pos == 110  # exactly n0 + n samples were drawn
    assert max(model.batch_sizes) <= 32


def test_sample_counts_respect_batch_size_and_total():
    votes = [i % 4 for i in range(1003)]
    model = ScriptedVotes(votes, 4)
    smooth = Smooth(model, num_classes=4, sigma=0.1, batch_size=100)
    counts = smooth.sample_counts(torch.zeros(5), 1003, gen())
    assert counts.tolist() == [251, 251, 251, 250]
    assert model.batch_sizes == [100] * 10 + [3]


def test_certify_is_reproducible_for_a_seeded_generator():
    smooth = Smooth(SignOfFirstCoordinate(), num_classes=2, sigma=1.0, batch_size=256)
    x = torch.tensor([0.6, 0.0])
    a = smooth.certify(x, 50, 1000, 0.01, gen(7))
    b = smooth.certify(x, 50, 1000, 0.01, gen(7))
    c = smooth.certify(x, 50, 1000, 0.01, gen(8))
    assert a == b
    assert a.count != c.count  # a different seed draws different noise


# ------------------------------------------------------------------------------------------------ predict

@pytest.mark.parametrize("n_a,n_b,n_c,alpha", [
    (60, 40, 0, 0.05),    # p ≈ 0.057 > 0.05: abstain
    (62, 38, 0, 0.05),    # p ≈ 0.021: predict
    (50, 30, 20, 0.05),   # test is top vs runner-up only (50 of 80), the third class does not enter
    (50, 30, 20, 0.01),
    (100, 0, 0, 0.001),
    (9, 1, 0, 0.001),
])
def test_predict_binomial_test_matches_scipy(n_a, n_b, n_c, alpha):
    # interleave the votes so that batching cannot matter; class 1 is the top class
    votes = [1] * n_a + [2] * n_b + [0] * n_c
    votes = [v for _, v in sorted(zip(torch.randperm(len(votes), generator=gen(1)).tolist(), votes))]
    smooth = Smooth(ScriptedVotes(votes, 3), num_classes=3, sigma=0.25, batch_size=16)
    pred = smooth.predict(torch.zeros(4), n=len(votes), alpha=alpha, gen=gen())
    pvalue = binomtest(n_a, n_a + n_b, 0.5).pvalue
    assert pred == (ABSTAIN if pvalue > alpha else 1)


def test_predict_both_branches_are_exercised():
    def run(n_a, n_b):
        votes = [0] * n_a + [1] * n_b
        return Smooth(ScriptedVotes(votes, 2), 2, 0.25, 64).predict(torch.zeros(1), len(votes), 0.05, gen())

    assert run(60, 40) == ABSTAIN
    assert run(62, 38) == 0
    assert run(38, 62) == 1


def test_predict_constant_and_fifty_fifty_classifiers():
    constant = Smooth(ConstantClassifier(3, 10), num_classes=10, sigma=0.5, batch_size=500)
    assert constant.predict(torch.rand(3, 8, 8), n=1000, alpha=0.001, gen=gen()) == 3
    coin = Smooth(SignOfFirstCoordinate(), num_classes=2, sigma=0.5, batch_size=500)
    abstains = sum(coin.predict(torch.zeros(2), n=1000, alpha=0.01, gen=gen(s)) == ABSTAIN for s in range(20))
    assert abstains >= 17  # a level-0.01 test rejects a true null rarely (expected ≈ 0.2 of 20)


# ---------------------------------------------------------------------------------------- subset choice

def test_subset_positions_all_when_none_or_enough():
    assert subset_positions(500, None).tolist() == list(range(500))
    assert subset_positions(7, 7).tolist() == list(range(7))
    assert subset_positions(7, 100).tolist() == list(range(7))


def test_subset_positions_never_more_than_asked_and_valid():
    for size in range(1, 61):
        for k in range(1, size + 1):
            pos = subset_positions(size, k).tolist()
            assert 1 <= len(pos) <= k
            assert pos == sorted(set(pos))
            assert pos[0] == 0 and pos[-1] < size


def test_subset_positions_spread_over_every_class_block():
    # the certification subset of the smoke profile: 500 images, grouped by class in blocks of 50
    pos = subset_positions(500, 40)
    per_class = torch.bincount(pos // 50, minlength=10)
    assert per_class.min() >= 3 and per_class.max() <= 5
    gaps = pos.diff()
    assert gaps.max() - gaps.min() <= 1  # evenly spaced


@pytest.mark.parametrize("size,k", [(500, 40), (500, 26), (100, 11), (10, 6), (500, 100), (500, 7)])
def test_subset_positions_returns_exactly_max_images(size, k):
    """The schema promises k images (certify.max_images); the smoke profile asks 40 of 500."""
    assert len(subset_positions(size, k)) == k
