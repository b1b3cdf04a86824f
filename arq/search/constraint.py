"""The BitOps budget of a search, enforced after an episode's last action as HAQ does.

The agent chooses freely; the environment then walks the layers from last to first, lowering the
activation bits and then the weight bits of each by one, until the policy's BitOps are within the budget.
Pinned layers never move. A budget below the cheapest policy the bit range allows is an error naming it.
"""
from __future__ import annotations

from typing import Mapping

from arq import cost
from arq.policy import Rules, cheapest_layers, require_budget


def enforce_budget(layers: Mapping[str, Mapping[str, int]], costs: list[cost.LayerCost], rules: Rules,
                   budget_pct: float) -> dict[str, dict[str, int]]:
    """A copy of ``layers`` lowered (last layer first, activation before weight bits, one bit per step, pinned
    layers untouched) until its BitOps are at most ``budget_pct`` % of FP32; unchanged if already within it."""
    require_budget(costs, cost.bitops(costs, cheapest_layers(rules)), budget_pct,
                   f"bits {rules.min_bits}..{rules.max_bits} and the pinned layers")
    target = budget_pct / 100.0 * cost.fp32_bitops(costs)
    out = {n: {"w_bits": int(layers[n]["w_bits"]), "a_bits": int(layers[n]["a_bits"])} for n in rules.layers}
    by_name = {c.name: c for c in costs}
    current = cost.bitops(costs, out)
    movable = [n for n in reversed(rules.layers) if n not in rules.pinned]
    while current > target:
        for name in movable:
            for key in ("a_bits", "w_bits"):
                if out[name][key] > rules.min_bits:
                    other = out[name]["w_bits" if key == "a_bits" else "a_bits"]
                    out[name][key] -= 1
                    current -= by_name[name].macs * other
                    if current <= target:
                        return out
    return out
