"""Does streaming an ImageFolder tree keep the device busy? The loader's images/s against the model's.

Two ratios, each from runs in the same process:

- training: images/s of the DataLoader alone (JPEG decode, random-resized crop, flip, in ``--workers`` processes)
  against the network's training steps/s × batch on the current device, fed a tensor already there. A ratio
  above 1 means the loader is not the bottleneck of base training or the finetune;
- certification: images/s of the evaluation loader (resize, centre crop) against images/s of CERTIFY at the
  given N, where one decoded image serves all its N0 + N noisy samples.

The tree is generated (random JPEGs of ``--pixels`` pixels on a side, about ImageNet's mean size by default) unless
``--tree`` names a real one (its train/ and val/ folders).

    python benchmarks/streaming.py [--arch resnet50] [--size 224] [--workers 2] [--device cpu|cuda] [--seconds 10]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from reference import synchronize, timed

from arq import imagefolder
from arq.engine import Engine
from arq.models import build
from arq.smoothing import Smooth


def loader_rate(split: imagefolder.FolderSplit, batch: int, train: bool, seconds: float) -> float:
    """Images/s of the loader alone, over whole passes of ``split`` until ``seconds`` have gone (workers started
    once per pass, as a stage's epoch does)."""
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for x, _ in split.loader(batch, train=train, seed=done):
            done += len(x)
            if time.perf_counter() - t0 >= seconds:
                break
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet50", choices=("resnet50", "mobilenet_v2"))
    ap.add_argument("--size", type=int, default=224, help="crop size")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    ap.add_argument("--batch", type=int, default=64, help="training batch")
    ap.add_argument("--n", type=int, default=1000, help="certification samples per image (N0 = N/10)")
    ap.add_argument("--cert-batch", type=int, default=200, help="noisy samples per forward pass")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--tree", default=None, help="an ImageFolder tree to read (default: a generated one)")
    ap.add_argument("--pixels", type=int, default=400, help="side of the generated JPEGs (ImageNet's mean ~400)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.tree) if args.tree else imagefolder.write_tree(
            Path(scratch) / "tree", [f"n{i:08d}" for i in range(4)], {"train": 64, "val": 16}, args.pixels)
        tree = imagefolder.scan(root, log=lambda *_: None)
        train = imagefolder.FolderSplit(root, tree.files["train"], args.size, args.workers)
        val = imagefolder.FolderSplit(root, tree.files["val"], args.size, args.workers)
        load_train = loader_rate(train, args.batch, True, args.seconds)
        load_eval = loader_rate(val, args.batch, False, args.seconds)

    model = build(args.arch).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(args.batch, 3, args.size, args.size, device=dev)
    y = torch.randint(0, 1000, (args.batch,), device=dev)

    def step() -> int:
        loss = F.cross_entropy(model(x + 0.5 * torch.randn_like(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return args.batch

    train_rate = timed(step, args.seconds, dev)
    smooth = Smooth(Engine().prepare(build(args.arch), dev), 1000, 0.5, args.cert_batch)
    image = torch.rand(3, args.size, args.size)
    gen = torch.Generator(device=dev).manual_seed(0)

    def certify_one() -> int:
        smooth.certify(image, args.n // 10, args.n, 0.001, gen)
        return 1

    synchronize(dev)
    cert_rate = timed(certify_one, args.seconds, dev)
    print(f"{args.arch} at {args.size}px on {dev} ({args.threads} threads), loader with {args.workers} workers")
    print(f"training:      loader {load_train:8.1f} img/s   model {train_rate:8.1f} img/s   "
          f"loader/model {load_train / train_rate:6.2f}×")
    print(f"certification: loader {load_eval:8.1f} img/s   CERTIFY (N={args.n}) {cert_rate:8.3f} img/s   "
          f"loader/model {load_eval / cert_rate:8.1f}×")


if __name__ == "__main__":
    main()
