"""Exact cost model: MACs per layer from a traced forward pass, BitOps = Σ MACs · b_w · b_a.

The shapes come from running the real network once on an input of the real size, so any architecture
(grouped and depthwise convolutions, strides, projections) is counted correctly without a lookup table.
FP32 reference cost is 32 × 32 bit-operations per MAC, so a layer at W4A4 costs 16/1024 = 1/64 of its FP32.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

import torch
from torch import nn

from arq.quant import QUANTIZABLE

FP32_BITS = 32
SUMMARY_FIELDS = ("macs", "bitops", "fp32_bitops", "bitops_pct", "weight_bits", "fp32_weight_bits")


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str  # conv | depthwise | grouped | linear
    macs: int  # multiply-accumulates for one input image
    weights: int  # weight elements (bias excluded: it stays 32-bit and costs no MACs)
    in_shape: tuple[int, ...]  # per image
    out_shape: tuple[int, ...]
    # HAQ's per-layer state features need these
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    groups: int


def _kind(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return "linear"
    if m.groups == 1:
        return "conv"
    return "depthwise" if m.groups == m.in_channels == m.out_channels else "grouped"


def _macs(m: nn.Module, out: torch.Tensor) -> int:
    per_image_outputs = out[0].numel()
    if isinstance(m, nn.Linear):
        return per_image_outputs * m.in_features
    kh, kw = m.kernel_size
    return per_image_outputs * (m.in_channels // m.groups) * kh * kw


@torch.no_grad()
def trace(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerCost]:
    """Every conv/linear layer in the order the forward pass calls it, with its exact MAC count.

    A layer called several times (shared weights) is listed once with the MACs of all its calls."""
    records: dict[str, dict] = {}
    hooks = []

    def hook(name):
        def fn(m, inputs, out):
            rec = records.get(name)
            if rec is None:
                k = m.kernel_size[0] if isinstance(m, nn.Conv2d) else 1
                s = m.stride[0] if isinstance(m, nn.Conv2d) else 1
                records[name] = {"name": name, "kind": _kind(m), "macs": _macs(m, out), "weights": m.weight.numel(),
                                 "in_shape": tuple(inputs[0].shape[1:]), "out_shape": tuple(out.shape[1:]),
                                 "in_channels": m.in_channels if isinstance(m, nn.Conv2d) else m.in_features,
                                 "out_channels": m.weight.shape[0], "kernel": k, "stride": s,
                                 "groups": m.groups if isinstance(m, nn.Conv2d) else 1}
            else:
                rec["macs"] += _macs(m, out)
        return fn

    for name, m in model.named_modules():
        if isinstance(m, QUANTIZABLE):
            hooks.append(m.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x = torch.zeros(1, *input_shape, device=device)
        observing = _pause_activation_quantizers(model)
        try:
            model(x)
        finally:
            _resume_activation_quantizers(observing)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [LayerCost(**r) for r in records.values()]


def _pause_activation_quantizers(model: nn.Module) -> list:
    """Tracing only needs shapes; let (possibly uncalibrated) quantized layers pass activations through."""
    from arq.quant import quantized_layers

    acts = [layer.act for layer in quantized_layers(model).values()]
    for a in acts:
        a.bypass = True
    return acts


def _resume_activation_quantizers(acts: list) -> None:
    for a in acts:
        a.bypass = False


def total_macs(costs: list[LayerCost]) -> int:
    return sum(c.macs for c in costs)


def fp32_bitops(costs: list[LayerCost]) -> int:
    return total_macs(costs) * FP32_BITS * FP32_BITS


def bitops(costs: list[LayerCost], layers: Mapping[str, Mapping[str, int]]) -> int:
    """Σ MACs · b_w · b_a over the traced layers; every traced layer must have bits in ``layers``."""
    return sum(c.macs * int(layers[c.name]["w_bits"]) * int(layers[c.name]["a_bits"]) for c in costs)


def bitops_pct(costs: list[LayerCost], layers: Mapping[str, Mapping[str, int]]) -> float:
    return 100.0 * bitops(costs, layers) / fp32_bitops(costs)


def weight_bits(costs: list[LayerCost], layers: Mapping[str, Mapping[str, int]]) -> int:
    """Storage of the quantized weights in bits (per-channel scales and 32-bit biases not counted)."""
    return sum(c.weights * int(layers[c.name]["w_bits"]) for c in costs)


def summary(costs: list[LayerCost], layers: Mapping[str, Mapping[str, int]]) -> dict:
    """The cost fields a policy carries."""
    return {"macs": total_macs(costs), "bitops": bitops(costs, layers), "fp32_bitops": fp32_bitops(costs),
            "bitops_pct": round(bitops_pct(costs, layers), 6), "weight_bits": weight_bits(costs, layers),
            "fp32_weight_bits": sum(c.weights for c in costs) * FP32_BITS}


def for_arch(arch: str) -> list[LayerCost]:
    """Trace a freshly built ``arch`` at its input size (the weights do not change the cost). Traced once per
    process: the layout, the cost estimate and every report row ask for it (the layers are frozen; the list is a
    fresh copy)."""
    return list(_traced(arch))


@lru_cache(maxsize=None)
def _traced(arch: str) -> tuple[LayerCost, ...]:
    from arq import models

    return tuple(trace(models.build(arch), models.INPUT_SHAPES[arch]))
