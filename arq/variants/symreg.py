"""Symmetry regularization (SymReg): a penalty that makes each layer's weight distribution symmetric about zero.

Why: with a symmetric quantizer (arq.quant), a weight distribution that is symmetric about zero keeps the mean of
the quantized weights where the float mean is, so rounding does not shift each output's expectation (the "bias
drift" that propagates through the following layers).

Our reconstruction (the paper's formula was not available): sort a layer's n weights, s_1 ≤ … ≤ s_n. A distribution
symmetric about zero has s_i = −s_{n+1−i}, so the penalty is ‖s + reverse(s)‖² / n, the mean over layers.
``pairing=1`` compares single weights with their mirror images (the paper's L_sym1); ``pairing=2`` compares the sums
of consecutive pairs of sorted weights with their mirror pairs (our reading of its cheaper L_sym2: half as many
terms, each a two-weight average, so single outliers weigh less; the sort is the cost either way). The gradient
flows through the sort to the weights that sit at each rank. Regular convolutions and linear layers only: depthwise
convolutions are exempt, as in the paper (the penalty costs them expressiveness).
"""
from __future__ import annotations

import torch
from torch import nn

PAIRINGS = (1, 2)


def regular_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers SymReg applies to: every linear layer and every convolution that is not depthwise (a depthwise
    convolution has one input channel per group and as many groups as input channels)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out.append((name, m))
        elif isinstance(m, nn.Conv2d) and not (m.groups > 1 and m.groups == m.in_channels):
            out.append((name, m))
    return out


def asymmetry(w: torch.Tensor, pairing: int = 1) -> torch.Tensor:
    """‖s + reverse(s)‖² / n for the sorted weights s (``pairing=1``), or for the sums of consecutive sorted pairs
    (``pairing=2``; an odd weight count leaves the median out, which a symmetric distribution puts at 0)."""
    if pairing not in PAIRINGS:
        raise ValueError(f"symreg pairing must be one of {PAIRINGS}, not {pairing!r}")
    s = w.flatten().sort().values
    n = s.numel()
    if pairing == 2:
        half = n // 2
        low, high = s[:half], s[n - half:]  # the median, for odd n, is compared with itself: left out
        if half % 2:
            low, high = low[:-1], high[1:]
        low = low.view(-1, 2).sum(1)
        high = high.view(-1, 2).sum(1)
        return ((low + high.flip(0)) ** 2).sum() / n
    return ((s + s.flip(0)) ** 2).sum() / n


def penalty(model: nn.Module, pairing: int = 1) -> torch.Tensor:
    """The mean of ``asymmetry`` over the model's regular layers."""
    layers = regular_layers(model)
    if not layers:
        raise ValueError("symreg: the model has no convolution or linear layer to regularize")
    return torch.stack([asymmetry(m.weight, pairing) for _, m in layers]).mean()
