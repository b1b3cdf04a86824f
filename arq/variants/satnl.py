"""Saturating nonlinearity (SatNL): each quantizable layer's weight trained through a bounded odd function.

Why: a quantizer's range is set by the largest weights; bounding them narrows the range, so the grid spends its
levels where most weights are and small weights keep their resolution (less clipping and rounding mismatch between
the float and the quantized network).

Our reconstruction (the paper names tanh; its exact form was not available): the layer keeps a latent tensor v (in
weight units) and a learned positive bound α (one per output channel, or one per layer), and its weight is
w = α · tanh(v / α). The weight is odd in v, bounded by α, and its slope in v is 1 at 0 and falls with |v|: small
weights train as plain ones do (w = α·tanh(v) instead would scale every step by α², measured as a much slower start),
large latent values saturate instead of widening the range. At the start w equals the initial weights:
α = max |w₀| of its channel (or layer) times ``headroom``, and v = α · atanh(w₀ / α). ``export`` replaces the
parametrization by the weight it computes, so the trained network is an ordinary one and gives the same logits.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from arq.quant import QUANTIZABLE

SCALES = ("channel", "layer")


class Saturate(nn.Module):
    """The parametrization w = α · tanh(v / α), with the bound stored as log α (so it stays positive)."""

    def __init__(self, w0: torch.Tensor, scale: str, headroom: float):
        super().__init__()
        if scale not in SCALES:
            raise ValueError(f"satnl scale must be one of {SCALES}, not {scale!r}")
        if headroom <= 1:
            raise ValueError(f"satnl headroom must exceed 1 (the initial weights must lie inside the bound), not {headroom}")
        amax = w0.detach().abs().flatten(1).amax(1) if scale == "channel" else w0.detach().abs().amax().view(1)
        shape = (-1,) + (1,) * (w0.dim() - 1) if scale == "channel" else (1,) * w0.dim()
        self.log_alpha = nn.Parameter((amax.clamp_min(1e-8) * headroom).log().view(shape))

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp()

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha
        return alpha * torch.tanh(v / alpha)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        """The latent v that gives ``w`` (parametrize calls it when the parametrization is registered)."""
        alpha = self.alpha
        return alpha * torch.atanh((w / alpha).clamp(-1 + 1e-6, 1 - 1e-6))


def attach(model: nn.Module, scale: str = "channel", headroom: float = 1.5) -> list[str]:
    """Reparametrize the weight of every quantizable layer (arq.quant.QUANTIZABLE); returns their names."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, QUANTIZABLE) and not parametrize.is_parametrized(m, "weight"):
            parametrize.register_parametrization(m, "weight", Saturate(m.weight, scale, headroom))
            names.append(name)
    if not names:
        raise ValueError("satnl: the model has no quantizable layer")
    return names


def attached(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if parametrize.is_parametrized(m, "weight")
            and any(isinstance(p, Saturate) for p in m.parametrizations.weight)]


def bounds(model: nn.Module) -> dict[str, tuple[float, float]]:
    """Per layer: (max |w| of the effective weight, the largest α): the first never exceeds the second."""
    out = {}
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            sat = next(p for p in m.parametrizations.weight if isinstance(p, Saturate))
            out[name] = (float(m.weight.detach().abs().max()), float(sat.alpha.detach().max()))
    return out


def export(model: nn.Module) -> nn.Module:
    """Replace every SatNL parametrization by the weight it computes (in place): an ordinary network."""
    for m in attached(model):
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model
