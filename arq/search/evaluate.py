"""Episode evaluation: a policy in, its reward out, in process and without touching the FP32 model.

Every episode quantizes a *copy* of the FP32 model with the policy, calibrates its activation ranges on noisy
training images, finetunes it for a few QAT steps under noise σ, optionally re-estimates its BatchNorm statistics
on noisy training images (``search.finetune.bn_images``), and scores it on the search's **val** images (never the
test split). Which of these settings make the reward rank policies as the final finetune does is measured by
``benchmarks/proxy_outcome.py`` (README *Search*). Calibration and finetune draw the same noise and batches in
every episode (common random numbers), so two policies differ in reward only through their bits.

Rewards (the search method picks one):
- ``arq``: λ·(ACR_q − ACR_fp) with ACR_q from incremental certification (IRS) against the FP32 model's cache of
  the same val images and ACR_fp from that cache; with ``search.certifier: cohen`` ACR_q comes instead from
  Cohen's CERTIFY at the same sample count (n_p) and confidence on the same images (the fidelity study).
- ``haq``: 0.1·(top-1_q − top-1_fp) in percentage points on clean val images (HAQ's reward), on its own
  class-balanced val set of ``search.haq_images`` (HAQ's code scores on 10,000 val images; a 50-image set moves
  in 2-point steps).
"""
from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from arq import quant, rng
from arq.certify import image_generator
from arq.data import Split, to_unit
from arq.engine import Engine
from arq.irs import Cache, acr, cached_acr, certify_incremental
from arq.smoothing import Smooth
from arq.train import calibration_batches, qat_steps, reestimate_bn


@torch.inference_mode()
def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Clean top-1 accuracy in percent."""
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return 100.0 * correct / len(x)


class EpisodeEvaluator:
    """Callable ``(layers) -> (reward, info)`` for QuantizationEnv."""

    def __init__(self, fp32: nn.Module, config: dict, sigma: float, train: Split, val: Split, num_classes: int,
                 device: torch.device, reward: str, seed: int, cache: Cache | None = None):
        sc = config["search"]
        self.config, self.sigma, self.device, self.num_classes, self.seed = config, sigma, device, num_classes, seed
        self.fp32 = fp32.to(device).eval()
        if reward not in ("arq", "haq"):
            raise ValueError(f"unknown reward {reward!r} (arq or haq)")
        self.reward_kind, self.certifier = reward, sc["certifier"]
        self.ft = sc["finetune"]
        self.train = Split(train.x.to(device), train.y.to(device))
        self.engine = Engine.from_config(config)
        self.cache = cache
        self.x_val, self.y_val = to_unit(val.x).to(device), val.y.to(device)
        if self.reward_kind == "arq":
            if cache is None:
                raise ValueError("the arq reward needs the FP32 model's IRS cache of the val images")
            self.reference = cached_acr(cache)
        else:
            self.reference = top1(self.fp32, self.x_val, self.y_val)

    def quantize(self, layers: dict) -> tuple[nn.Module, dict]:
        """The finetuned quantized copy the reward is computed on, and the seconds each phase took."""
        qc, seed = self.config["quant"], self.seed
        seconds = {}
        t0 = time.perf_counter()
        model = quant.apply_policy(copy.deepcopy(self.fp32), layers, qc["weight_clip"])
        quant.calibrate(model, calibration_batches(self.train, self.sigma, qc["calibration"]["images"],
                                                   self.ft["batch_size"], seed, self.device, "search-calibrate"),
                        qc["calibration"]["method"])
        quant.set_clip_learning(model, qc["act_clip"] == "learned")
        seconds["calibrate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        qat_steps(model, self.train, self.sigma, self.ft["steps"], self.ft["batch_size"], self.ft["lr"],
                  self.ft["momentum"], self.ft["weight_decay"], rng.generator("search-finetune", seed,
                                                                              device=self.device),
                  self.fp32 if self.ft["distill"] else None)
        if self.ft["bn_images"]:
            reestimate_bn(model, calibration_batches(self.train, self.sigma, self.ft["bn_images"],
                                                     self.ft["batch_size"], seed, self.device, "search-bn"))
        seconds["finetune"] = time.perf_counter() - t0
        return model, seconds

    def score(self, model: nn.Module) -> tuple[float, dict[str, Any]]:
        sc = self.config["search"]
        if self.reward_kind == "haq":
            acc = top1(model, self.x_val, self.y_val)
            return 0.1 * (acc - self.reference), {"top1": acc, "top1_fp32": self.reference}
        ic = self.config["irs"]
        run = self.engine.prepare(model, self.device)
        if self.certifier == "irs":
            results, _ = certify_incremental(run, self.cache, self.x_val, ic["n_p"], ic["alpha_zeta"], ic["gamma"],
                                             ic["chunks_per_batch"], zeta_counts=ic["zeta_counts"])
            value = acr(results, self.cache.labels)
        else:
            value = cohen_acr(run, self.x_val, self.y_val, self.cache.idx.tolist(), self.num_classes, ic["n0"],
                              ic["n_p"], ic["alpha"] + ic["alpha_zeta"], self.seed, self.sigma)
        return sc["arq_lambda"] * (value - self.reference), {"acr": value, "acr_fp32": self.reference}

    def __call__(self, layers: dict) -> tuple[float, dict[str, Any]]:
        model, seconds = self.quantize(layers)
        t0 = time.perf_counter()
        reward, info = self.score(model)
        seconds["reward"] = time.perf_counter() - t0
        return reward, {**info, "seconds": seconds}


def cohen_acr(model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: list[int], num_classes: int, n0: int, n: int,
              alpha: float, seed: int, sigma: float) -> float:
    """ACR of Cohen's CERTIFY with (n0, n, α) on images x (their dataset indices ``idx`` seed the noise)."""
    smooth = Smooth(model, num_classes, sigma, batch_size=1000)
    total = 0.0
    for i in range(len(x)):
        cert = smooth.certify(x[i], n0, n, alpha, image_generator(seed, idx[i], x.device, "search-cohen"))
        total += cert.radius * (cert.prediction == int(y[i]))
    return total / max(len(x), 1)
