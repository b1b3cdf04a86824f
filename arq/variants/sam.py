"""Sharpness-aware minimization (SAM, Foret et al. 2021) and its adaptive form (ASAM, Kwon et al. 2021), which the
robust-quantization paper combines with SatNL: a flat minimum keeps its loss when quantization moves the weights.

One step: the gradient g at w; the ascent to w + e with e = ρ·g/‖g‖ (SAM) or e = ρ·T²g/‖Tg‖ with T = |w| element-wise
(ASAM, scale-invariant); the gradient there; back to w; the optimizer steps with that second gradient. Twice the
forward and backward passes of a plain step.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def _ascent(params: list[torch.nn.Parameter], rho: float, adaptive: bool) -> list[torch.Tensor]:
    grads = [(p.abs() * p.grad if adaptive else p.grad) for p in params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).clamp_min(1e-12)
    steps = []
    for p, g in zip(params, grads):
        e = rho * (p.abs() * g if adaptive else g) / norm
        p.add_(e)
        steps.append(e)
    return steps


def step(params: list[torch.nn.Parameter], closure, optimizer, rho: float, adaptive: bool) -> torch.Tensor:
    """One (A)SAM step. ``closure()`` zeroes nothing: it computes the loss and calls backward, returning the loss.
    Returns the loss at w (the first pass)."""
    optimizer.zero_grad(set_to_none=True)
    loss = closure()
    live = [p for p in params if p.grad is not None]
    steps = _ascent(live, rho, adaptive)
    optimizer.zero_grad(set_to_none=True)
    closure()
    with torch.no_grad():
        for p, e in zip(live, steps):
            p.sub_(e)
    optimizer.step()
    return loss
