"""HAWQ-V3's bit allocation: an integer linear program over per-layer bits under the BitOps budget.

Layer l at b bits costs Ω_l(b) = |Tr(H_l)|/n_l · ‖Q_b(W_l) − W_l‖², the second-order estimate of the loss increase
when its weights are quantized (Q_b is our quantizer, with the configured clip). One binary variable per (layer,
bit width), exactly one chosen per layer; minimise Σ Ω subject to Σ MACs·b_w·b_a ≤ budget. Activations take the
weight bits (HAWQ-V3 quantizes both alike) or a fixed width. Pinned layers keep their bits and count in the cost.
Solved exactly by CBC through pulp. The absolute trace follows later users of PyHessian: on a non-convex loss a
small layer's estimate can come out negative, and a negative sensitivity would reward quantization error.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pulp
import torch
from torch import nn

from arq import cost, policy, quant
from arq.io import origin, provenance, sha256_file
from arq.policy import Rules, require_budget


def activation_bits(b: int, a_bits: int | str) -> int:
    return b if a_bits == "same" else int(a_bits)


def sensitivities(model: nn.Module, traces: Mapping[str, Mapping], layers: Sequence[str], bits: Sequence[int],
                  weight_clip: str) -> dict[str, dict[int, float]]:
    """Ω_l(b) for every listed layer and bit width, with the same weight quantizer the finetune uses."""
    modules = dict(model.named_modules())
    out = {}
    with torch.no_grad():
        for name in layers:
            if name not in traces:
                raise ValueError(f"the Hessian file has no trace for layer {name!r}")
            w = modules[name].weight.detach()
            scale = abs(float(traces[name]["trace"])) / w.numel()
            out[name] = {b: scale * float(((quant.quantize_weight(w, b, weight_clip) - w) ** 2).sum()) for b in bits}
    return out


def allocate(omega: Mapping[str, Mapping[int, float]], costs: list[cost.LayerCost], rules: Rules,
             bits: Sequence[int], budget_pct: float, a_bits: int | str = "same") -> tuple[dict, dict]:
    """The optimal bits per layer and the solver's report. Raises BudgetError, naming the smallest achievable
    budget, when even the lowest bits exceed ``budget_pct`` % of FP32 BitOps."""
    bits = sorted(set(int(b) for b in bits))
    by_name = {c.name: c for c in costs}
    free = [n for n in rules.layers if n not in rules.pinned]
    fixed_bitops = sum(by_name[n].macs * b * b for n, b in rules.pinned.items())
    limit = budget_pct / 100.0 * cost.fp32_bitops(costs)

    def bitops(name: str, b: int) -> int:
        return by_name[name].macs * b * activation_bits(b, a_bits)

    cheapest = fixed_bitops + sum(min(bitops(n, b) for b in bits) for n in free)
    require_budget(costs, cheapest, budget_pct, f"HAWQ's bits {bits} (activations {a_bits}) and the pinned layers")
    # scaled so that CBC's tolerances act on numbers near 1: objective by the largest Ω, cost by the FP32 BitOps
    top = max((v for n in free for v in omega[n].values()), default=1.0) or 1.0
    fp32 = cost.fp32_bitops(costs)
    prob = pulp.LpProblem("hawq_bits", pulp.LpMinimize)
    x = {(n, b): prob.add_variable(f"x_{i}_{b}", 0, 1, cat="Binary") for i, n in enumerate(free) for b in bits}
    prob += pulp.lpSum(omega[n][b] / top * x[n, b] for n in free for b in bits)
    for n in free:
        prob += pulp.lpSum(x[n, b] for b in bits) == 1
    prob += pulp.lpSum(bitops(n, b) / fp32 * x[n, b] for n in free for b in bits) <= (limit - fixed_bitops) / fp32
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # pulp 3.3 deprecates its bundled CBC for a separate package; the bundle is pinned
        warnings.simplefilter("ignore", DeprecationWarning)
        status = prob.solve(pulp.PULP_CBC_CMD(msg=False))
    if pulp.LpStatus[status] != "Optimal":
        raise RuntimeError(f"CBC did not solve the HAWQ program: status {pulp.LpStatus[status]}")
    layers = {n: {"w_bits": b, "a_bits": b} for n, b in rules.pinned.items()}
    for n in free:
        b = max(bits, key=lambda bb: x[n, bb].value())
        layers[n] = {"w_bits": b, "a_bits": activation_bits(b, a_bits)}
    layers = {n: layers[n] for n in rules.layers}
    used = fixed_bitops + sum(bitops(n, layers[n]["w_bits"]) for n in free)
    if used > limit:  # CBC's feasibility tolerance must not let a policy over the budget through
        raise RuntimeError(f"CBC's solution uses {100.0 * used / fp32:.6f}% of FP32 BitOps, over the "
                           f"{budget_pct:g}% budget")
    objective = sum(omega[n][layers[n]["w_bits"]] for n in free)
    return layers, {"solver": "CBC (pulp)", "status": "Optimal", "objective": objective,
                    "seconds_solver": round(time.perf_counter() - t0, 3), "variables": len(x)}


def run_allocate(config: dict, sigma: float, budget: float, model_path: str | Path, hessian_path: str | Path,
                 out_policy: str | Path, log: Callable[[str], None] = print, base: str = "fp32") -> dict:
    """The allocate_hawq stage: sensitivities from the Hessian file, the ILP at one budget, a policy document."""
    import json

    from arq import models

    hc = config["hawq"]
    start = time.perf_counter()
    hessian = json.loads(Path(hessian_path).read_text())
    model, meta = models.load_for_stage(model_path, config, sigma, base, log)
    if hessian.get("model_sha256") != sha256_file(model_path):
        raise models.CheckpointError(f"{hessian_path} holds the traces of another model than {model_path}")
    costs, rules = policy.for_config(config)
    bits = [b for b in hc["bits"] if config["quant"]["min_bits"] <= b <= config["quant"]["max_bits"]]
    if not bits:
        raise ValueError(f"hawq.bits {hc['bits']} has no width within quant.min_bits..max_bits")
    free = [n for n in rules.layers if n not in rules.pinned]
    for n in free:
        t = hessian["layers"].get(n)
        if t is not None and t["trace"] < 0:
            log(f"WARNING {n}: negative trace {t['trace']:.4g} ± {t['stderr']:.2g}; its sensitivity uses |trace|")
    omega = sensitivities(model, hessian["layers"], free, bits, config["quant"]["weight_clip"])
    layers, report = allocate(omega, costs, rules, bits, budget, hc["a_bits"])
    wall = time.perf_counter() - start
    doc = policy.make(layers, costs, rules, "hawq-v3", method="hawq", sigma=sigma, budget_pct=budget, bits=bits,
                      a_bits_rule=hc["a_bits"], **report,
                      seconds_to_policy=round(float(hessian["wall_seconds"]) + wall, 3),
                      hessian_sha256=sha256_file(hessian_path),
                      sensitivity={n: {str(b): v for b, v in omega[n].items()} for n in free},
                      **provenance(config, torch.device("cpu"), wall,
                                   {"model": origin(model_path, meta), "hessian": origin(hessian_path, hessian)}))
    policy.save(out_policy, doc)
    log(f"HAWQ at {budget:g}%: {doc['bitops_pct']:.3f}% of FP32 BitOps, objective {report['objective']:.4g}, "
        f"weight bits {'/'.join(str(layers[n]['w_bits']) for n in rules.layers)}")
    return doc
