"""Search episodes: seconds per phase, and how faithful each reward is to the ACR it stands for.

``episodes``: a few ARQ episodes (random policies at the budget) with the profile's episode settings, scaled to
``--finetune-images`` images (steps × batch) and ``--val-images`` val images × ``--n-p`` replayed samples;
prints the mean seconds of calibration, finetune, reward and the total, against the target (15 s on two CPU
cores, 3 s on an H100).

``fidelity``: ``--policies`` random policies at the budget, each quantized and finetuned once; for each, the
IRS reward's ACR, the Cohen reward's ACR at the same sample count (CERTIFY with n0 + n_p samples at α + α_ζ) and
a reference ACR from Cohen at ``--reference-n`` samples on the same val images (at α). Prints the Spearman
correlation of each reward with the reference and each one's seconds: which certifier the search should use.

Both build the FP32 model's IRS cache of the val images first (``--cache`` reuses one).

    python benchmarks/search.py episodes|fidelity --config config/cpu-short.yaml --fp32 MODEL.pt --data D.pt \\
        --manifest M.json [--cache C.pt] [--budget 1.5] [--val-images 50] [--n-p 200] [--out results.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from arq import cost, irs, models, policy
from arq.config import load as load_config
from arq.data import Split, balanced_positions, load_prepared, to_unit
from arq.engine import Engine
from arq.io import device_name, git_commit
from arq.search.constraint import enforce_budget
from arq.search.evaluate import EpisodeEvaluator, cohen_acr
from arq.train import first_images


def setup(args):
    cfg = load_config(args.config)
    cfg["irs"].update(images=args.val_images, n_p=args.n_p)
    ft = cfg["search"]["finetune"]
    ft["steps"] = max(1, round(args.finetune_images / ft["batch_size"]))
    device = torch.device(args.device)
    data = load_prepared(args.data, args.manifest)
    fp32, meta = models.load_checkpoint(args.fp32, cfg["model"]["arch"])
    sigma = float(meta["sigma"])
    ic = cfg["irs"]
    if args.cache and Path(args.cache).exists():
        cache = irs.Cache.load(args.cache)
    else:
        pos = balanced_positions(data.val.y, args.val_images)  # class-balanced (the split is in class order)
        t0 = time.perf_counter()
        cache = irs.build_cache(Engine.from_config(cfg).prepare(copy.deepcopy(fp32), device),
                                to_unit(data.val.x[pos]), data.val.y[pos], pos.tolist(), sigma, ic["n0"],
                                args.cache_n, ic["alpha"], ic["seed"], ic["chunk"], ic["chunks_per_batch"], {})
        print(f"FP32 cache: {args.val_images} val images × {args.cache_n} samples in {time.perf_counter() - t0:.0f} s")
        if args.cache:
            cache.save(args.cache)
    val = Split(data.val.x[cache.idx], data.val.y[cache.idx])
    train = first_images(data.train, ft["train_images"])
    costs, rules = policy.for_config(cfg)
    evaluator = EpisodeEvaluator(fp32, cfg, sigma, train, val, len(data.manifest["classes"]), device, "arq",
                                 cfg["search"]["seeds"][0], cache)
    return cfg, sigma, costs, rules, evaluator, cache, val, device


def random_policies(costs, rules, budget: float, count: int, seed: int) -> list[dict]:
    g = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        chosen = {n: {"w_bits": int(g.integers(rules.min_bits, rules.max_bits + 1)),
                      "a_bits": int(g.integers(rules.min_bits, rules.max_bits + 1))} for n in rules.layers}
        chosen.update({n: {"w_bits": b, "a_bits": b} for n, b in rules.pinned.items()})
        out.append(enforce_budget(chosen, costs, rules, budget))
    return out


def episodes(args) -> dict:
    cfg, sigma, costs, rules, evaluator, cache, val, device = setup(args)
    rows = []
    for layers in random_policies(costs, rules, args.budget, args.episodes, args.seed):
        t0 = time.perf_counter()
        reward, info = evaluator(layers)
        rows.append({**{k: round(v, 3) for k, v in info["seconds"].items()},
                     "total": round(time.perf_counter() - t0, 3), "reward_value": round(reward, 4),
                     "acr": round(info["acr"], 4)})
        print(json.dumps(rows[-1]), flush=True)
    mean = {k: round(float(np.mean([r[k] for r in rows])), 3) for k in ("calibrate", "finetune", "reward", "total")}
    target = 3.0 if device.type == "cuda" else 15.0
    print(f"\nARQ episode at {args.finetune_images} finetune images ({cfg['search']['finetune']['steps']} steps), "
          f"{args.val_images} val images × n_p={args.n_p}, σ={sigma}, {device_name(device)}:")
    print("  " + ", ".join(f"{k} {v:.2f} s" for k, v in mean.items()) +
          f"  → {mean['total'] / target:.2f}× the {target:g} s target")
    return {"mode": "episodes", "mean_seconds": mean, "target_seconds": target, "rows": rows,
            "finetune_steps": cfg["search"]["finetune"]["steps"]}


def fidelity(args) -> dict:
    cfg, sigma, costs, rules, evaluator, cache, val, device = setup(args)
    ic = cfg["irs"]
    x, y = to_unit(val.x).to(device), val.y.to(device)
    idx = cache.idx.tolist()
    rows = []
    for k, layers in enumerate(random_policies(costs, rules, args.budget, args.policies, args.seed)):
        model, _ = evaluator.quantize(layers)
        run = evaluator.engine.prepare(model, device)
        t0 = time.perf_counter()
        results, _ = irs.certify_incremental(run, cache, x, ic["n_p"], ic["alpha_zeta"], ic["gamma"],
                                             ic["chunks_per_batch"], zeta_counts=ic["zeta_counts"])
        irs_acr, irs_s = irs.acr(results, cache.labels), time.perf_counter() - t0
        t0 = time.perf_counter()
        cohen = cohen_acr(run, x, y, idx, evaluator.num_classes, ic["n0"], ic["n_p"], ic["alpha"] + ic["alpha_zeta"],
                          cfg["search"]["seeds"][0], sigma)
        cohen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        reference = cohen_acr(run, x, y, idx, evaluator.num_classes, ic["n0"], args.reference_n, ic["alpha"],
                              cfg["search"]["seeds"][0] + 1, sigma)
        ref_s = time.perf_counter() - t0
        rows.append({"policy": k, "bitops_pct": round(cost.bitops_pct(costs, layers), 4),
                     "irs_acr": irs_acr, "cohen_acr": cohen, "reference_acr": reference,
                     "seconds_irs": round(irs_s, 2), "seconds_cohen": round(cohen_s, 2),
                     "seconds_reference": round(ref_s, 2), **irs.disagreement_rates(results, ic["n_p"])})
        print(json.dumps(rows[-1]), flush=True)
    ref = [r["reference_acr"] for r in rows]
    rho_irs, rho_cohen = spearmanr([r["irs_acr"] for r in rows], ref)[0], spearmanr([r["cohen_acr"] for r in rows],
                                                                                   ref)[0]
    s_irs, s_cohen = np.mean([r["seconds_irs"] for r in rows]), np.mean([r["seconds_cohen"] for r in rows])
    print(f"\n{len(rows)} random policies at {args.budget}% BitOps, {len(idx)} val images, σ={sigma}, "
          f"{device_name(device)}; reference: Cohen at n={args.reference_n}")
    print(f"  IRS   (n_p={ic['n_p']}):        Spearman ρ = {rho_irs:.3f}, {s_irs:.2f} s per policy")
    print(f"  Cohen (n0={ic['n0']}, n={ic['n_p']}): Spearman ρ = {rho_cohen:.3f}, {s_cohen:.2f} s per policy "
          f"({s_cohen / s_irs:.2f}× IRS's time)")
    return {"mode": "fidelity", "spearman_irs": rho_irs, "spearman_cohen": rho_cohen, "seconds_irs": s_irs,
            "seconds_cohen": s_cohen, "reference_n": args.reference_n, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["episodes", "fidelity"])
    ap.add_argument("--config", required=True)
    ap.add_argument("--fp32", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--cache", default=None, help="IRS cache to reuse (built and saved here when missing)")
    ap.add_argument("--cache-n", type=int, default=2000, help="samples per image when the cache is built")
    ap.add_argument("--budget", type=float, default=1.5)
    ap.add_argument("--val-images", type=int, default=50)
    ap.add_argument("--n-p", type=int, default=200)
    ap.add_argument("--finetune-images", type=int, default=1000)
    ap.add_argument("--episodes", type=int, default=5, help="episodes timed (episodes mode)")
    ap.add_argument("--policies", type=int, default=30, help="random policies (fidelity mode)")
    ap.add_argument("--reference-n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = episodes(args) if args.mode == "episodes" else fidelity(args)
    if args.out:
        Path(args.out).write_text(json.dumps({**result, "args": vars(args), "device": device_name(torch.device(
            args.device)), "torch": str(torch.__version__), "git_commit": git_commit()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
