"""Incremental randomized smoothing (Ugare et al., ICLR 2024): certify a modified network against a cache.

The FP32 network f is certified once (Cohen's CERTIFY) on a subset; the cache keeps, per image, the selected
class c_A, the lower bound p_A, and f's prediction on every estimation sample. The noise is never stored: it
is regenerated from (seed, image index, chunk) — chunks of a fixed size, each from its own generator — so a
modified network f_p sees bit-identical noise on the same device and dtype.

For f_p, ζ is a one-sided Clopper–Pearson upper bound (level α_ζ), from the first n_p replayed samples, on
the rate of the disagreements that can lower P[f_p = c_A], and the radius is σΦ⁻¹(p̲_A − ζ) when the cached
lower bound p̲_A < γ. When p̲_A ≥ γ the bound on p_A brings little, so f_p is certified afresh on n_p fresh
samples at level α. Every result records the confidence 1 − (α + α_ζ), which holds in both cases. Let E_A be
"p̲_A exceeds the true P[f = c_A]" (probability ≤ α), E_ζ "ζ is below the true loss rate" (≤ α_ζ) and E_F
"the fresh bound exceeds the true P[f_p = c_A]" (≤ α):
- true P[f = c_A] < γ: the fresh branch is only taken when p̲_A ≥ γ, i.e. inside E_A, so a wrong certificate
  needs E_A or E_ζ: at most α + α_ζ;
- true P[f = c_A] ≥ γ: the IRS branch is only taken when p̲_A < γ, outside E_A, so a wrong certificate needs
  E_ζ (IRS branch) or E_F (fresh branch): at most α_ζ + α.
Running the fresh branch at α + α_ζ, as the IRS paper's confidence might suggest, would give 1 − (α + 2α_ζ)
in the second case.

The noise is drawn by torch's generators, whose layout is device-specific (on CUDA it depends on the GPU
model), so the cache records the device name, the torch version and a checksum of one regenerated chunk, and
a replay that would see other noise is refused (``Cache.check_replay``).

Which disagreements ζ counts (``zeta_counts``): the IRS paper bounds every disagreement, P[f ≠ f_p]
("all_disagreements"). Only one kind can cost c_A probability, though:
P[f_p = c_A] = P[f = c_A] − P[f = c_A, f_p ≠ c_A] + P[f ≠ c_A, f_p = c_A] ≥ p_A − P[f = c_A, f_p ≠ c_A],
so bounding the top-class losses alone ("top_class_losses", the default) is just as sound (the same union
bound over the two estimates) and never looser: flips between other classes and flips *to* c_A are free.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from arq import rng
from arq.config import config_hash
from arq.engine import Engine, model_device
from arq.io import torch_save
from arq.smoothing import ABSTAIN, certified_radius, lower_confidence_bound, upper_confidence_bound

FORMAT = "arq-irs-cache/1"
ZETA_COUNTS = ("top_class_losses", "all_disagreements")
SELECTION_STREAM = 0  # stream ids: 0 = selection (n0), 1.. = estimation chunks, FRESH_BASE.. = fresh samples
FRESH_BASE = 1 << 20
NOISE_SCHEME = "arq.rng-irs-seed-per-chunk/2"  # recorded in the cache: a replay must regenerate noise the same way


class CacheError(RuntimeError):
    """An IRS cache that is unreadable or belongs to another model, dataset, device or dtype."""


def noise_seed(seed: int, idx: int, stream: int) -> int:
    """A 63-bit generator seed per (seed, image, stream), in IRS's own domain of arq.rng."""
    return rng.derive_seed("irs", seed, idx, stream)


def noise(shape: tuple[int, ...], sigma: float, seed: int, idx: int, streams: range, chunk: int,
          device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, σ²) noise for ``len(streams)`` chunks of ``chunk`` samples, each chunk from its own generator."""
    parts = []
    for s in streams:
        gen = torch.Generator(device=device).manual_seed(noise_seed(seed, idx, s))
        parts.append(torch.randn((chunk, *shape), generator=gen, device=device, dtype=dtype))
    return torch.cat(parts).mul_(sigma)


@torch.inference_mode()
def predictions(model: nn.Module, x: torch.Tensor, sigma: float, seed: int, idx: int, first_stream: int,
                num: int, chunk: int, chunks_per_batch: int) -> torch.Tensor:
    """f(x + ε) for ``num`` samples of streams first_stream, first_stream+1, …; int64 on the model's device.

    The noise is always drawn in float32 whatever the engine runs, so it replays identically under any engine."""
    device = model_device(model)
    x = x.to(device)
    n_chunks = -(-num // chunk)
    out = []
    for c0 in range(0, n_chunks, chunks_per_batch):
        streams = range(first_stream + c0, first_stream + min(c0 + chunks_per_batch, n_chunks))
        # whole chunks are drawn (the replay unit), but only the samples still needed go through the network
        batch = noise(tuple(x.shape), sigma, seed, idx, streams, chunk, device)[:num - c0 * chunk].add_(x)
        out.append(model(batch).argmax(1))
    return torch.cat(out)


@dataclass
class Cache:
    """Per-image certificate of f plus f's per-sample predictions (uint8, one byte per sample)."""

    meta: dict  # sigma, n0, n, alpha, seed, chunk, model/data hashes, device, dtype, engine
    idx: torch.Tensor  # dataset index of each image (int64)
    labels: torch.Tensor
    top: torch.Tensor  # c_A, or ABSTAIN
    p_lower: torch.Tensor  # float64
    preds: torch.Tensor  # uint8 [images, n]
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        torch_save({"format": FORMAT, "meta": self.meta, "idx": self.idx, "labels": self.labels, "top": self.top,
                    "p_lower": self.p_lower, "preds": self.preds, "seconds": self.seconds, "extra": self.extra},
                   path)

    @classmethod
    def load(cls, path: str | Path, expect: dict | None = None) -> "Cache":
        """Read a cache; with ``expect``, refuse one whose metadata differs on any of those keys."""
        path = Path(path)
        if not path.exists():
            raise CacheError(f"IRS cache not found: {path}")
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CacheError(f"cannot read IRS cache {path}: {exc}") from exc
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CacheError(f"{path} is not an IRS cache ({FORMAT})")
        for key, want in (expect or {}).items():
            have = d["meta"].get(key)
            if have != want:
                raise CacheError(f"IRS cache {path} was made with {key} = {have!r}, but this run has {want!r}; "
                                 "rebuild the cache (irs_cache stage) for this model and dataset")
        return cls(d["meta"], d["idx"], d["labels"], d["top"], d["p_lower"], d["preds"], d["seconds"], d["extra"])

    def check_replay(self, device: torch.device, shape: tuple[int, ...]) -> None:
        """Refuse to replay on a device (or torch) whose generators would draw other noise than the cache saw."""
        m = self.meta
        if "noise_checksum" not in m:
            raise CacheError("this IRS cache records no noise checksum (made by an older arq); rebuild it")
        here = replay_fingerprint(device, shape, m["sigma"], m["seed"], int(self.idx[0]), m["chunk"])
        if here["noise_checksum"] != m["noise_checksum"]:
            raise CacheError(f"the IRS cache's noise was drawn on {m['device_name']} with torch {m['torch']}, and "
                             f"{here['device_name']} with torch {here['torch']} regenerates different noise "
                             "(torch's generators lay numbers out per device model); rebuild the cache on this "
                             "device (irs_cache stage) or certify on the cache's device")


def replay_fingerprint(device: torch.device, shape: tuple[int, ...], sigma: float, seed: int, idx: int,
                       chunk: int) -> dict:
    """Device name, torch version and the sha256 of one regenerated noise chunk (image ``idx``, first stream)."""
    from arq.io import device_name

    chunk_noise = noise(tuple(shape), sigma, seed, idx, range(1, 2), chunk, device)
    return {"device_name": device_name(device, threads=False), "torch": str(torch.__version__),
            "noise_checksum": hashlib.sha256(chunk_noise.cpu().numpy().tobytes()).hexdigest()}


def build_cache(model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: list[int], sigma: float, n0: int, n: int,
                alpha: float, seed: int, chunk: int, chunks_per_batch: int, meta: dict,
                progress: Callable | None = None) -> Cache:
    """Certify f on every image (Cohen's CERTIFY with replayable noise) and keep its per-sample predictions."""
    if n % chunk:
        raise ValueError(f"n = {n} must be a multiple of the noise chunk {chunk}")
    model.eval()
    device = model_device(model)
    top, p_lower, preds = [], [], []
    iterator = range(len(idx)) if progress is None else progress(range(len(idx)), total=len(idx), initial=0)
    t0 = time.perf_counter()
    for i in iterator:
        sel = predictions(model, x[i], sigma, seed, int(idx[i]), SELECTION_STREAM, n0, n0, 1)
        c_hat = int(torch.bincount(sel).argmax())
        est = predictions(model, x[i], sigma, seed, int(idx[i]), 1, n, chunk, chunks_per_batch)
        if int(est.max()) > 255:
            raise ValueError("the cache stores predictions as uint8: at most 256 classes")
        count = int((est == c_hat).sum())
        pl = lower_confidence_bound(count, n, alpha)
        top.append(c_hat if pl > 0.5 else ABSTAIN)
        p_lower.append(pl)
        preds.append(est.to(torch.uint8).cpu())
    seconds = time.perf_counter() - t0
    meta = {**meta, "noise_scheme": NOISE_SCHEME, "sigma": sigma, "n0": n0, "n": n, "alpha": alpha, "seed": seed,
            "chunk": chunk, "device": device.type,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            **replay_fingerprint(device, tuple(x.shape[1:]), sigma, seed, int(idx[0]), chunk)}
    return Cache(meta, torch.tensor([int(i) for i in idx]), torch.as_tensor(y).long().cpu(), torch.tensor(top),
                 torch.tensor(p_lower, dtype=torch.float64), torch.stack(preds), seconds)


@dataclass(frozen=True)
class IncrementalCertificate:
    prediction: int  # ABSTAIN when no certificate
    radius: float
    p_lower: float  # the bound the radius comes from (p_A − ζ, or the fresh bound)
    zeta: float  # NaN on the fresh branch
    disagreements: int  # samples with f ≠ f_p among the n_p replayed (-1 on the fresh branch)
    branch: str  # "irs" | "fresh" | "abstain-cached"
    confidence: float  # 1 − (α + α_ζ)
    losses: int = -1  # samples with f = c_A ≠ f_p (the top-class losses; -1 on the fresh branch)


def certify_one(model: nn.Module, cache: Cache, i: int, x: torch.Tensor, n_p: int, alpha_zeta: float, gamma: float,
                chunks_per_batch: int, zeta_counts: str = "top_class_losses") -> IncrementalCertificate:
    """IRS-CERTIFY of the modified ``model`` on cached image i (x is that image in [0,1]).

    ``zeta_counts`` picks the disagreements ζ bounds (module docstring); both counts are always recorded."""
    if zeta_counts not in ZETA_COUNTS:
        raise ValueError(f"zeta_counts must be one of {ZETA_COUNTS}, not {zeta_counts!r}")
    m = cache.meta
    alpha, sigma, chunk = m["alpha"], m["sigma"], m["chunk"]
    confidence = 1.0 - (alpha + alpha_zeta)
    c_a, p_a = int(cache.top[i]), float(cache.p_lower[i])
    if c_a == ABSTAIN:  # f itself was not certified: there is no bound to carry over
        return IncrementalCertificate(ABSTAIN, 0.0, p_a, float("nan"), -1, "abstain-cached", confidence)
    idx = int(cache.idx[i])
    if p_a < gamma:
        if n_p > m["n"]:
            raise ValueError(f"n_p = {n_p} exceeds the {m['n']} cached samples per image")
        pred = predictions(model, x, sigma, m["seed"], idx, 1, n_p, chunk, chunks_per_batch).cpu()
        cached = cache.preds[i, :n_p].long()
        d = int((pred != cached).sum())
        lost = int(((cached == c_a) & (pred != c_a)).sum())
        zeta = upper_confidence_bound(lost if zeta_counts == "top_class_losses" else d, n_p, alpha_zeta)
        pl = p_a - zeta
        if pl > 0.5:
            return IncrementalCertificate(c_a, certified_radius(sigma, pl), pl, zeta, d, "irs", confidence, lost)
        return IncrementalCertificate(ABSTAIN, 0.0, pl, zeta, d, "irs", confidence, lost)
    pred = predictions(model, x, sigma, m["seed"], idx, FRESH_BASE, n_p, chunk, chunks_per_batch)
    pl = lower_confidence_bound(int((pred == c_a).sum()), n_p, alpha)  # at α, not α + α_ζ: module docstring
    if pl > 0.5:
        return IncrementalCertificate(c_a, certified_radius(sigma, pl), pl, float("nan"), -1, "fresh", confidence)
    return IncrementalCertificate(ABSTAIN, 0.0, pl, float("nan"), -1, "fresh", confidence)


def certify_incremental(model: nn.Module, cache: Cache, x: torch.Tensor, n_p: int, alpha_zeta: float, gamma: float,
                        chunks_per_batch: int, progress: Callable | None = None,
                        zeta_counts: str = "top_class_losses") -> tuple[list[IncrementalCertificate], float]:
    """IRS-CERTIFY every cached image; ``x[i]`` must be the image of ``cache.idx[i]``. Returns results, seconds."""
    if len(x) != len(cache.idx):
        raise CacheError(f"{len(x)} images given for a cache of {len(cache.idx)}")
    cache.check_replay(model_device(model), tuple(x.shape[1:]))
    model.eval()
    iterator = range(len(x)) if progress is None else progress(range(len(x)), total=len(x), initial=0)
    t0 = time.perf_counter()
    results = [certify_one(model, cache, i, x[i], n_p, alpha_zeta, gamma, chunks_per_batch, zeta_counts)
               for i in iterator]
    return results, time.perf_counter() - t0


def branch_counts(results: list[IncrementalCertificate]) -> dict:
    """How many images took each branch."""
    return {b: sum(r.branch == b for r in results) for b in ("irs", "fresh", "abstain-cached")}


def disagreement_rates(results: list[IncrementalCertificate], n_p: int) -> dict:
    """Mean per-image rates of all disagreements and of top-class losses over the IRS-branch images."""
    on_irs = [r for r in results if r.branch == "irs"]
    if not on_irs:
        return {"disagreement_rate": None, "top_class_loss_rate": None}
    return {"disagreement_rate": sum(r.disagreements for r in on_irs) / (n_p * len(on_irs)),
            "top_class_loss_rate": sum(r.losses for r in on_irs) / (n_p * len(on_irs))}


def acr(results: list, labels: torch.Tensor) -> float:
    """Average certified radius: mean of radius · [prediction correct] (abstain counts 0)."""
    return sum(r.radius * (r.prediction == int(y)) for r, y in zip(results, labels)) / max(len(results), 1)


def cached_acr(cache: Cache) -> float:
    """ACR of f itself from its cached certificates (the reference an ARQ reward is measured against)."""
    total = 0.0
    for top, pl, y in zip(cache.top.tolist(), cache.p_lower.tolist(), cache.labels.tolist()):
        if top != ABSTAIN and top == y:
            total += certified_radius(cache.meta["sigma"], pl)
    return total / max(len(cache.top), 1)


# ------------------------------------------------------------------------------------------------- stages

IRS_TSV_COLUMNS = ("idx", "label", "predict", "radius", "correct", "zeta", "branch", "time")


def _val_subset(data, images: int | None):
    """The cache's val images: class-balanced (the val split is kept in class order)."""
    from arq.data import balanced_positions, to_unit

    pos = balanced_positions(data.val.y, images)
    return pos, to_unit(data.val.x[pos]), data.val.y[pos]


def run_cache(config: dict, sigma: float, model_path: str | Path, data, out: str | Path, summary_json: str | Path,
              device: torch.device, log: Callable = print, base: str = "fp32") -> dict:
    """The irs_cache stage: certify the FP32 model (the ``base`` variant) on the val subset once, keep what IRS
    replays."""
    from arq import models
    from arq.certify import progress
    from arq.io import origin, provenance, sha256_file, write_json

    start = time.perf_counter()
    ic = config["irs"]
    model, meta = models.load_for_stage(model_path, config, sigma, base, log)
    if "policy" in meta:
        raise models.CheckpointError(f"{model_path} is quantized; the IRS cache is built from the FP32 model")
    engine = Engine.from_config(config)
    sigma = float(meta["sigma"])
    pos, x, y = _val_subset(data, ic["images"])
    cache = build_cache(engine.prepare(model, device), x, y, pos.tolist(), sigma, ic["n0"], ic["n"], ic["alpha"],
                        ic["seed"], ic["chunk"], ic["chunks_per_batch"],
                        {"model_sha256": sha256_file(model_path), "data_sha256": data.manifest["file_sha256"],
                         "arch": config["model"]["arch"], "split": "val", "engine": engine.describe(),
                         "config_hash": config_hash(config)},
                        progress(f"irs cache σ={sigma}"))
    cache.save(out)
    certified = cache.top != ABSTAIN
    summary = {"base": base, "sigma": sigma, "images": len(pos), "n0": ic["n0"], "n": ic["n"], "alpha": ic["alpha"],
               "acr": cached_acr(cache), "clean_accuracy": float((cache.top == cache.labels).float().mean()),
               "abstain_rate": float((~certified).float().mean()),
               "mean_p_lower": float(cache.p_lower[certified].mean()) if certified.any() else None,
               "cache_megabytes": round(cache.preds.numel() / 1e6, 3),
               "samples_per_s": round(len(pos) * (ic["n0"] + ic["n"]) / cache.seconds, 1),
               "engine": engine.describe(),
               **provenance(config, device, time.perf_counter() - start, {"model": origin(model_path, meta)})}
    write_json(summary_json, summary)
    return summary


def run_incremental(config: dict, sigma: float, method: str, model_path: str | Path, cache_path: str | Path, data,
                    out_tsv: str | Path, summary_json: str | Path, device: torch.device,
                    log: Callable = print) -> dict:
    """Certify a quantized checkpoint incrementally against the cache of the FP32 model it was made from."""
    import datetime
    from decimal import ROUND_CEILING

    from arq import models
    from arq.certify import progress
    from arq.data import to_unit
    from arq.io import origin, provenance, write_json
    from arq.records import format_bound, summarize, write_tsv

    start = time.perf_counter()
    ic = config["irs"]
    model, meta = models.load_for_stage(model_path, config, sigma, method, log)
    if "base_sha256" not in meta:
        raise models.CheckpointError(f"{model_path} records no FP32 base model; IRS needs the cache of its base")
    engine = Engine.from_config(config)
    cache = Cache.load(cache_path, {"model_sha256": meta["base_sha256"], "data_sha256": data.manifest["file_sha256"],
                                    "device": device.type, "dtype": "float32", "noise_scheme": NOISE_SCHEME})
    if abs(cache.meta["sigma"] - float(meta["sigma"])) > 1e-12:
        raise CacheError(f"{cache_path} is for σ={cache.meta['sigma']}, the model for σ={meta['sigma']}")
    pos = cache.idx  # cached dataset indices are val positions (the cache's split)
    x = to_unit(data.val.x[pos])
    results, seconds = certify_incremental(engine.prepare(model, device), cache, x, ic["n_p"], ic["alpha_zeta"],
                                           ic["gamma"], ic["chunks_per_batch"],
                                           progress(f"irs {method} σ={cache.meta['sigma']}"), ic["zeta_counts"])
    per_image = seconds / max(len(results), 1)
    rows = [{"idx": int(i), "label": int(y), "predict": r.prediction, "radius": format_bound(r.radius),
             "correct": int(r.prediction == int(y)), "zeta": format_bound(r.zeta, ROUND_CEILING), "branch": r.branch,
             "time": str(datetime.timedelta(seconds=per_image))}
            for i, y, r in zip(cache.idx.tolist(), cache.labels.tolist(), results)]
    write_tsv(out_tsv, rows, IRS_TSV_COLUMNS)
    branches = branch_counts(results)
    zetas = [r.zeta for r in results if r.branch == "irs"]
    summary = {"method": method, "sigma": cache.meta["sigma"], "split": "val",
               "bitops_pct": float(meta["policy"]["bitops_pct"]) if "policy" in meta else 100.0,
               "n_p": ic["n_p"], "alpha": cache.meta["alpha"], "alpha_zeta": ic["alpha_zeta"], "gamma": ic["gamma"],
               "confidence": 1 - (cache.meta["alpha"] + ic["alpha_zeta"]),
               **summarize(rows, config["report"]["radii"]),
               "fp32_acr": cached_acr(cache), "branches": branches,
               "zeta_counts": ic["zeta_counts"], "mean_zeta": sum(zetas) / len(zetas) if zetas else None,
               **disagreement_rates(results, ic["n_p"]),
               "seconds_certifying": round(seconds, 3), "engine": engine.describe(),
               **provenance(config, device, time.perf_counter() - start,
                            {"model": origin(model_path, meta), "cache": origin(cache_path, cache.meta)})}
    write_json(summary_json, summary)
    return summary
