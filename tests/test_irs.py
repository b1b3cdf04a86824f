"""Incremental randomized smoothing (arq/irs.py): the ζ bound and the γ branches, statistical soundness on
classifier pairs whose disagreement is known in closed form, replayable noise, the cache file, and ACR.

The synthetic pairs: for f(x) = [w·x + b > 0] and ε ~ N(0, σ²I), w·ε ~ N(0, σ²‖w‖²), so at x = 0
P[f(x+ε) = 1] = Φ(b / (σ‖w‖)). Shifting the threshold to b' < b gives f_p with P[f_p = 1] = Φ(b' / (σ‖w‖)),
and the two disagree exactly when −b < w·ε ≤ −b', so P[f ≠ f_p] = Φ(b/(σ‖w‖)) − Φ(b'/(σ‖w‖)): the true
P[f_p = c_A] and the true disagreement rate are both known, and every bound IRS returns can be checked.
"""
from __future__ import annotations

import argparse
import copy
import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from torch import nn

from arq import irs as irs_module
from arq.irs import (FORMAT, FRESH_BASE, SELECTION_STREAM, Cache, CacheError, IncrementalCertificate, acr,
                     build_cache, cached_acr, certify_incremental, certify_one, noise, noise_seed, predictions)
from arq.smoothing import ABSTAIN, certified_radius, lower_confidence_bound, upper_confidence_bound

# one thread: bitwise reproducible kernels, and no OpenMP spinning against other jobs on a 2-core machine
pytestmark = pytest.mark.usefixtures("single_thread")

SIGMA = 0.5
SHAPE = (1, 2, 2)  # a tiny "image": the real (C, H, W) code path with d = 4
W = torch.tensor([1.0, -2.0, 2.0, 4.0])  # ‖w‖ = 5 exactly
CPU = torch.device("cpu")


class LinearBinary(nn.Module):
    """Two logits (-s, s) with s = w·flatten(x) + b: argmax is 1 exactly when w·x + b > 0."""

    def __init__(self, b: float, w: torch.Tensor = W):
        super().__init__()
        self.w = nn.Parameter(w.clone(), requires_grad=False)
        self.b = b

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([-s, s], dim=1)


class Constant(nn.Module):
    """Always predicts class ``c`` (of ``k``)."""

    def __init__(self, c: int, k: int = 2):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()), requires_grad=False)
        self.c, self.k = c, k

    def forward(self, x):
        out = torch.zeros(len(x), self.k)
        out[:, self.c] = 1.0
        return out


class Recorder(nn.Module):
    """Wraps a model and keeps a copy of every batch it is called on."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls: list[torch.Tensor] = []

    def forward(self, x):
        self.calls.append(x.clone())
        return self.inner(x)


def _bias(p: float) -> float:
    """The b for which P[f(0 + ε) = 1] = p exactly."""
    return float(W.norm()) * SIGMA * float(norm.ppf(p))


def _images(s_values) -> torch.Tensor:
    """Images x_i (shape SHAPE) with w·x_i = s_i."""
    s = torch.tensor(s_values, dtype=torch.float32)
    return (s[:, None] * W / float(W @ W)).view(-1, *SHAPE)


def _tiny_conv(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()


def _cache(model, x, *, n0=20, n=500, alpha=0.01, seed=3, chunk=100, chunks_per_batch=2, idx=None, meta=None):
    idx = list(range(10, 10 + len(x))) if idx is None else idx
    y = torch.ones(len(x), dtype=torch.long)
    return build_cache(model, x, y, idx, SIGMA, n0, n, alpha, seed, chunk, chunks_per_batch, meta or {})


# ------------------------------------------------------------------------------------- ζ and the branches

def test_identical_model_gives_zero_disagreements_and_the_clopper_pearson_zeta():
    """f_p = f: ζ is exactly the one-sided CP upper bound for 0 of n_p, and the radius shrinks only by ζ."""
    alpha, alpha_zeta, n_p = 0.01, 0.02, 200
    f = LinearBinary(_bias(0.9))
    x = _images([0.0, 0.1, -0.1])
    cache = _cache(f, x, alpha=alpha)
    assert (cache.top == 1).all()
    results, _ = certify_incremental(copy.deepcopy(f), cache, x, n_p, alpha_zeta, gamma=1.0, chunks_per_batch=3)
    zeta = upper_confidence_bound(0, n_p, alpha_zeta)
    assert zeta == pytest.approx(1 - alpha_zeta ** (1 / n_p), rel=1e-9)
    for r, p_a in zip(results, cache.p_lower.tolist()):
        assert (r.branch, r.disagreements, r.prediction) == ("irs", 0, 1)
        assert r.zeta == zeta
        assert r.p_lower == pytest.approx(p_a - zeta, abs=1e-15)
        assert p_a - zeta > 0.5
        assert r.radius == pytest.approx(certified_radius(SIGMA, p_a - zeta), rel=1e-12)
        assert 0 < r.radius < certified_radius(SIGMA, p_a)
        assert r.confidence == pytest.approx(1 - (alpha + alpha_zeta), abs=1e-15)


def test_p_a_at_or_above_gamma_certifies_afresh_at_level_alpha():
    """p_A ≥ γ: no ζ; f_p's own bound on n_p fresh samples (streams FRESH_BASE…) at level α, so that the whole
    certificate keeps confidence 1 − (α + α_ζ) whatever the true p_A (irs module docstring)."""
    alpha, alpha_zeta, n_p, chunk = 0.01, 0.02, 300, 100
    f = LinearBinary(_bias(0.9))
    x = _images([0.0, 0.2])
    cache = _cache(f, x, alpha=alpha, chunk=chunk)
    f_p = LinearBinary(_bias(0.8))
    for i in range(len(x)):
        p_a = float(cache.p_lower[i])
        r = certify_one(f_p, cache, i, x[i], n_p, alpha_zeta, gamma=p_a, chunks_per_batch=2)  # boundary: p_A = γ
        fresh = predictions(f_p, x[i], SIGMA, 3, int(cache.idx[i]), FRESH_BASE, n_p, chunk, 1)
        want = lower_confidence_bound(int((fresh == 1).sum()), n_p, alpha)
        assert want < lower_confidence_bound(int((fresh == 1).sum()), n_p, alpha + alpha_zeta)  # the stricter level
        assert r.branch == "fresh" and r.disagreements == -1 and math.isnan(r.zeta)
        assert r.p_lower == want and want > 0.5
        assert (r.prediction, r.radius) == (1, certified_radius(SIGMA, want))
        assert r.confidence == pytest.approx(1 - (alpha + alpha_zeta), abs=1e-15)
        # just above γ = p_A the same image takes the IRS branch instead
        assert certify_one(f_p, cache, i, x[i], n_p, alpha_zeta, math.nextafter(p_a, 1), 2).branch == "irs"


def test_fresh_branch_abstains_when_the_modified_model_is_poor():
    f = LinearBinary(_bias(0.9))
    x = _images([0.0])
    cache = _cache(f, x)
    r = certify_one(Constant(0), cache, 0, x[0], 200, 0.01, gamma=0.0, chunks_per_batch=2)
    assert (r.branch, r.prediction, r.radius) == ("fresh", ABSTAIN, 0.0)
    assert r.p_lower == 0.0  # no fresh sample voted for c_A


def test_irs_branch_counts_disagreements_against_the_cache_and_abstains_when_p_a_minus_zeta_is_low():
    """f_p = constant 0 disagrees exactly where the cached f said 1; p_A − ζ ≤ ½ → ABSTAIN on the irs branch."""
    alpha, alpha_zeta, n_p = 0.01, 0.01, 300
    f = LinearBinary(_bias(0.9))
    x = _images([0.0])
    cache = _cache(f, x, alpha=alpha)
    r = certify_one(Constant(0), cache, 0, x[0], n_p, alpha_zeta, gamma=1.0, chunks_per_batch=1)
    d = int(cache.preds[0, :n_p].long().sum())
    assert 0.8 * n_p < d < n_p
    assert r.disagreements == d
    assert r.zeta == upper_confidence_bound(d, n_p, alpha_zeta)
    assert r.p_lower == pytest.approx(float(cache.p_lower[0]) - r.zeta, abs=1e-15) and r.p_lower <= 0.5
    assert (r.branch, r.prediction, r.radius) == ("irs", ABSTAIN, 0.0)
    assert r.confidence == pytest.approx(1 - (alpha + alpha_zeta), abs=1e-15)


def test_cached_abstain_gives_abstain_without_running_the_modified_model():
    """f itself not certified (a fair coin at x = 0): no bound to carry over, whatever γ says."""
    alpha, alpha_zeta = 0.01, 0.02
    x = _images([0.0, 0.0])
    cache = _cache(LinearBinary(0.0), x, alpha=alpha)
    assert (cache.top == ABSTAIN).all()
    for gamma in (0.0, 1.0):
        f_p = Recorder(LinearBinary(0.0))
        results, _ = certify_incremental(f_p, cache, x, 100, alpha_zeta, gamma, chunks_per_batch=1)
        assert f_p.calls == []
        for r, p_a in zip(results, cache.p_lower.tolist()):
            assert (r.branch, r.prediction, r.radius, r.disagreements) == ("abstain-cached", ABSTAIN, 0.0, -1)
            assert math.isnan(r.zeta) and r.p_lower == p_a
            assert r.confidence == pytest.approx(1 - (alpha + alpha_zeta), abs=1e-15)


def test_every_branch_records_the_combined_confidence():
    """One run mixing all three branches: every result carries 1 − (α + α_ζ)."""
    alpha, alpha_zeta = 0.01, 0.03
    # w·x = 0 (coin: abstain), Φ⁻¹(0.9)σ‖w‖ (p ≈ 0.9: irs), 20σ‖w‖ (p ≈ 1: p_A = α^(1/n) ≥ γ: fresh)
    x = _images([0.0, _bias(0.9), 20 * SIGMA * 5])
    cache = _cache(LinearBinary(0.0), x, alpha=alpha)
    results, seconds = certify_incremental(LinearBinary(0.0), cache, x, 100, alpha_zeta, 0.99, chunks_per_batch=2)
    assert [r.branch for r in results] == ["abstain-cached", "irs", "fresh"]
    assert float(cache.p_lower[2]) == pytest.approx(alpha ** (1 / 500))
    assert {r.confidence for r in results} == {1 - (alpha + alpha_zeta)}
    assert all(isinstance(r, IncrementalCertificate) for r in results) and seconds >= 0


class Bands(nn.Module):
    """Three classes by the projection s = w·x + b: class 0 above t0, else class ``upper`` above t1, else the
    remaining one of {1, 2}. Under x = 0 + ε, s ~ N(b, (σ‖w‖)²), so every class probability is a Φ difference."""

    def __init__(self, t0: float, t1: float, upper: int = 1):
        super().__init__()
        self.w = nn.Parameter(W.clone(), requires_grad=False)
        self.t0, self.t1, self.upper = t0, t1, upper

    def forward(self, x):
        s = x.flatten(1) @ self.w
        cls = torch.where(s > self.t0, 0, torch.where(s > self.t1, self.upper, 3 - self.upper))
        return nn.functional.one_hot(cls, 3).float()


TAU = SIGMA * float(W.norm())  # the std of s under the noise
P3_F, P3_LOSS = 0.90, 0.05  # P[f = 0], and P[f = 0, f_p ≠ 0] (f_p's class-0 band is narrower by that much)
T0, T0_P, T1 = TAU * norm.ppf(1 - P3_F), TAU * norm.ppf(1 - P3_F + P3_LOSS), TAU * norm.ppf(0.05)


def test_flips_between_other_classes_are_disagreements_but_not_top_class_losses():
    """f_p = f with the two non-top classes swapped: many disagreements, no top-class loss. ζ counts the losses
    by default (so it is the CP bound for 0) and every disagreement under "all_disagreements" (the paper's ζ)."""
    f, f_p = Bands(T0, T1), Bands(T0, T1, upper=2)
    x = torch.zeros(2, *SHAPE)
    cache = _cache(f, x, n=300)
    alpha_zeta, n_p = 0.01, 300
    assert (cache.top == 0).all()
    for i in range(len(x)):
        lossy = certify_one(f_p, cache, i, x[i], n_p, alpha_zeta, 1.0, 2)
        paper = certify_one(f_p, cache, i, x[i], n_p, alpha_zeta, 1.0, 2, zeta_counts="all_disagreements")
        d = int((cache.preds[i, :n_p] != 0).sum())  # every sample f did not give to c_A = 0 flips
        assert d > 0
        assert (lossy.disagreements, lossy.losses) == (paper.disagreements, paper.losses) == (d, 0)
        assert lossy.zeta == upper_confidence_bound(0, n_p, alpha_zeta)
        assert paper.zeta == upper_confidence_bound(d, n_p, alpha_zeta) > lossy.zeta
        assert lossy.p_lower == pytest.approx(float(cache.p_lower[i]) - lossy.zeta, abs=1e-15)
        assert lossy.radius > paper.radius
    with pytest.raises(ValueError, match="zeta_counts"):
        certify_one(f, cache, 0, x[0], n_p, alpha_zeta, 1.0, 2, zeta_counts="some")


def test_top_class_losses_count_only_samples_f_gave_to_c_a():
    """f_p = constant other class: it loses exactly the samples f gave to c_A and disagrees on those plus
    the samples f gave to the third class."""
    x = torch.zeros(1, *SHAPE)
    cache = _cache(Bands(T0, T1), x, n=300)
    c_a, other = int(cache.top[0]), 1
    assert c_a == 0
    r = certify_one(Constant(other, 3), cache, 0, x[0], 200, 0.01, 1.0, 1)
    cached = cache.preds[0, :200].long()
    assert r.losses == int((cached == c_a).sum())
    assert r.disagreements == int((cached != other).sum()) >= r.losses
    assert r.zeta == upper_confidence_bound(r.losses, 200, 0.01)
    assert irs_module.disagreement_rates([r], 200) == {"disagreement_rate": r.disagreements / 200,
                                                         "top_class_loss_rate": r.losses / 200}
    assert irs_module.disagreement_rates([], 200) == {"disagreement_rate": None, "top_class_loss_rate": None}


# ------------------------------------------------------------------------------------ statistical soundness

P_F, DELTA = 0.95, 0.10  # P[f = 1] and the disagreement P[f ≠ f_p] = P[f = 1] − P[f_p = 1]
RUNS, N0, N, N_P, CHUNK = 2000, 20, 1000, 100, 100
ALPHA = ALPHA_ZETA = 0.05


def _repeated_cache(model: nn.Module, label: int, seed: int):
    """RUNS independent repetitions as RUNS cached images at x = 0 (each image index has its own noise)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.zeros(RUNS, *SHAPE)
        cache = build_cache(model, x, torch.full((RUNS,), label, dtype=torch.long), list(range(RUNS)),
                            SIGMA, N0, N, ALPHA, seed, CHUNK, 10, {})
    finally:
        torch.set_num_threads(before)
    return x, cache


@pytest.fixture(scope="module")
def sound_cache():
    return _repeated_cache(LinearBinary(_bias(P_F)), 1, 11)


def _at_most(failures: int, runs: int, level: float) -> bool:
    """Failures are consistent with a rate ≤ level: the binomial tail P[X ≥ failures] is not below 1e-4."""
    return binom.sf(failures - 1, runs, level) >= 1e-4


def test_irs_bound_on_the_modified_model_holds_with_probability_one_minus_alpha_plus_alpha_zeta(sound_cache):
    """p_A − ζ ≤ P[f_p = c_A] except in ≤ α + α_ζ of runs; ζ ≥ the true disagreement except in ≤ α_ζ; the
    plug-in (raw d/n_p instead of ζ) fails far more often, so the experiment can see an unsound bound."""
    x, cache = sound_cache
    p_fp = P_F - DELTA
    f_p = LinearBinary(_bias(p_fp))
    results, _ = certify_incremental(f_p, cache, x, N_P, ALPHA_ZETA, gamma=1.0, chunks_per_batch=10)
    assert {r.branch for r in results} == {"irs"} and (cache.top == 1).all()
    # the closed form holds: the empirical disagreement over all RUNS·N_P samples is DELTA (± 5 s.e.)
    d_mean = sum(r.disagreements for r in results) / (RUNS * N_P)
    assert d_mean == pytest.approx(DELTA, abs=5 * math.sqrt(DELTA * (1 - DELTA) / (RUNS * N_P)))
    assert float(cache.preds.float().mean()) == pytest.approx(P_F, abs=5 * math.sqrt(P_F * (1 - P_F) / (RUNS * N)))

    p_a = cache.p_lower.tolist()
    fail = sum(r.p_lower > p_fp for r in results)  # c_A = 1 everywhere, so P[f_p = c_A] = p_fp
    zeta_fail = sum(r.zeta < DELTA for r in results)
    p_a_fail = sum(pa > P_F for pa in p_a)
    plug_in = sum(pa - r.disagreements / N_P > p_fp for pa, r in zip(p_a, results))
    plug_in_zeta = sum(r.disagreements / N_P < DELTA for r in results)
    assert _at_most(fail, RUNS, ALPHA + ALPHA_ZETA), f"IRS bound above P[f_p = c_A] in {fail}/{RUNS} runs"
    assert _at_most(zeta_fail, RUNS, ALPHA_ZETA), f"ζ below the true disagreement in {zeta_fail}/{RUNS} runs"
    assert _at_most(p_a_fail, RUNS, ALPHA), f"cached p_A above P[f = c_A] in {p_a_fail}/{RUNS} runs"
    assert not _at_most(plug_in, RUNS, ALPHA + ALPHA_ZETA), (plug_in, fail)
    assert plug_in > 3 * max(fail, 1) and plug_in_zeta > 5 * max(zeta_fail, 1)


def test_fresh_branch_bound_holds_with_probability_one_minus_alpha(sound_cache):
    """γ = 0: the fresh bound at level α is a sound CP bound on P[f_p = c_A] (its rate is close to the level,
    so this also checks the level is α and not something looser)."""
    x, cache = sound_cache
    p_fp = P_F - DELTA
    results, _ = certify_incremental(LinearBinary(_bias(p_fp)), cache, x, N_P, ALPHA_ZETA, gamma=0.0,
                                     chunks_per_batch=10)
    assert {r.branch for r in results} == {"fresh"}
    fail = sum(r.p_lower > p_fp for r in results)
    # the exact failure probability of a one-sided CP bound at this level: P[K ≥ k*] for the smallest k*
    # whose bound exceeds p_fp
    k_star = next(k for k in range(N_P + 1) if lower_confidence_bound(k, N_P, ALPHA) > p_fp)
    exact = binom.sf(k_star - 1, N_P, p_fp)
    assert exact <= ALPHA
    assert _at_most(fail, RUNS, ALPHA), f"fresh bound above P[f_p = c_A] in {fail}/{RUNS} runs"
    assert abs(fail / RUNS - exact) < 4 * math.sqrt(exact * (1 - exact) / RUNS)


@pytest.fixture(scope="module")
def three_class_cache():
    return _repeated_cache(Bands(T0, T1), 0, 12)


def test_top_class_loss_bound_holds_and_is_tighter_when_other_classes_flip(three_class_cache):
    """f_p narrows f's class-0 band (losing P3_LOSS of c_A) and swaps classes 1 and 2 below it, so every
    sample f did not give to c_A is a disagreement too: P[f ≠ f_p] = 1 − P3_F + P3_LOSS = 0.15, but only
    P3_LOSS = 0.05 of it can lower P[f_p = c_A] = P3_F − P3_LOSS. ζ over the losses is sound (coverage at least
    1 − (α + α_ζ)) and much tighter than ζ over all disagreements, which is sound as well."""
    x, cache = three_class_cache
    assert (cache.top == 0).all()
    p_fp = P3_F - P3_LOSS
    f_p = Bands(T0_P, T1, upper=2)
    lossy, _ = certify_incremental(f_p, cache, x, N_P, ALPHA_ZETA, gamma=1.0, chunks_per_batch=10)
    paper, _ = certify_incremental(f_p, cache, x, N_P, ALPHA_ZETA, gamma=1.0, chunks_per_batch=10,
                                   zeta_counts="all_disagreements")
    assert {r.branch for r in lossy + paper} == {"irs"}
    # the closed forms hold on the RUNS·N_P replayed samples (± 5 s.e.)
    total = RUNS * N_P
    loss_rate = sum(r.losses for r in lossy) / total
    d_rate = sum(r.disagreements for r in lossy) / total
    d_true = 1 - P3_F + P3_LOSS
    assert loss_rate == pytest.approx(P3_LOSS, abs=5 * math.sqrt(P3_LOSS * (1 - P3_LOSS) / total))
    assert d_rate == pytest.approx(d_true, abs=5 * math.sqrt(d_true * (1 - d_true) / total))

    fail = sum(r.p_lower > p_fp for r in lossy)  # c_A = 0 everywhere, so P[f_p = c_A] = p_fp
    zeta_fail = sum(r.zeta < P3_LOSS for r in lossy)
    assert _at_most(fail, RUNS, ALPHA + ALPHA_ZETA), f"IRS bound above P[f_p = c_A] in {fail}/{RUNS} runs"
    assert _at_most(zeta_fail, RUNS, ALPHA_ZETA), f"ζ below the true loss rate in {zeta_fail}/{RUNS} runs"
    assert _at_most(sum(r.p_lower > p_fp for r in paper), RUNS, ALPHA + ALPHA_ZETA)
    # tighter on every run, and by about the flips it no longer pays for
    assert all(a.zeta < b.zeta and a.p_lower > b.p_lower for a, b in zip(lossy, paper))
    gain = np.mean([b.zeta - a.zeta for a, b in zip(lossy, paper)])
    assert gain > 0.5 * (d_true - P3_LOSS)
    # a plug-in loss rate (no confidence bound) fails far more often: the experiment can see an unsound bound
    plug_in = sum(float(pa) - r.losses / N_P > p_fp for pa, r in zip(cache.p_lower.tolist(), lossy))
    assert plug_in > 3 * max(fail, 1)


# ----------------------------------------------------------------------------------------- replayed noise

def test_noise_is_chunked_per_generator_and_depends_on_seed_idx_and_stream():
    shape, chunk = (3, 4, 4), 50
    a = noise(shape, SIGMA, 5, 7, range(1, 5), chunk, CPU)
    assert a.shape == (4 * chunk, *shape) and a.dtype == torch.float32
    assert torch.equal(a, noise(shape, SIGMA, 5, 7, range(1, 5), chunk, CPU))
    # one generator per chunk: any split of the streams concatenates to the same tensor
    parts = torch.cat([noise(shape, SIGMA, 5, 7, range(s, s + 1), chunk, CPU) for s in range(1, 5)])
    assert torch.equal(a, parts)
    assert torch.equal(a[chunk:], noise(shape, SIGMA, 5, 7, range(2, 5), chunk, CPU))
    # each chunk is the generator of noise_seed(seed, idx, stream)
    g = torch.Generator().manual_seed(noise_seed(5, 7, 3))
    assert torch.equal(a[2 * chunk:3 * chunk], torch.randn((chunk, *shape), generator=g) * SIGMA)
    for other in (noise(shape, SIGMA, 5, 8, range(1, 5), chunk, CPU),  # another image
                  noise(shape, SIGMA, 6, 7, range(1, 5), chunk, CPU),  # another seed
                  noise(shape, SIGMA, 5, 7, range(FRESH_BASE, FRESH_BASE + 4), chunk, CPU),  # fresh streams
                  noise(shape, SIGMA, 5, 7, range(SELECTION_STREAM, 4), chunk, CPU)):  # shifted by one
        assert float(torch.isclose(a, other).float().mean()) < 1e-3
    assert float(a.std()) == pytest.approx(SIGMA, rel=0.05)
    assert float(noise(shape, 2 * SIGMA, 5, 7, range(1, 5), chunk, CPU).std()) == pytest.approx(2 * float(a.std()))


@pytest.mark.parametrize("num", [1000, 950])
def test_predictions_are_identical_for_any_chunks_per_batch(num):
    model = _tiny_conv()
    x = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    runs = [predictions(model, x, SIGMA, 2, 9, 1, num, 100, cpb) for cpb in (1, 2, 3, 7, 10, 50)]
    assert runs[0].shape == (num,) and runs[0].dtype == torch.int64
    assert len(runs[0].unique()) > 1  # the noise matters: the comparison is not trivially between constants
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    full = predictions(model, x, SIGMA, 2, 9, 1, 1000, 100, 4)
    assert torch.equal(runs[0], full[:num])
    assert not torch.equal(full, predictions(model, x, SIGMA, 2, 10, 1, 1000, 100, 4))
    assert not torch.equal(full, predictions(model, x, SIGMA, 3, 9, 1, 1000, 100, 4))


def test_certify_replays_exactly_the_noise_the_cache_was_built_on():
    """The first n_p inputs f_p sees are bit-identical to f's estimation inputs, whatever chunks_per_batch."""
    n0, n, n_p, chunk = 30, 500, 250, 100  # n_p not a multiple of the chunk
    x = _images([0.3])
    f = Recorder(LinearBinary(_bias(0.9)))
    cache = _cache(f, x, n0=n0, n=n, chunk=chunk, chunks_per_batch=3, idx=[42])
    seen = torch.cat(f.calls)
    assert len(seen) == n0 + n  # selection, then estimation: nothing else is run
    selection, estimation = seen[:n0], seen[n0:n0 + n]
    assert torch.equal(selection, noise(SHAPE, SIGMA, 3, 42, range(SELECTION_STREAM, 1), n0, CPU) + x[0])
    assert torch.equal(estimation, noise(SHAPE, SIGMA, 3, 42, range(1, 6), chunk, CPU) + x[0])
    assert not torch.isclose(selection, estimation[:n0]).all()  # selection samples are independent ones

    f_p = Recorder(LinearBinary(_bias(0.9)))
    r = certify_one(f_p, cache, 0, x[0], n_p, 0.01, gamma=1.0, chunks_per_batch=2)
    replay = torch.cat(f_p.calls)
    assert len(replay) == n_p  # whole chunks are drawn, but only n_p samples go through the network
    assert torch.equal(replay[:n_p], estimation[:n_p])
    assert r.disagreements == 0 and r.branch == "irs"

    f_p.calls.clear()
    certify_one(f_p, cache, 0, x[0], n_p, 0.01, gamma=0.0, chunks_per_batch=2)  # fresh: new noise
    fresh = torch.cat(f_p.calls)[:n_p]
    assert torch.equal(fresh, noise(SHAPE, SIGMA, 3, 42, range(FRESH_BASE, FRESH_BASE + 3), chunk, CPU)[:n_p] + x[0])
    assert not torch.isclose(fresh, estimation[:n_p]).all(dim=(1, 2, 3)).any()


def test_cached_predictions_are_the_replayed_predictions():
    """cache.preds[i] = f on the replayed noise of image idx[i], stored as uint8 (one byte per sample)."""
    model = _tiny_conv(1)
    x = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    cache = _cache(model, x, n=400, idx=[5, 0, 17])
    assert cache.preds.dtype == torch.uint8 and cache.preds.shape == (3, 400)
    for i, idx in enumerate([5, 0, 17]):
        assert torch.equal(cache.preds[i].long(), predictions(model, x[i], SIGMA, 3, idx, 1, 400, 100, 4))
    assert cache.idx.tolist() == [5, 0, 17] and cache.meta["n"] == 400


# ------------------------------------------------------------------------------------------ engine vs loop

def test_engine_counts_equal_a_plain_loop_on_the_same_noise():
    """Same noise, plain batch-by-batch loop with counts on the host: identical class counts and bound."""
    model = _tiny_conv(2)
    x = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(2))
    seed, idx, n, chunk, alpha = 4, 6, 1000, 100, 0.01
    eps = noise((3, 4, 4), SIGMA, seed, idx, range(1, 1 + n // chunk), chunk, CPU)
    counts = np.zeros(3, dtype=np.int64)
    with torch.no_grad():
        for b0 in range(0, n, 128):  # a batch size unrelated to the chunk
            counts += np.bincount(model(x + eps[b0:b0 + 128]).argmax(1).numpy(), minlength=3)
    engine = torch.bincount(predictions(model, x, SIGMA, seed, idx, 1, n, chunk, 3), minlength=3).numpy()
    assert counts.sum() == n and (counts > 0).sum() >= 2
    assert np.array_equal(engine, counts)
    cache = build_cache(model, x[None], torch.tensor([0]), [idx], SIGMA, 50, n, alpha, seed, chunk, 3, {})
    assert np.array_equal(np.bincount(cache.preds[0].numpy(), minlength=3), counts)
    c_hat = int(cache.top[0]) if int(cache.top[0]) != ABSTAIN else None
    if c_hat is not None:
        assert float(cache.p_lower[0]) == lower_confidence_bound(int(counts[c_hat]), n, alpha)
    else:  # abstained: whichever class was selected, its bound did not exceed ½
        assert float(cache.p_lower[0]) <= 0.5


# ------------------------------------------------------------------------------------------ the cache file

def test_build_cache_records_its_parameters():
    x = _images([0.0, 0.5])
    cache = _cache(LinearBinary(_bias(0.9)), x, n0=20, n=300, alpha=0.02, seed=8, chunk=100,
                   meta={"model_sha256": "abc", "split": "val"})
    assert cache.meta == {"model_sha256": "abc", "split": "val", "noise_scheme": irs_module.NOISE_SCHEME,
                          "sigma": SIGMA, "n0": 20, "n": 300,
                          "alpha": 0.02, "seed": 8, "chunk": 100, "device": "cpu",
                          "dtype": "float32", **irs_module.replay_fingerprint(CPU, SHAPE, SIGMA, 8, 10, 100)}
    assert cache.meta["torch"] == torch.__version__ and len(cache.meta["noise_checksum"]) == 64
    assert cache.p_lower.dtype == torch.float64 and cache.labels.dtype == torch.int64
    assert cache.top.tolist() == [1, 1] and cache.seconds > 0


def test_cache_round_trip_and_metadata_check(tmp_path):
    x = _images([0.0, 0.4, -0.4])
    cache = _cache(LinearBinary(_bias(0.8)), x, meta={"model_sha256": "aa" * 32, "data_sha256": "d"})
    cache.extra["note"] = "hello"
    path = tmp_path / "cache.pt"
    cache.save(path)
    for back in (Cache.load(path), Cache.load(path, {"model_sha256": "aa" * 32, "device": "cpu", "n": 500})):
        assert back.meta == cache.meta and back.extra == {"note": "hello"} and back.seconds == cache.seconds
        for name in ("idx", "labels", "top", "p_lower", "preds"):
            a, b = getattr(back, name), getattr(cache, name)
            assert a.dtype == b.dtype and torch.equal(a, b), name
    assert back.preds.dtype == torch.uint8 and back.preds.shape == (3, 500)
    with pytest.raises(CacheError, match="model_sha256"):
        Cache.load(path, {"model_sha256": "bb" * 32})
    with pytest.raises(CacheError, match="dtype"):
        Cache.load(path, {"model_sha256": "aa" * 32, "dtype": "float16"})
    with pytest.raises(CacheError, match="absent_key"):  # a key the cache never recorded is a mismatch too
        Cache.load(path, {"absent_key": 1})
    # the loaded cache certifies exactly like the one in memory
    f_p = LinearBinary(_bias(0.7))
    assert certify_incremental(f_p, Cache.load(path), x, 200, 0.01, 1.0, 2)[0] == \
        certify_incremental(f_p, cache, x, 200, 0.01, 1.0, 2)[0]


def test_unreadable_or_foreign_files_raise_cache_error(tmp_path):
    with pytest.raises(CacheError, match="not found"):
        Cache.load(tmp_path / "missing.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": "something-else/1", "meta": {}}, foreign)
    with pytest.raises(CacheError, match="not an IRS cache"):
        Cache.load(foreign)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(CacheError, match="not an IRS cache"):
        Cache.load(tensor)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(CacheError, match="cannot read"):
        Cache.load(garbage)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CacheError, match="cannot read"):
        Cache.load(empty)
    unsafe = tmp_path / "unsafe.pt"  # arbitrary pickled objects are refused (weights_only)
    torch.save({"format": FORMAT, "obj": argparse.Namespace(a=1)}, unsafe)
    with pytest.raises(CacheError, match="cannot read"):
        Cache.load(unsafe)
    good = tmp_path / "good.pt"
    _cache(LinearBinary(_bias(0.8)), _images([0.0])).save(good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CacheError, match="cannot read"):
        Cache.load(truncated)


def test_misuse_raises():
    x = _images([0.0, 0.3])
    f = LinearBinary(_bias(0.9))
    with pytest.raises(ValueError, match="multiple of the noise chunk"):
        _cache(f, x, n=250, chunk=100)
    cache = _cache(f, x, n=300)
    with pytest.raises(CacheError, match="1 images given for a cache of 2"):
        certify_incremental(f, cache, x[:1], 100, 0.01, 1.0, 1)
    with pytest.raises(CacheError):
        certify_incremental(f, cache, torch.cat([x, x]), 100, 0.01, 1.0, 1)
    with pytest.raises(ValueError, match="n_p = 400 exceeds the 300"):
        certify_incremental(f, cache, x, 400, 0.01, 1.0, 1)
    assert certify_one(f, cache, 0, x[0], 300, 0.01, 1.0, 1).disagreements == 0  # n_p = n is allowed
    with pytest.raises(ValueError, match="256 classes"):
        _cache(Constant(280, k=300), x[:1], n=100)  # class 280 would wrap around in a byte


# ---------------------------------------------------------------------------------------------------- ACR

def _cert(prediction: int, radius: float) -> IncrementalCertificate:
    return IncrementalCertificate(prediction, radius, 0.9, 0.01, 0, "irs", 0.99)


def test_acr_counts_only_correct_predictions():
    results = [_cert(1, 0.5), _cert(ABSTAIN, 0.0), _cert(2, 0.3), _cert(0, 0.7)]
    assert acr(results, torch.tensor([1, 1, 0, 0])) == pytest.approx((0.5 + 0.7) / 4)
    assert acr(results, torch.tensor([2, 2, 2, 2])) == pytest.approx(0.3 / 4)
    assert acr(results, [1, 1, 2, 0]) == pytest.approx((0.5 + 0.3 + 0.7) / 4)
    assert acr([], torch.tensor([], dtype=torch.long)) == 0.0


def test_cached_acr_from_hand_made_certificates():
    sigma = 0.25
    cache = Cache({"sigma": sigma}, torch.arange(5), torch.tensor([1, 1, 0, 0, 2]),
                  torch.tensor([1, ABSTAIN, 2, 0, 2]), torch.tensor([0.9, 0.4, 0.99, 0.7, 0.5001], dtype=torch.float64),
                  torch.zeros(5, 10, dtype=torch.uint8))
    want = sigma * (norm.ppf(0.9) + norm.ppf(0.7) + norm.ppf(0.5001)) / 5
    assert cached_acr(cache) == pytest.approx(want, rel=1e-12)
    # the same certificates through acr give the same number
    results = [_cert(int(t), certified_radius(sigma, float(p)) if int(t) != ABSTAIN else 0.0)
               for t, p in zip(cache.top, cache.p_lower)]
    assert acr(results, cache.labels) == pytest.approx(want, rel=1e-12)
    empty = Cache({"sigma": sigma}, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                  torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64),
                  torch.zeros(0, 10, dtype=torch.uint8))
    assert cached_acr(empty) == 0.0


def test_cached_acr_of_a_built_cache_is_the_mean_certified_radius():
    x = _images([0.0, 0.5, -0.5])
    cache = _cache(LinearBinary(_bias(0.85)), x)
    assert (cache.top == 1).all() and (cache.labels == 1).all()
    want = np.mean([certified_radius(SIGMA, p) for p in cache.p_lower.tolist()])
    assert cached_acr(cache) == pytest.approx(want, rel=1e-12) and want > 0
    cache.labels[:] = 0  # all wrong: nothing counts
    assert cached_acr(cache) == 0.0


def test_noise_seeds_do_not_collide_across_images_streams_and_seeds():
    """Fresh streams of image i once coincided with estimation streams of image i+1; hashed seeds never do."""
    seeds = {noise_seed(s, i, k) for s in (0, 1) for i in range(50)
             for k in [*range(60), *range(FRESH_BASE, FRESH_BASE + 5), 48543, 48544]}
    assert len(seeds) == 2 * 50 * 67
    assert noise_seed(0, 1, 48543) != noise_seed(0, 0, FRESH_BASE)
    assert all(0 <= s < 2 ** 63 for s in seeds)


def test_a_replay_on_a_device_that_draws_other_noise_is_refused():
    """CUDA lays random numbers out by the GPU model, so a cache replayed elsewhere would compare f_p with f on
    different noise: the recorded checksum of one regenerated chunk must match, and the error names both."""
    x = _images([0.0, 0.3])
    cache = _cache(LinearBinary(_bias(0.8)), x)
    certify_incremental(LinearBinary(_bias(0.7)), cache, x, 100, 0.01, 0.99, 1)  # same device: accepted
    cache.meta.update(noise_checksum="0" * 64, device_name="NVIDIA H100 80GB HBM3", torch="2.14.1+cu130")
    with pytest.raises(CacheError, match=r"NVIDIA H100 80GB HBM3 with torch 2\.14\.1\+cu130.*cpu"):
        certify_incremental(LinearBinary(_bias(0.7)), cache, x, 100, 0.01, 0.99, 1)
    del cache.meta["noise_checksum"]
    with pytest.raises(CacheError, match="no noise checksum"):
        certify_incremental(LinearBinary(_bias(0.7)), cache, x, 100, 0.01, 0.99, 1)
