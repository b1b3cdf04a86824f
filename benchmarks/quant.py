"""Inference overhead of the fake-quantized network against the same FP32 network, in one process.

Certification runs the quantized model on hundreds of thousands of noisy samples per image, so the cost that
matters is a forward pass over a large batch. Weights are quantized once and cached in inference mode (never
per batch or per sample); activations are quantized per tensor inside each layer. The ratio printed is
fake-quantized samples/s divided by FP32 samples/s at the same batch size; the same ratio is shown with the
weight cache disabled to show what caching saves.

    python benchmarks/quant.py [--arch resnet20] [--device cpu|cuda] [--threads 2] [--seconds 5]
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from arq import cost, models, policy, quant


def rate(model, x: torch.Tensor, seconds: float) -> float:
    """Samples per second of model(x) under inference mode, after one warm-up call."""
    with torch.inference_mode():
        model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(x)
            done += len(x)
        if x.is_cuda:
            torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


@contextlib.contextmanager
def weight_cache_disabled(model):
    """Force the per-call weight quantization path (what the model would cost without the cache)."""
    layers = quant.quantized_layers(model).values()
    saved = {id(m): m.quantized_weight for m in layers}
    for m in layers:
        m.quantized_weight = (lambda m=m: quant.quantize_weight(m.weight, m.w_bits, m.weight_clip))
    try:
        yield
    finally:
        for m in layers:
            m.quantized_weight = saved[id(m)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet20", choices=sorted(models.ARCHITECTURES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default: 256 1000 (CPU), 1000 10000 (GPU)")
    ap.add_argument("--bits", nargs="+", default=["W8A8", "W4A4"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    batches = args.batches or ([1000, 10000] if dev.type == "cuda" else [256, 1000])
    shape = models.INPUT_SHAPES[args.arch]
    quant_config = {"min_bits": 2, "max_bits": 8, "pin_first_last": True, "pinned_bits": 8}
    torch.manual_seed(0)
    fp32 = models.build(args.arch).to(dev).eval()
    costs = cost.for_arch(args.arch)
    rules = policy.rules_for(args.arch, costs, quant_config)

    print(f"{args.arch} on {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{args.threads} threads'}),"
          f" torch {torch.__version__}")
    for tag in args.bits:
        q = models.build(args.arch).to(dev)
        q.load_state_dict(fp32.state_dict())
        quant.apply_policy(q, policy.uniform_layers(rules, *policy.parse_uniform(tag)))
        quant.calibrate(q, [torch.rand(32, *shape, device=dev)])
        q.eval()
        for b in batches:
            x = torch.rand(b, *shape, device=dev)
            r_fp = rate(fp32, x, args.seconds)
            r_q = rate(q, x, args.seconds)
            with weight_cache_disabled(q):
                r_nc = rate(q, x, args.seconds)
            print(f"{tag} batch {b:6d}: fp32 {r_fp:10.0f}/s  fake-quant {r_q:10.0f}/s  ratio {r_q / r_fp:.2f}×  "
                  f"(without weight cache {r_nc:10.0f}/s, {r_nc / r_fp:.2f}×)")


if __name__ == "__main__":
    main()
