"""Quantization policies: the bits of every layer, as a validated JSON document every method produces.

A policy is ``{"layers": {name: {"w_bits": b, "a_bits": b}}, ...metadata}``. Metadata records the
architecture, who produced it and its cost (BitOps, % of FP32, weight size), so a policy file alone says
what it costs. Validation is strict: a layer the model lacks, a layer the policy forgets, bits out of
range or a pinned layer at other bits each stop with an error naming the layer.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from arq import cost
from arq.io import provenance, write_json

FORMAT = "arq-policy/1"


class PolicyError(ValueError):
    """A policy that does not fit the model or the configured bit range; the message names the layer."""


class BudgetError(ValueError):
    """A BitOps budget no policy within the bit range can meet; the message names the smallest one that can."""


@dataclass(frozen=True)
class Rules:
    """What a valid policy for one architecture looks like."""

    arch: str
    layers: tuple[str, ...]  # every quantizable layer, forward order
    min_bits: int = 2
    max_bits: int = 8
    pinned: Mapping[str, int] = field(default_factory=dict)  # layer → bits for both weights and activations


def rules_for(arch: str, costs: list[cost.LayerCost], quant_config: Mapping) -> Rules:
    """Rules from the traced layers and the config's ``quant`` section (first conv and last FC pinned)."""
    names = tuple(c.name for c in costs)
    pinned = {}
    if quant_config["pin_first_last"]:
        pinned = {names[0]: quant_config["pinned_bits"], names[-1]: quant_config["pinned_bits"]}
    return Rules(arch, names, quant_config["min_bits"], quant_config["max_bits"], pinned)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate(layers: Mapping, rules: Rules) -> dict[str, dict[str, int]]:
    """Check a {layer: {w_bits, a_bits}} mapping against ``rules``; return it in forward order."""
    if not isinstance(layers, Mapping):
        raise PolicyError("policy 'layers' must map layer names to {w_bits, a_bits}")
    known = set(rules.layers)
    unknown = [name for name in layers if name not in known]
    if unknown:
        raise PolicyError(f"policy names layer {unknown[0]!r}, which {rules.arch} does not have "
                          f"(its quantizable layers: {', '.join(rules.layers)})")
    missing = [name for name in rules.layers if name not in layers]
    if missing:
        raise PolicyError(f"policy misses layer {missing[0]!r} of {rules.arch}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    out = {}
    for name in rules.layers:
        entry = layers[name]
        if not isinstance(entry, Mapping) or set(entry) != {"w_bits", "a_bits"}:
            raise PolicyError(f"layer {name!r}: expected exactly the keys w_bits and a_bits, got {entry!r}")
        for key in ("w_bits", "a_bits"):
            b = entry[key]
            if not _is_int(b) or not rules.min_bits <= b <= rules.max_bits:
                raise PolicyError(f"layer {name!r}: {key} = {b!r} is outside the allowed range "
                                  f"{rules.min_bits}..{rules.max_bits}")
            if name in rules.pinned and b != rules.pinned[name]:
                raise PolicyError(f"layer {name!r} is pinned to {rules.pinned[name]} bits, but the policy gives "
                                  f"{key} = {b}")
        out[name] = {"w_bits": entry["w_bits"], "a_bits": entry["a_bits"]}
    return out


def make(layers: Mapping, costs: list[cost.LayerCost], rules: Rules, produced_by: str, /, **extra) -> dict:
    """A complete policy document: validated bits plus architecture, producer and cost."""
    layers = validate(layers, rules)
    return {"format": FORMAT, "architecture": rules.arch, "produced_by": produced_by,
            **cost.summary(costs, layers), "pinned": dict(rules.pinned), **extra, "layers": layers}


def uniform_layers(rules: Rules, w_bits: int, a_bits: int) -> dict[str, dict[str, int]]:
    """Every layer at WxAy except the pinned ones, which keep their pinned bits."""
    return {name: {"w_bits": rules.pinned.get(name, w_bits), "a_bits": rules.pinned.get(name, a_bits)}
            for name in rules.layers}


def cheapest_layers(rules: Rules) -> dict[str, dict[str, int]]:
    """Every layer at the lowest bits allowed (pinned layers at their pinned bits)."""
    return uniform_layers(rules, rules.min_bits, rules.min_bits)


def smallest_budget_pct(costs: list[cost.LayerCost], cheapest_bitops: float) -> float:
    """The lowest budget, in % of FP32 BitOps at four decimals, that a policy of ``cheapest_bitops`` meets.

    Rounded *up* (and checked the way the budget is checked, in BitOps), so the printed value always passes:
    rounded to nearest it could name a budget a hair below the cheapest policy and fail again."""
    fp32 = cost.fp32_bitops(costs)
    pct = math.ceil(1e4 * 100.0 * cheapest_bitops / fp32) / 1e4
    while pct / 100.0 * fp32 < cheapest_bitops:  # float rounding of the division above
        pct = round(pct + 1e-4, 4)
    return pct


def require_budget(costs: list[cost.LayerCost], cheapest_bitops: float, budget_pct: float, what: str) -> None:
    """The one feasibility check every allocator shares (search, HAWQ): a BudgetError naming the smallest
    achievable budget when even the cheapest policy ``what`` describes exceeds ``budget_pct`` % of FP32 BitOps."""
    if cheapest_bitops > budget_pct / 100.0 * cost.fp32_bitops(costs):
        raise BudgetError(f"a budget of {budget_pct:g}% of FP32 BitOps cannot be met with {what}: the smallest "
                          f"achievable is {smallest_budget_pct(costs, cheapest_bitops):.4f}%")


def uniform_within(costs: list[cost.LayerCost], rules: Rules, budget_pct: float) -> list[str]:
    """The uniform WxAy tags with the most bits within ``budget_pct`` % of FP32 (pinned layers at their bits): the
    largest smaller width min(x, y), then the most BitOps, ties kept (W3A3 at 1.0%; W3A2 and W2A3 at 0.7%; W4A3 and
    W3A4 at 1.5%, not W7A2); none when even the cheapest exceeds the budget."""
    limit = budget_pct / 100.0 * cost.fp32_bitops(costs)
    fits = {(w, a): cost.bitops(costs, uniform_layers(rules, w, a))
            for w in range(rules.min_bits, rules.max_bits + 1) for a in range(rules.min_bits, rules.max_bits + 1)}
    fits = {k: v for k, v in fits.items() if v <= limit}
    if not fits:
        return []
    best = max((min(k), v) for k, v in fits.items())
    return [f"W{w}A{a}" for (w, a), v in sorted(fits.items(), key=lambda kv: (-kv[0][0], -kv[0][1]))
            if (min(w, a), v) == best]


def parse_uniform(tag: str) -> tuple[int, int]:
    """'W4A4' → (4, 4)."""
    m = re.fullmatch(r"[Ww](\d+)[Aa](\d+)", tag)
    if not m:
        raise PolicyError(f"uniform setting {tag!r} is not of the form W<bits>A<bits>, e.g. W4A4")
    return int(m.group(1)), int(m.group(2))


def save(path: str | Path, policy: dict) -> None:
    write_json(path, policy)


def load(path: str | Path, rules: Rules, costs: list[cost.LayerCost]) -> dict:
    """Read and validate a policy file for the architecture ``rules`` describes.

    Its cost fields are recomputed from the traced layers, so a hand-edited file cannot misstate its cost."""
    path = Path(path)
    if not path.exists():
        raise PolicyError(f"policy file not found: {path}")
    try:
        policy = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PolicyError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(policy, dict) or "layers" not in policy:
        raise PolicyError(f"{path} is not a policy (no 'layers')")
    if policy.get("architecture", rules.arch) != rules.arch:
        raise PolicyError(f"{path} is a policy for {policy['architecture']!r}, not {rules.arch!r}")
    standard = {"format", "architecture", "produced_by", "pinned", "layers", *cost.SUMMARY_FIELDS}
    extra = {k: v for k, v in policy.items() if k not in standard}
    try:
        return make(policy["layers"], costs, rules, policy.get("produced_by", "unknown"), **extra)
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc}") from exc


def for_config(config: Mapping) -> tuple[list[cost.LayerCost], Rules]:
    """Traced layers and policy rules of the configured architecture."""
    arch = config["model"]["arch"]
    costs = cost.for_arch(arch)
    return costs, rules_for(arch, costs, config["quant"])


def uniform_policy(config: Mapping, tag: str) -> dict:
    """The uniform WxAy baseline as a policy document (pinned layers keep their bits), with provenance."""
    start = time.perf_counter()
    w, a = parse_uniform(tag)
    costs, rules = for_config(config)
    return make(uniform_layers(rules, w, a), costs, rules, f"uniform {tag.upper()}",
                **provenance(config, torch.device("cpu"), time.perf_counter() - start))
