"""HAQ's per-layer observation, from the traced cost model: ten features, min–max normalised over layers.

Static (per layer): depthwise flag, c_in, c_out, stride, kernel, #weights, input H·W, layer index.
Dynamic (per step): the previous step's bits as a fraction of the widest, and whether this step picks weight
bits (1) or activation bits (0). A static column whose value is the same for every layer is 0 (HAQ leaves it
raw, which feeds the network an unscaled constant).
"""
from __future__ import annotations

import numpy as np

from arq.cost import LayerCost

FEATURES = ("depthwise", "c_in", "c_out", "stride", "kernel", "weights", "input_hw", "index", "prev_bits",
            "is_weight_step")


def raw_static(costs: list[LayerCost]) -> np.ndarray:
    """The eight static features of each layer, unnormalised: [layers, 8]."""
    rows = []
    for i, c in enumerate(costs):
        linear = c.kind == "linear"
        input_hw = c.in_channels if linear else int(np.prod(c.in_shape[1:]))  # HAQ: in_features·1 for an FC
        rows.append([float(c.kind == "depthwise"), c.in_channels, c.out_channels, 0 if linear else c.stride,
                     1 if linear else c.kernel, c.weights, input_hw, i])
    return np.asarray(rows, dtype=np.float64)


def normalise(table: np.ndarray) -> np.ndarray:
    """Per-column min–max scaling to [0, 1]; constant columns become 0."""
    lo, hi = table.min(0), table.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return np.where(hi > lo, (table - lo) / span, 0.0)


def static_features(costs: list[LayerCost]) -> np.ndarray:
    """Normalised static features of every traced layer (the index column counts all of them)."""
    return normalise(raw_static(costs)).astype(np.float32)
