"""Fake quantization with a straight-through estimator, applied to any network by module name.

Weights: symmetric, one scale per output channel (from max |w| of the channel, or the clip minimising the
channel's quantization MSE: ``quant.weight_clip``), integer codes in
[-(2^(b-1)-1), 2^(b-1)-1] so the range is exactly symmetric and zero is exact. Activations: one scale per
tensor, quantizing each layer's *input*; unsigned codes [0, 2^b-1] when the calibration data never went
below zero (the input comes from a ReLU), signed codes otherwise. The clipping range is set by calibration
(MSE-optimal over the observed values) and, when learned, trained afterwards as an LSQ step size.

Every nn.Conv2d and nn.Linear is a quantizable layer (depthwise and grouped convolutions included), so the
policy (layer name → bits) is all a method needs to produce; no model code is edited. BatchNorm stays
unfolded: the network as executed (and certified) is exactly this fake-quantized one.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZABLE = (nn.Conv2d, nn.Linear)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator).

    Without autograd it is a plain (exact) round: inference pays for one op, not three."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x.round()
    return (x.round() - x).detach() + x


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Same value, gradient multiplied by ``scale`` (LSQ's step-size gradient scaling)."""
    return (x - x * scale).detach() + x * scale


def signed_max(bits: int) -> int:
    return 2 ** (bits - 1) - 1


WEIGHT_CLIPS = ("max", "mse")
MSE_GRID = 12  # candidates per stage: k/12 of the channel's max |w|, then 12 around the best (resolution ~1/66)


def _channel_errors(flat: torch.Tensor, clips: torch.Tensor, q: int) -> torch.Tensor:
    """Squared quantization error of each channel (rows of ``flat``) at each candidate clip: [candidates, C]."""
    steps = (clips / q)[:, :, None]
    return ((torch.clamp(torch.round(flat[None] / steps), -q, q) * steps - flat[None]) ** 2).sum(2)


def mse_weight_clip(w: torch.Tensor, bits: int, grid: int = MSE_GRID) -> torch.Tensor:
    """Per-output-channel clip in (0, max |w|] minimising the channel's squared quantization error.

    At 2–3 bits the max clip wastes most codes on rare large weights (on Gaussian weights W2 has relative
    MSE .715 at the max clip, about .19 at the best one). A coarse grid of ``grid`` fractions of the channel's
    max, then ``grid`` finer ones around the best, costs 2·grid error evaluations per weight: this runs at every
    training step, so it is kept cheap (RESULTS.md 'Weight clip' has the timing)."""
    flat = w.detach().flatten(1)
    amax = flat.abs().amax(1).clamp_min(1e-8)
    q = signed_max(bits)
    coarse = torch.arange(1, grid + 1, device=w.device, dtype=flat.dtype) / grid  # fractions of amax
    best = coarse[_channel_errors(flat, coarse[:, None] * amax[None], q).argmin(0)]  # [C]
    offsets = torch.linspace(-1.0, 1.0, grid, device=w.device, dtype=flat.dtype) / grid
    fine = (best[None] + offsets[:, None]).clamp(1.0 / (grid * grid), 1.0)  # [grid, C]
    candidates = torch.cat([best[None], fine]) * amax[None]
    return candidates.gather(0, _channel_errors(flat, candidates, q).argmin(0, keepdim=True))[0]


def weight_scale(w: torch.Tensor, bits: int, clip: str = "max") -> torch.Tensor:
    """Per-output-channel step: the channel's clip (its max |w|, or the MSE-best clip) over the largest code,
    shaped to broadcast with w."""
    if clip == "mse":
        amax = mse_weight_clip(w, bits)
    elif clip == "max":
        amax = w.detach().abs().flatten(1).amax(1).clamp_min(1e-8)
    else:
        raise ValueError(f"weight clip must be one of {WEIGHT_CLIPS}, not {clip!r}")
    return (amax / signed_max(bits)).view(-1, *([1] * (w.dim() - 1)))


def weight_codes(w: torch.Tensor, bits: int, clip: str = "max") -> torch.Tensor:
    """Integer codes of the quantized weight (what integer hardware would store)."""
    q = signed_max(bits)
    return torch.clamp(torch.round(w / weight_scale(w, bits, clip)), -q, q).to(torch.int32)


def quantize_weight(w: torch.Tensor, bits: int, clip: str = "max") -> torch.Tensor:
    """Fake-quantized weight; gradients pass straight through to the FP32 weight (clipped ones too)."""
    s = weight_scale(w, bits, clip)
    q = signed_max(bits)
    quantized = torch.clamp(torch.round(w / s), -q, q) * s
    if not (torch.is_grad_enabled() and w.requires_grad):
        return quantized
    # the whole difference is detached, so every element (the channel's max too, which sits on the clamp
    # bound) gets gradient exactly 1
    return w + (quantized - w).detach()


def activation_levels(bits: int, signed: bool) -> tuple[int, int]:
    return (-signed_max(bits), signed_max(bits)) if signed else (0, 2 ** bits - 1)


def mse_clip(values: torch.Tensor, amax: float, bits: int, signed: bool, grid: int = 100) -> float:
    """Clipping value in (0, amax] minimising the mean squared quantization error of ``values``."""
    lo, hi = activation_levels(bits, signed)
    if amax <= 0:
        return 1e-8
    candidates = torch.linspace(amax / grid, amax, grid, dtype=torch.float64)
    x = values.double().flatten()
    errors = []
    for c in candidates:
        s = c / hi
        errors.append(((torch.clamp(torch.round(x / s), lo, hi) * s - x) ** 2).mean())
    return float(candidates[int(torch.stack(errors).argmin())])


class ActQuantizer(nn.Module):
    """Per-tensor activation fake quantizer. ``clip`` is the largest representable magnitude.

    Before calibration it refuses to run (an uncalibrated range would silently destroy accuracy); during
    calibration it passes inputs through and records their range and a subsample of their values."""

    SAMPLE_PER_BATCH = 1 << 14
    SAMPLE_CAP = 1 << 20

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.clip = nn.Parameter(torch.tensor(1.0))
        self.signed = False  # Python flags, not buffers: reading them never synchronises a GPU
        self.calibrated = False
        self.bypass = False  # pass inputs through unchanged (shape tracing)
        self._observed: dict | None = None

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, calibrated={self.calibrated}"

    def get_extra_state(self) -> dict:  # saved in the state_dict beside ``clip``
        return {"bits": self.bits, "signed": self.signed, "calibrated": self.calibrated}

    def set_extra_state(self, state: dict) -> None:
        if state["bits"] != self.bits:
            raise RuntimeError(f"activation quantizer state is for {state['bits']} bits, the layer has {self.bits}")
        self.signed, self.calibrated = bool(state["signed"]), bool(state["calibrated"])

    # --- calibration
    def start_observing(self) -> None:
        self._observed = {"min": math.inf, "amax": 0.0, "samples": [], "count": 0}

    def observe(self, x: torch.Tensor) -> None:
        o = self._observed
        flat = x.detach().flatten()
        o["min"] = min(o["min"], float(flat.min()))
        o["amax"] = max(o["amax"], float(flat.abs().max()))
        if o["count"] < self.SAMPLE_CAP:
            k = min(self.SAMPLE_PER_BATCH, flat.numel())
            idx = torch.randint(flat.numel(), (k,), device=flat.device,
                                generator=torch.Generator(flat.device).manual_seed(o["count"]))
            o["samples"].append(flat[idx].float().cpu())
            o["count"] += k

    def finish_observing(self, method: str) -> None:
        o, self._observed = self._observed, None
        if o is None or not o["samples"]:
            raise RuntimeError("activation quantizer saw no data during calibration (is the layer ever called?)")
        signed = o["min"] < 0
        values = torch.cat(o["samples"])
        clip = o["amax"] if method == "max" else mse_clip(values, o["amax"], self.bits, signed)
        with torch.no_grad():
            self.clip.fill_(max(clip, 1e-8))
        self.signed, self.calibrated = signed, True

    # --- quantization
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return x
        if self._observed is not None:
            self.observe(x)
            return x
        if not self.calibrated:
            raise RuntimeError("activation quantizer used before calibration; run arq.quant.calibrate first")
        lo, hi = activation_levels(self.bits, self.signed)
        if not torch.is_grad_enabled():  # inference (certification): one new tensor, in-place ops after it
            s = self.clip.abs().clamp_min(1e-8) / hi
            return torch.div(x, s).clamp_(lo, hi).round_().mul_(s)
        clip = self.clip.abs().clamp_min(1e-8)
        if self.training and self.clip.requires_grad:
            # LSQ scales the step's gradient by 1/sqrt(N·hi); the parameter is clip = hi·step, so an SGD step
            # on clip moves the step 1/hi² as far: scale by hi² more to train the step as LSQ does
            clip = grad_scale(clip, hi * hi / math.sqrt(x[0].numel() * hi))
        s = clip / hi
        return round_ste(torch.clamp(x / s, lo, hi)) * s


class _QuantLayer:
    """Shared behaviour of the quantized conv and linear layers: fake-quantized weight and input.

    In inference (no autograd) the quantized weight is computed once and reused until the weight changes,
    so certification pays the weight quantization once, not per batch."""

    w_bits: int
    a_bits: int
    weight_clip: str

    def _init_quant(self, w_bits: int, a_bits: int, weight_clip: str = "max") -> None:
        if weight_clip not in WEIGHT_CLIPS:
            raise ValueError(f"weight clip must be one of {WEIGHT_CLIPS}, not {weight_clip!r}")
        self.w_bits, self.a_bits, self.weight_clip = w_bits, a_bits, weight_clip
        self.act = ActQuantizer(a_bits)
        self._wcache: tuple | None = None

    def quantized_weight(self) -> torch.Tensor:
        w = self.weight
        if torch.compiler.is_compiling():  # traced: frozen weights let the compiler fold this into a constant
            return quantize_weight(w, self.w_bits, self.weight_clip)
        if torch.is_grad_enabled():
            self._wcache = None
            return quantize_weight(w, self.w_bits, self.weight_clip)
        version = -1 if w.is_inference() else w._version  # inference tensors keep no version counter
        key = (w.data_ptr(), version, w.device, w.dtype, w.stride())
        if self._wcache is None or self._wcache[0] != key:
            self._wcache = (key, quantize_weight(w, self.w_bits, self.weight_clip))
        return self._wcache[1]


class QuantConv2d(_QuantLayer, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.act(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", w_bits={self.w_bits}, a_bits={self.a_bits}, weight_clip={self.weight_clip}"


class QuantLinear(_QuantLayer, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", w_bits={self.w_bits}, a_bits={self.a_bits}, weight_clip={self.weight_clip}"


def _quantized_copy(layer: nn.Module, w_bits: int, a_bits: int, weight_clip: str) -> nn.Module:
    """A quantized layer sharing ``layer``'s parameters (the weights are not copied)."""
    if isinstance(layer, nn.Conv2d):
        q = QuantConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                        layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, device="meta")
    else:
        q = QuantLinear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
    q.weight = layer.weight
    q.bias = layer.bias
    q._init_quant(w_bits, a_bits, weight_clip)
    q.act.to(layer.weight.device)
    q.train(layer.training)
    return q


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of every conv and linear layer (definition order), already quantized or not."""
    return [name for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def quantized_layers(model: nn.Module) -> dict[str, _QuantLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _QuantLayer)}


def apply_policy(model: nn.Module, layers: Mapping[str, Mapping[str, int]], weight_clip: str = "max") -> nn.Module:
    """Replace each named layer by its fake-quantized version with the given bits (in place; returns model).

    The policy must already be validated (arq.policy.validate) against this model's layers."""
    if weight_clip not in WEIGHT_CLIPS:
        raise ValueError(f"weight clip must be one of {WEIGHT_CLIPS}, not {weight_clip!r}")
    for name, bits in layers.items():
        layer = model.get_submodule(name)
        if isinstance(layer, _QuantLayer):
            layer.w_bits, layer.a_bits, layer.act.bits = int(bits["w_bits"]), int(bits["a_bits"]), int(bits["a_bits"])
            layer.weight_clip = weight_clip
            layer._wcache = None
            layer.act.calibrated = False  # a new bit-width needs a new range
            continue
        if not isinstance(layer, QUANTIZABLE):
            raise TypeError(f"layer {name!r} is a {type(layer).__name__}, not a Conv2d or Linear")
        q = _quantized_copy(layer, int(bits["w_bits"]), int(bits["a_bits"]), weight_clip)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    return model


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], method: str = "mse") -> dict[str, dict]:
    """Set every activation quantizer's range from the inputs its layer sees on ``batches``.

    Runs in eval mode (BatchNorm uses its running statistics) with quantized weights and unquantized
    activations. Returns {layer: {clip, signed}} for the log."""
    if method not in ("mse", "max"):
        raise ValueError(f"unknown calibration method {method!r} (mse or max)")
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no quantized layers; apply a policy first")
    was_training = model.training
    model.eval()
    for layer in layers.values():
        layer.act.start_observing()
    try:
        for x in batches:
            model(x)
        for layer in layers.values():
            layer.act.finish_observing(method)
    finally:
        for layer in layers.values():
            layer.act._observed = None
        model.train(was_training)
    return {name: {"clip": float(layer.act.clip), "signed": layer.act.signed} for name, layer in layers.items()}


def set_clip_learning(model: nn.Module, learn: bool) -> None:
    """Learned clipping trains each activation range with the network; calibrated keeps it fixed."""
    for layer in quantized_layers(model).values():
        layer.act.clip.requires_grad_(learn)
