"""Weight clip at 2–4 bits: the per-channel max against the MSE-best clip, on a trained ResNet-20.

For each weight width b and clip, the FP32 model is quantized W{b}A8 (activations kept at 8 bits so that only
the weight quantizer differs; pinned layers at their pinned bits), calibrated, and finetuned with the shared QAT
recipe (arq.train.finetune, the profile's `finetune` section with the epochs and images given here). Printed per
row: the relative weight MSE of the trained weights, noisy val accuracy after calibration alone (PTQ) and after
the finetune, and the finetune's seconds per epoch as a ratio to the max clip's (the cost of the clip search).

    python benchmarks/weight_clip.py --config config/cpu-short.yaml --fp32 MODEL.pt --data D.pt --manifest M.json \
        [--bits 2 3 4] [--epochs 2] [--train-images 10000] [--val-images 2000] [--out results.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from arq import config as arq_config
from arq import models, policy, quant
from arq.data import load_prepared
from arq.io import device_name, git_commit
from arq.train import finetune


def relative_weight_mse(model: torch.nn.Module, layers: dict, clip: str) -> float:
    """Σ‖Q(W)−W‖² / Σ‖W‖² over the layers quantized below 8 bits."""
    err = norm = 0.0
    for name, bits in layers.items():
        if bits["w_bits"] >= 8:
            continue
        w = model.get_submodule(name).weight.detach()
        err += float(((quant.quantize_weight(w, bits["w_bits"], clip) - w) ** 2).sum())
        norm += float((w ** 2).sum())
    return err / norm


def step_seconds(fp32: torch.nn.Module, layers: dict, clip: str, data, sigma: float, steps: int, repeats: int) -> float:
    """Fastest of ``repeats`` timings of ``steps`` QAT steps (batch 128) of the quantized model: the training cost
    of the weight clip, measured in this process against the other clip."""
    from arq import rng
    from arq.train import qat_steps

    model = quant.apply_policy(copy.deepcopy(fp32), layers, clip)
    for layer in quant.quantized_layers(model).values():  # ranges are irrelevant to the timing
        layer.act.calibrated, layer.act.clip.data = True, torch.tensor(4.0)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        qat_steps(model, data.train, sigma, steps, 128, 1e-3, 0.9, 4e-5, rng.generator("search-finetune", 0))
        best = min(best, time.perf_counter() - t0)
    return best / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--fp32", required=True, help="FP32 checkpoint of the profile")
    ap.add_argument("--data", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-images", type=int, default=10_000)
    ap.add_argument("--val-images", type=int, default=2_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON with every row")
    ap.add_argument("--timing-only", action="store_true", help="only the seconds per QAT step, max vs mse clip")
    ap.add_argument("--timing-steps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    base_cfg = arq_config.load(args.config)
    data = load_prepared(args.data, args.manifest)
    _, meta = models.load_checkpoint(args.fp32, base_cfg["model"]["arch"])
    sigma = float(meta["sigma"])
    fp32_model, _ = models.load_checkpoint(args.fp32)
    costs, rules = policy.for_config(base_cfg)
    timing = {}
    for bits in args.bits:
        layers = policy.uniform_layers(rules, bits, 8)
        mx, ms = (step_seconds(fp32_model, layers, c, data, sigma, args.timing_steps, 3) for c in ("max", "mse"))
        timing[f"W{bits}A8"] = {"max_s_per_step": round(mx, 4), "mse_s_per_step": round(ms, 4),
                                "ratio": round(ms / mx, 3)}
        print(f"W{bits}A8 QAT step (batch 128): max clip {mx:.3f} s, mse clip {ms:.3f} s → {ms / mx:.2f}×", flush=True)
    if args.timing_only:
        if args.out:
            Path(args.out).write_text(json.dumps({"timing": timing, "device": device_name(device),
                                                  "torch": str(torch.__version__), "git_commit": git_commit()},
                                                 indent=2) + "\n")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits:
            doc = policy.make(policy.uniform_layers(rules, bits, 8), costs, rules, f"uniform W{bits}A8")
            for clip in ("max", "mse"):
                row = {"w_bits": bits, "a_bits": 8, "weight_clip": clip,
                       "relative_weight_mse": round(relative_weight_mse(fp32_model, doc["layers"], clip), 4)}
                for epochs in (0, args.epochs):
                    cfg = copy.deepcopy(base_cfg)
                    cfg["quant"]["weight_clip"] = clip
                    cfg["finetune"].update(epochs=epochs, train_images=args.train_images, val_images=args.val_images)
                    out = Path(tmp) / f"w{bits}_{clip}_{epochs}"
                    s = finetune(cfg, sigma, args.fp32, doc, data, out / "model.pt", out / "resume.pt",
                                 out / "ft.csv", out / "ft.json", device, f"w{bits}a8_{clip}", log=lambda m: None)
                    if epochs == 0:
                        row["ptq_noisy_val_acc"] = s["final_noisy_val_acc"]
                    else:
                        history = _history(out / "ft.csv")
                        row["qat_noisy_val_acc"] = s["final_noisy_val_acc"]
                        row["seconds_per_epoch"] = round(sum(float(r["epoch_seconds"]) for r in history)
                                                         / len(history), 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\nσ={sigma}, QAT {args.epochs} epochs on {args.train_images} images, noisy val acc on "
          f"{args.val_images} val images ({device_name(device)})")
    print(f"{'W':>2} {'rel. MSE max':>12} {'rel. MSE mse':>12} {'PTQ max':>8} {'PTQ mse':>8} {'QAT max':>8} "
          f"{'QAT mse':>8} {'epoch time mse/max':>19}")
    for bits in args.bits:
        mx, ms = (next(r for r in rows if r["w_bits"] == bits and r["weight_clip"] == c) for c in ("max", "mse"))
        print(f"{bits:>2} {mx['relative_weight_mse']:>12.4f} {ms['relative_weight_mse']:>12.4f} "
              f"{mx['ptq_noisy_val_acc']:>8.4f} {ms['ptq_noisy_val_acc']:>8.4f} {mx['qat_noisy_val_acc']:>8.4f} "
              f"{ms['qat_noisy_val_acc']:>8.4f} {ms['seconds_per_epoch'] / mx['seconds_per_epoch']:>18.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"sigma": sigma, "fp32": str(args.fp32), "epochs": args.epochs,
                                              "timing": timing,
                                              "train_images": args.train_images, "val_images": args.val_images,
                                              "device": device_name(device), "torch": str(torch.__version__),
                                              "git_commit": git_commit(), "rows": rows}, indent=2) + "\n")


def _history(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


if __name__ == "__main__":
    main()
