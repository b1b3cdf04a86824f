"""What the benchmarks measure against: a timing helper and the plain Cohen-style sampling loop.

The plain loop is the pattern of Cohen et al.'s ``core.py``: the input repeated into a batch, fresh noise per
batch, float32 in the default (NCHW) layout, and the predictions copied to the host and counted there."""
from __future__ import annotations

import time

import numpy as np
import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, seconds: float, device: torch.device) -> float:
    """Items per second of fn() (which returns how many items it processed), after one warm-up call."""
    fn()
    synchronize(device)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        done += fn()
    synchronize(device)
    return done / (time.perf_counter() - t0)


@torch.inference_mode()
def plain_counts(model: torch.nn.Module, x: torch.Tensor, num: int, sigma: float, batch_size: int,
                 num_classes: int) -> np.ndarray:
    """Class counts of model over ``num`` noisy copies of x, the plain way."""
    counts = np.zeros(num_classes, dtype=np.int64)
    remaining = num
    while remaining > 0:
        b = min(batch_size, remaining)
        batch = x.repeat((b, 1, 1, 1))
        pred = model(batch + torch.randn_like(batch) * sigma).argmax(1)
        counts += np.bincount(pred.cpu().numpy(), minlength=num_classes)
        remaining -= b
    return counts
