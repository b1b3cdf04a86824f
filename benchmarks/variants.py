"""Training-step cost of the robust base variants against the plain base, in one process.

Each variant runs the training loop's own step (arq.train.run_epochs' objective step: cross-entropy, SymReg's
penalty, SatNL's parametrized weights, (A)SAM) on the same batches of random images; the variants take turns in
rounds so that a slower or busier machine slows them all alike. Printed: images/s of each and its time per step
as a ratio of the plain step's. The issue's target is SymReg within ~10% of the plain step.

    python benchmarks/variants.py [--device cpu|cuda] [--threads 2] [--batch 256] [--steps 10] [--rounds 3]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from arq import models
from arq.variants.training import Objective

VARIANTS = {  # name: (symreg, satnl, sam)
    "plain": (None, None, None),
    "symreg (pairing 1)": ({"weight": 100.0, "pairing": 1}, None, None),
    "symreg (pairing 2)": ({"weight": 100.0, "pairing": 2}, None, None),
    "satnl": (None, {"scale": "channel", "headroom": 1.5}, None),
    "symreg + satnl": ({"weight": 100.0, "pairing": 1}, {"scale": "channel", "headroom": 1.5}, None),
    "symreg + satnl + ASAM": ({"weight": 100.0, "pairing": 1}, {"scale": "channel", "headroom": 1.5},
                              {"rho": 0.05, "adaptive": True}),
}


def setup(name: str, device: torch.device):
    torch.manual_seed(0)
    model = models.build("resnet20").to(device)
    symreg, satnl, sam = VARIANTS[name]
    objective = None if name == "plain" else Objective(symreg, satnl, sam)
    if objective is not None:
        objective.prepare(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    return model, objective, opt, [p for p in model.parameters() if p.requires_grad]


def steps(model, objective, opt, params, x, y, n: int, device: torch.device) -> float:
    """Seconds for n training steps (after the caller's warm-up)."""
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        if objective is None:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            objective.step(model, params, opt, x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    runs = {name: setup(name, device) for name in VARIANTS}
    for name, run in runs.items():
        steps(*run, x, y, 2, device)  # warm-up
    seconds = {name: 0.0 for name in VARIANTS}
    for _ in range(args.rounds):
        for name, run in runs.items():
            seconds[name] += steps(*run, x, y, args.steps, device)
    n = args.rounds * args.steps
    print(f"ResNet-20 training steps, batch {args.batch}, {n} steps per variant in {args.rounds} interleaved rounds, "
          f"{device} ({args.threads} threads, torch {torch.__version__})")
    for name in VARIANTS:
        print(f"  {name:24s} {n * args.batch / seconds[name]:8.0f} images/s   "
              f"{seconds[name] / seconds['plain']:.3f}× the plain step's time")


if __name__ == "__main__":
    main()
