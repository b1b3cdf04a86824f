"""Per-layer Hessian traces of the noise-augmented training loss, by Hutchinson's method (HAWQ-V3's sensitivity).

For a Rademacher vector v over all quantizable weights, E[v_lᵀ(Hv)_l] = Tr(H_ll): the cross-layer blocks of H
vanish in expectation, so one Hessian-vector product per probe gives every layer's trace at once. Hv comes from
double backpropagation: the gradient is built once with its graph kept, and each probe differentiates ⟨g, v⟩.

The loss is the one the base model was trained on: cross-entropy on noisy training images (fixed images and
fixed noise, so the estimate is of one function), with BatchNorm in eval mode as PyHessian does. Probes are drawn
``probes`` per iteration; iterations stop when the running mean of the total trace has changed by less than ``tol``
relative to its previous value in ``patience`` consecutive iterations, or after ``max_iterations``. One such
iteration (PyHessian's rule) happens by chance long before the mean is that precise; requiring several in a row
makes a chance stop rare. The per-layer standard errors say how precise each trace really is, and layers whose
trace is within two standard errors of zero are listed as ``uncertain``.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from arq import quant, rng
from arq.io import origin, provenance, sha256_file, write_json

FORMAT = "arq-hessian/1"


def rademacher(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, like.shape, generator=gen, device=like.device).to(like.dtype).mul_(2).sub_(1)


def layer_traces(loss_fn: Callable[[], Iterable[tuple[torch.Tensor, float]]], params: dict[str, torch.Tensor],
                 gen: torch.Generator, probes: int = 4, max_iterations: int = 100, tol: float = 1e-3,
                 patience: int = 3, log: Callable[[str], None] | None = None) -> dict:
    """Hutchinson estimates of Tr(∂²L/∂W_l²) for every named parameter tensor W_l.

    ``loss_fn`` yields (loss, weight) pairs whose weighted sum is the loss (one per batch; the weights sum to 1).
    Returns per-layer means and standard errors over all probes, and the convergence history."""
    names = list(params)
    tensors = [params[n] for n in names]
    grads = []  # one gradient graph per batch, kept for every probe
    for loss, weight in loss_fn():
        g = torch.autograd.grad(loss, tensors, create_graph=True)
        grads.append((g, weight))
    samples: list[list[float]] = []  # per probe, per layer: v_lᵀ(Hv)_l
    history, previous, converged, calm = [], None, False, 0
    for iteration in range(1, max_iterations + 1):
        for _ in range(probes):
            v = [rademacher(t, gen) for t in tensors]
            hv = [torch.zeros_like(t) for t in tensors]
            for g, weight in grads:
                dot = sum((gi * vi).sum() for gi, vi in zip(g, v))
                for acc, h in zip(hv, torch.autograd.grad(dot, tensors, retain_graph=True)):
                    acc.add_(h, alpha=weight)
            samples.append([float((vi * hi).sum()) for vi, hi in zip(v, hv)])
        total = sum(sum(s) for s in samples) / len(samples)
        change = None if previous is None else abs(total - previous) / (abs(previous) + 1e-6)
        history.append({"iteration": iteration, "probes": len(samples), "total_trace": total,
                        "relative_change": change})
        if log is not None:
            log(f"iteration {iteration}: total trace {total:.6g}"
                + ("" if change is None else f", relative change {change:.2e}"))
        calm = calm + 1 if change is not None and change < tol else 0
        if calm >= patience:
            converged = True
            break
        previous = total
    per_layer = torch.tensor(samples, dtype=torch.float64)  # probes × layers
    mean = per_layer.mean(0)
    stderr = per_layer.std(0, unbiased=True) / math.sqrt(len(samples)) if len(samples) > 1 else torch.full_like(mean, math.nan)
    layers = {n: {"trace": float(mean[i]), "stderr": float(stderr[i]), "params": params[n].numel(),
                  "trace_per_param": float(mean[i]) / params[n].numel()} for i, n in enumerate(names)}
    uncertain = [n for n, v in layers.items() if not abs(v["trace"]) > 2 * v["stderr"]]
    return {"layers": layers, "iterations": len(history), "probes_total": len(samples), "converged": converged,
            "uncertain": uncertain, "history": history}


def noisy_loss_batches(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float, batch_size: int,
                       gen: torch.Generator):
    """The noise-augmented training loss on fixed images with fixed noise, as (batch loss, batch share) pairs."""
    noise = torch.randn(x.shape, generator=gen, device=x.device) * sigma
    n = len(x)

    def batches():
        for i in range(0, n, batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            yield F.cross_entropy(model(xb + noise[i:i + batch_size]), yb), len(xb) / n
    return batches


def run_hessian(config: dict, sigma: float, model_path: str | Path, data, out_json: str | Path,
                device: torch.device, log: Callable[[str], None] = print, base: str = "fp32") -> dict:
    """The hessian stage: traces of every quantizable layer of the FP32 model (the ``base`` variant) at σ, written
    with provenance."""
    from arq import models

    hc = config["hawq"]
    start = time.perf_counter()
    model, meta = models.load_for_stage(model_path, config, sigma, base, log)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    params = {}
    for name in quant.quantizable_layers(model):
        w = modules[name].weight
        w.requires_grad_(True)
        params[name] = w
    k = min(hc["images"], len(data.train))
    x = data.train.x[:k].to(device).float().div_(255)
    y = data.train.y[:k].to(device)
    log(f"Hessian traces of {len(params)} layers at σ={sigma}: {k} noisy training images, {hc['probes']} probes per "
        f"iteration, at most {hc['max_iterations']} iterations, tolerance {hc['tol']:g} in {hc['patience']} "
        f"consecutive iterations, on {device}")
    batches = noisy_loss_batches(model, x, y, sigma, hc["batch_size"], rng.generator("hessian-noise", hc["seed"],
                                                                                      device=device))
    result = layer_traces(batches, params, rng.generator("hessian-probes", hc["seed"], device=device), hc["probes"],
                          hc["max_iterations"], hc["tol"], hc["patience"], log)
    if not math.isfinite(result["history"][-1]["total_trace"]):  # HAWQ's ILP cannot weigh a NaN sensitivity
        raise models.CheckpointError(f"{model_path}: the Hessian trace is {result['history'][-1]['total_trace']}: "
                                     "the model's loss is not finite on the noisy training images")
    doc = {"format": FORMAT, "architecture": config["model"]["arch"], "sigma": sigma, "images": k,
           "probes_per_iteration": hc["probes"], "max_iterations": hc["max_iterations"], "tol": hc["tol"],
           "patience": hc["patience"],
           "model_sha256": sha256_file(model_path), **result,
           **provenance(config, device, time.perf_counter() - start, {"model": origin(model_path, meta)})}
    write_json(out_json, doc)
    state = "converged" if result["converged"] else "stopped at the iteration limit"
    log(f"{state} after {result['iterations']} iterations ({result['probes_total']} probes), "
        f"{time.perf_counter() - start:.0f} s")
    for name in result["uncertain"]:
        v = result["layers"][name]
        log(f"WARNING {name}: trace {v['trace']:.4g} ± {v['stderr']:.2g} (standard error) is within two standard "
            f"errors of zero; its sensitivity is uncertain")
    return doc
