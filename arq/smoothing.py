"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): PREDICT and CERTIFY with exact statistics.

The algorithm only: confidence bounds, the certified radius and the smoothed classifier. How the base network
is executed is ``arq.engine``, the certification records are ``arq.records`` and the stage that certifies a
dataset is ``arq.certify``. Noise is drawn on the model's device in large batches and class counts are
accumulated there; the host only sees one count vector per image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.stats import beta, binomtest, norm
from torch import nn

from arq.engine import model_device

ABSTAIN = -1


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1-α) Clopper–Pearson lower bound on a binomial proportion from k successes in n."""
    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


def upper_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1-α) Clopper–Pearson upper bound on a binomial proportion from k successes in n."""
    return 1.0 if k == n else float(beta.ppf(1 - alpha, k + 1, n - k))


def certified_radius(sigma: float, p_lower: float) -> float:
    """Cohen's Theorem 1 with p_B = 1 - p_A: R = σ Φ⁻¹(p_A); 0 when the bound does not exceed ½."""
    return sigma * float(norm.ppf(p_lower)) if p_lower > 0.5 else 0.0


def max_radius(sigma: float, n: int, alpha: float) -> float:
    """Largest radius CERTIFY can return with n samples (all of them agreeing)."""
    return certified_radius(sigma, math.exp(math.log(alpha) / n))


@dataclass(frozen=True)
class Certificate:
    prediction: int  # ABSTAIN when p_A's lower bound is not above ½
    radius: float
    p_lower: float
    count: int  # samples (of n) that voted for the selected class


class Smooth:
    """The smoothed classifier g(x) = argmax_c P[f(x+ε) = c], ε ~ N(0, σ²I), around a base classifier f.

    ``base`` is run as given; pass ``Engine.prepare(model, device)`` for the layout and numerics of choice."""

    def __init__(self, base: nn.Module, num_classes: int, sigma: float, batch_size: int = 1000):
        self.base = base.eval()
        self.num_classes = num_classes
        self.sigma = sigma
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return model_device(self.base)

    @torch.inference_mode()
    def sample_counts(self, x: torch.Tensor, num: int, gen: torch.Generator) -> torch.Tensor:
        """Class counts of f over ``num`` noisy copies of the single input x (counted on the device)."""
        x = x.to(self.device)
        counts = torch.zeros(self.num_classes, dtype=torch.int64, device=self.device)
        remaining = num
        while remaining > 0:
            b = min(self.batch_size, remaining)
            batch = x.unsqueeze(0).expand(b, *x.shape)
            batch = batch + self.sigma * torch.randn(batch.shape, generator=gen, device=self.device)
            counts += torch.bincount(self.base(batch).argmax(1), minlength=self.num_classes)
            remaining -= b
        return counts

    def predict(self, x: torch.Tensor, n: int, alpha: float, gen: torch.Generator) -> int:
        """Cohen's PREDICT: the top class if a two-sided binomial test of top vs runner-up rejects at α."""
        counts = self.sample_counts(x, n, gen).cpu()
        top2 = counts.topk(2)
        n_a, n_b = int(top2.values[0]), int(top2.values[1])
        if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
            return ABSTAIN
        return int(top2.indices[0])

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, gen: torch.Generator) -> Certificate:
        """Cohen's CERTIFY: select the class on n0 samples, bound its probability on n fresh samples."""
        c_hat = int(self.sample_counts(x, n0, gen).argmax())
        n_a = int(self.sample_counts(x, n, gen)[c_hat])
        p_lower = lower_confidence_bound(n_a, n, alpha)
        if p_lower <= 0.5:
            return Certificate(ABSTAIN, 0.0, p_lower, n_a)
        return Certificate(c_hat, certified_radius(self.sigma, p_lower), p_lower, n_a)
