"""Throughput of the FP32 backbone on the current device: training images/s and certification samples/s.

Each figure is printed next to a reference run in the same process, so the ratio is meaningful on any
machine: training against a plain loop (host-side augmentation, batches copied to the device each step),
certification sampling against a plain Cohen-style loop (fp32 NCHW, predictions counted on the host).

    python benchmarks/backbone.py [--device cpu|cuda] [--threads 2] [--seconds 10]
"""
from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
import torch.nn.functional as F
from reference import plain_counts, timed

from arq.engine import Engine
from arq.models import build
from arq.smoothing import Smooth
from arq.train import augment


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=256, help="training batch")
    ap.add_argument("--cert-batch", type=int, default=1000, help="noisy samples per forward pass")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sigma = 0.25
    gen = torch.Generator(device=dev).manual_seed(0)
    data = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (4096,))
    data_dev, labels_dev = data.to(dev), labels.to(dev)

    def make_step(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

        def step(x, y):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    ours_step = make_step(build("resnet20").to(dev).train())

    def ours_train() -> int:
        idx = torch.randint(0, len(data_dev), (args.batch,), generator=gen, device=dev)
        x = augment(data_dev[idx], gen)
        ours_step(x + sigma * torch.randn(x.shape, generator=gen, device=dev), labels_dev[idx])
        return args.batch

    plain_step = make_step(build("resnet20").to(dev).train())
    rng = np.random.default_rng(0)

    def plain_train() -> int:  # the usual host-side pipeline: numpy crop/flip, then copy to the device
        idx = rng.integers(0, len(data), args.batch)
        xs = np.pad(data.numpy()[idx], ((0, 0), (0, 0), (4, 4), (4, 4)))
        out = np.empty((args.batch, 3, 32, 32), dtype=np.float32)
        for i, (dy, dx, fl) in enumerate(zip(rng.integers(0, 9, args.batch), rng.integers(0, 9, args.batch),
                                             rng.random(args.batch) < 0.5)):
            crop = xs[i, :, dy:dy + 32, dx:dx + 32]
            out[i] = (crop[:, :, ::-1] if fl else crop) / 255.0
        x = torch.from_numpy(out).to(dev)
        plain_step(x + sigma * torch.randn_like(x), labels[idx].to(dev))
        return args.batch

    model = build("resnet20").to(dev).eval()
    smooth = Smooth(Engine().prepare(copy.deepcopy(model), dev), 10, sigma, args.cert_batch)  # plain stays NCHW
    x0 = torch.rand(3, 32, 32, device=dev)

    def ours_cert() -> int:
        smooth.sample_counts(x0, args.cert_batch * 4, gen)
        return args.cert_batch * 4

    def plain_cert() -> int:
        plain_counts(model, x0, args.cert_batch * 4, sigma, args.cert_batch, 10)
        return args.cert_batch * 4

    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{args.threads} threads'}), "
          f"torch {torch.__version__}")
    for name, ours, plain, unit in (("training", ours_train, plain_train, "img/s"),
                                    ("certification sampling", ours_cert, plain_cert, "samples/s")):
        r_ours, r_plain = timed(ours, args.seconds, dev), timed(plain, args.seconds, dev)
        print(f"{name:24s} ours {r_ours:10.0f} {unit}   plain {r_plain:10.0f} {unit}   ratio {r_ours / r_plain:.2f}×")


if __name__ == "__main__":
    main()
