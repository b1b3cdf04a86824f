"""Certification speed, in two parts, each against a reference run in the same process on the same device.

``engine``: noisy samples/s of our sampling engine (arq.smoothing.Smooth over arq.engine.Engine.prepare) against the plain
Cohen-style loop (float32, NCHW, batch 1,000, fresh noise per batch, counts on the host), for the engine's
layouts, batch sizes and the explicit faster-numerics options. For those options it also counts how many
noisy samples the executed network classifies differently from the eager float32 one (on identical noise):
that is the sense in which "the certificate holds for the network as executed" matters.

``irs``: incremental randomized smoothing against full re-certification of modified models (post-training
W8A8 / W4A4 by default; ``--models`` also takes the IRS paper's fp16/bf16 weight rounding), at equal
confidence 1 − (α + α_ζ), on the same val images with the same engine.
IRS is run over a grid of n_p, full Cohen CERTIFY over a grid of n (at level α + α_ζ); the speedup is the
baseline's time to reach IRS's ACR (interpolated on its time–ACR curve) over IRS's time, and the IRS paper's
metric: the ratio of the areas under the two time-vs-ACR curves over their common ACR range; both also in
forward passes (machine-independent), and for each ζ rule (``--zeta-counts``). Every point is timed
``--repeats`` times, the fastest kept. The FP32 cache is built once (the one-off cost a search amortises over
its episodes) and reported separately.

    python benchmarks/certify.py engine [--checkpoint model.pt] [--device cpu|cuda] [--threads 2]
    python benchmarks/certify.py irs --config config/cpu-short.yaml --fp32 results/.../model.pt \\
        --data data/prepared/<profile>/cifar10.pt --manifest data/prepared/<profile>/manifest.json [--compile]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from reference import plain_counts, synchronize, timed

from arq import data as data_mod
from arq import irs, models, policy
from arq.certify import image_generator
from arq.config import load as load_config
from arq.data import balanced_positions, to_unit
from arq.engine import Engine
from arq.io import git_commit
from arq.smoothing import Smooth
from arq.train import quantize_for_finetune


def _device_name(dev: torch.device, threads: int) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {threads} threads"


# --------------------------------------------------------------------------------------------------- engine

def engine_configs(dev: torch.device, batches: list[int], all_dtypes: bool) -> list[tuple[str, Engine, int]]:
    """Engine settings to time: the default (channels-last float32) at each batch, then the explicit options."""
    top = max(batches)
    configs = [(f"channels-last fp32, batch {b}", Engine(), b) for b in batches]
    configs.append((f"NCHW fp32 (engine), batch {top}", Engine(channels_last=False), top))
    configs.append((f"compiled fp32, batch {top}", Engine(compile=True), top))
    if dev.type == "cuda" or all_dtypes:  # no bf16/fp16 units on most CPUs: autocast there is slower
        configs.append((f"compiled bf16, batch {top}", Engine(compile=True, dtype="bfloat16"), top))
        configs.append((f"bf16, batch {top}", Engine(dtype="bfloat16"), top))
    return configs


@torch.inference_mode()
def changed_predictions(eager: torch.nn.Module, executed: torch.nn.Module, x: torch.Tensor, sigma: float,
                        num: int, batch: int) -> int:
    """Noisy samples (of num, identical noise) that the executed network labels differently from eager fp32."""
    gen = torch.Generator(device=x.device).manual_seed(123)
    changed = 0
    for _ in range(num // batch):
        b = x.unsqueeze(0) + sigma * torch.randn((batch, *x.shape), generator=gen, device=x.device)
        changed += int((eager(b).argmax(1) != executed(b).argmax(1)).sum())
    return changed


def run_engine(args) -> None:
    dev = torch.device(args.device)
    if args.checkpoint:
        model, meta = models.load_checkpoint(args.checkpoint)
        sigma = float(meta["sigma"])
    else:
        model, sigma = models.build("resnet20"), 0.25
    model = model.to(dev).eval()
    x0 = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dev)
    per_call = 4 * args.plain_batch
    print(f"device {_device_name(dev, args.threads)}, torch {torch.__version__}, model "
          f"{args.checkpoint or 'resnet20 (random weights)'}, σ={sigma}")

    def plain() -> int:
        plain_counts(model, x0, per_call, sigma, args.plain_batch, 10)
        return per_call

    rows = []
    for name, engine, batch in engine_configs(dev, args.batches, args.all_dtypes):
        run = engine.prepare(copy.deepcopy(model), dev)  # a copy: the plain loop keeps its NCHW model
        smooth = Smooth(run, 10, sigma, batch)
        gen = torch.Generator(device=dev).manual_seed(0)
        num = max(per_call // batch, 1) * batch
        t0 = time.perf_counter()
        smooth.sample_counts(x0, batch, gen)  # the first call pays any compilation
        synchronize(dev)
        first = time.perf_counter() - t0

        def ours() -> int:
            smooth.sample_counts(x0, num, gen)
            return num
        r_ours, r_plain = timed(ours, args.seconds, dev), timed(plain, args.seconds, dev)
        changed = changed_predictions(model, run, x0, sigma, 10 * batch, batch)
        rows.append({"engine": name, "samples_per_s": round(r_ours), "plain_samples_per_s": round(r_plain),
                     "ratio": round(r_ours / r_plain, 2), "first_call_s": round(first, 1),
                     "changed_predictions": f"{changed}/{10 * batch}"})
        print(f"{name:34s} ours {r_ours:10.0f}/s   plain {r_plain:10.0f}/s   ratio {r_ours / r_plain:5.2f}×   "
              f"first call {first:5.1f} s   predictions changed vs eager fp32: {changed}/{10 * batch}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": _device_name(dev, args.threads), "sigma": sigma,
                                              "plain_batch": args.plain_batch, "rows": rows}, indent=2))


# ------------------------------------------------------------------------------------------------------ IRS

FLOAT_CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16}


def modified_copy(fp32: torch.nn.Module, config: dict, tag: str, sigma: float, calib, dev) -> torch.nn.Module:
    """The modified network f_p that IRS certifies against the FP32 cache.

    ``W<b>A<b>``: post-training quantization as the pipeline does it with finetune.epochs = 0 (policy, then
    calibration). ``fp16`` / ``bf16``: weights and buffers rounded to that format, arithmetic still float32:
    the IRS paper's fp16/bf16 approximations, a much smaller change than 8-bit quantization. ``fp32``: an
    unchanged copy, IRS's best case (ζ from zero disagreements), which is also what the IRS repository's
    int8 amounts to for CIFAR ResNets (benchmarks/RESULTS.md, "IRS vs full re-certification").
    """
    q = copy.deepcopy(fp32)
    if tag in FLOAT_CASTS:
        q = q.to(FLOAT_CASTS[tag]).to(torch.float32)
    elif tag != "fp32":
        quantize_for_finetune(q, policy.uniform_policy(config, tag)["layers"], config["quant"], calib, sigma, 256, 0,
                              dev)
    return q.eval()


def baseline_acr(smooth: Smooth, x, y, idx, n0: int, n: int, alpha: float, seed: int) -> tuple[float, float]:
    """Full Cohen CERTIFY of every image at level alpha: (ACR, seconds)."""
    synchronize(smooth.device)
    t0 = time.perf_counter()
    certs = [smooth.certify(x[i], n0, n, alpha, image_generator(seed, int(idx[i]), smooth.device))
             for i in range(len(x))]
    synchronize(smooth.device)
    return irs.acr(certs, y), time.perf_counter() - t0


def fastest(run, repeats: int):
    """Run a deterministic measurement ``repeats`` times and keep the fastest: (result, seconds).

    Shared machines add bursts of delay to single runs; the minimum is the standard robust estimate. The
    result must not change between repeats (same seeds, same noise), which is checked (by repr: NaN-safe)."""
    best = None
    for _ in range(repeats):
        result, secs = run()
        if best is not None and repr(result) != repr(best[0]):
            raise RuntimeError(f"a repeated measurement gave a different result: {result} vs {best[0]}")
        if best is None or secs < best[1]:
            best = (result, secs)
    return best


def time_to_reach(acr: float, curve: list[tuple[float, float]]) -> float | None:
    """Seconds the curve [(seconds, ACR)] needs to reach ``acr`` (linear between points, ACR made monotone);
    None unless the curve's cheapest point is below ``acr`` and its best at or above: above the range the
    baseline never gets there; at or below its cheapest point the baseline might need less than that point
    (an ACR of 0 costs nothing), so any speedup claimed there would be invented."""
    secs = np.array([c[0] for c in curve])
    acrs = np.maximum.accumulate(np.array([c[1] for c in curve]))
    if not acrs[0] < acr <= acrs[-1]:
        return None
    return float(np.interp(acr, acrs, secs))


def _speedup_text(point: dict, base: list[dict]) -> str:
    if point["speedup"] is not None:
        return f"{point['speedup']}×"
    return "baseline never reaches it" if point["acr"] > max(b["acr"] for b in base) else \
        "below the baseline's cheapest point"


def area_ratio(base: list[tuple[float, float]], inc: list[tuple[float, float]]) -> float | None:
    """The IRS paper's speedup: ∫T_base(a) da / ∫T_IRS(a) da over the ACR range both curves cover."""
    def mono(curve):
        return np.maximum.accumulate(np.array([c[1] for c in curve])), np.array([c[0] for c in curve])
    (ab, tb), (ai, ti) = mono(base), mono(inc)
    lo, hi = max(ab[0], ai[0]), min(ab[-1], ai[-1])
    if hi <= lo:
        return None
    grid = np.linspace(lo, hi, 200)
    return float(np.trapezoid(np.interp(grid, ab, tb), grid) / np.trapezoid(np.interp(grid, ai, ti), grid))


def compare(points: list[dict], base_curve: list[tuple[float, float]], cost: str, reached_key: str,
            speedup_key: str) -> float | None:
    """Annotate IRS points with the baseline's cost to reach their ACR and the speedup, both measured in
    ``point[cost]`` units; return the area ratio (the IRS paper's metric) in the same units."""
    for p in points:
        t = time_to_reach(p["acr"], base_curve)
        p[reached_key] = None if t is None else round(t, 3)
        p[speedup_key] = None if t is None else round(t / p[cost], 2)
    ratio = area_ratio(base_curve, [(p[cost], p["acr"]) for p in points])
    return None if ratio is None else round(ratio, 2)


def add_sample_metrics(report: dict) -> dict:
    """Speedups counted in forward passes instead of seconds, from a run's report (in place; returned).

    Both methods run the same network with the same batch shapes, so a noisy sample costs the same in each
    and the ratio of samples is the speedup without the machine's timing noise (which on a shared CPU
    drifts by tens of percent between short and long runs). IRS evaluates n_p samples per image except where
    the cache abstained (p_A − ζ ≤ p_A ≤ ½ can never certify, so f_p is not run); full re-certification
    evaluates n0 + n per image."""
    images, n0 = report["images"], report["n0"]
    for entry in report["models"].values():
        base = [((n0 + b["n"]) * images, b["acr"]) for b in entry["baseline"]]
        for run in entry["irs"].values():
            for point in run["points"]:
                point["samples"] = point["n_p"] * (images - point["branches"]["abstain-cached"])
            run["area_sample_speedup"] = compare(run["points"], base, "samples", "baseline_samples_to_same_acr",
                                                 "sample_speedup")
    return report


def run_irs(args) -> None:
    dev = torch.device(args.device)
    config = load_config(args.config)
    data = data_mod.load_prepared(args.data, args.manifest)
    fp32, meta = models.load_checkpoint(args.fp32, config["model"]["arch"])
    fp32 = fp32.to(dev).eval()
    sigma = float(meta["sigma"])
    engine = Engine(channels_last=True, compile=args.compile, dtype=args.dtype)
    alpha, alpha_zeta = args.alpha, args.alpha_zeta
    pos = balanced_positions(data.val.y, args.images)  # the val split is in class order: balance it
    x, y, idx = to_unit(data.val.x[pos]), data.val.y[pos], pos.tolist()
    print(f"device {_device_name(dev, args.threads)}, torch {torch.__version__}, engine {engine.describe()}\n"
          f"σ={sigma}, {len(pos)} val images, cache n={args.n}, α=α_ζ={alpha}, γ={args.gamma}; "
          f"baseline = Cohen CERTIFY (n0={args.n0}) at α+α_ζ={alpha + alpha_zeta}", flush=True)

    f_run = engine.prepare(copy.deepcopy(fp32), dev)
    irs.build_cache(f_run, x[:1], y[:1], idx[:1], sigma, args.n0, args.chunk * args.chunks_per_batch, alpha,
                    args.seed, args.chunk, args.chunks_per_batch, {})  # warm-up (compilation) for both shapes
    cache = irs.build_cache(f_run, x, y, idx, sigma, args.n0, args.n, alpha, args.seed, args.chunk,
                            args.chunks_per_batch, {})
    fp32_acr = irs.cached_acr(cache)
    share_high = float((cache.p_lower >= args.gamma).float().mean())
    print(f"FP32 cache: {cache.seconds:.1f} s ({len(pos) * (args.n0 + args.n) / cache.seconds:.0f} samples/s), "
          f"ACR {fp32_acr:.4f}, share with p_A ≥ γ: {share_high:.3f}", flush=True)

    report = {"device": _device_name(dev, args.threads), "torch": torch.__version__, "engine": engine.describe(),
              "sigma": sigma, "images": len(pos), "cache_n": args.n, "n0": args.n0, "alpha": alpha,
              "alpha_zeta": alpha_zeta, "gamma": args.gamma, "fp32_checkpoint": str(args.fp32),
              "commit": git_commit(), "repeats": args.repeats,
              "cache_seconds": round(cache.seconds, 2), "fp32_acr": fp32_acr, "share_p_above_gamma": share_high,
              "models": {}}
    for tag in args.models:
        q = modified_copy(fp32, config, tag, sigma, data.train, dev)
        run = engine.prepare(q, dev)
        smooth = Smooth(run, 10, sigma, args.chunk * args.chunks_per_batch)
        # warm-up on one image for every batch shape either method will use (compilation is not timed)
        for n_p in args.n_p:
            irs.predictions(run, x[0], sigma, args.seed, idx[0], irs.FRESH_BASE, n_p, args.chunk,
                            args.chunks_per_batch)
        baseline_acr(smooth, x[:1], y[:1], idx[:1], args.n0, min(args.baseline_n), alpha + alpha_zeta, args.seed + 1)

        runs = {}
        for counts in args.zeta_counts:
            runs[counts] = inc = []
            for n_p in args.n_p:
                results, secs = fastest(lambda: irs.certify_incremental(
                    run, cache, x, n_p, alpha_zeta, args.gamma, args.chunks_per_batch, zeta_counts=counts),
                    args.repeats)
                zetas = [r.zeta for r in results if r.branch == "irs"]
                rates = irs.disagreement_rates(results, n_p)
                inc.append({"n_p": n_p, "seconds": round(secs, 3), "acr": irs.acr(results, cache.labels),
                            "mean_zeta": float(np.mean(zetas)) if zetas else None, **rates,
                            "branches": irs.branch_counts(results)})
                print(f"  {tag} IRS ({counts}) n_p={n_p:6d}: {secs:8.1f} s  ACR {inc[-1]['acr']:.4f}  "
                      f"mean ζ {inc[-1]['mean_zeta'] if zetas else float('nan'):.4f}  "
                      f"disagreement {rates['disagreement_rate']}  top-class loss {rates['top_class_loss_rate']}",
                      flush=True)
        base = []
        for n in args.baseline_n:
            a, secs = fastest(lambda: baseline_acr(smooth, x, y, idx, args.n0, n, alpha + alpha_zeta, args.seed + 1),
                              args.repeats)
            base.append({"n": n, "seconds": round(secs, 3), "acr": a})
            print(f"  {tag} baseline  n={n:8d}: {secs:8.1f} s  ACR {a:.4f}", flush=True)
        base_curve = [(b["seconds"], b["acr"]) for b in base]
        report["models"][tag] = {"baseline": base, "irs": {}}
        for counts, inc in runs.items():
            ratio = compare(inc, base_curve, "seconds", "baseline_seconds_to_same_acr", "speedup")
            report["models"][tag]["irs"][counts] = {"points": inc, "area_speedup": ratio}
            print(f"  {tag} ({counts}): speedup at equal ACR per n_p: "
                  + ", ".join(f"{p['n_p']}: {_speedup_text(p, base)}" for p in inc)
                  + f";  area ratio (IRS paper metric): {ratio}", flush=True)
    add_sample_metrics(report)
    for tag, entry in report["models"].items():
        for counts, run in entry["irs"].items():
            print(f"  {tag} ({counts}): speedup in samples at equal ACR per n_p: "
                  + ", ".join(f"{p['n_p']}: {p['sample_speedup']}" for p in run["points"])
                  + f";  area ratio in samples: {run['area_sample_speedup']}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


def model_tags(text: str) -> list[str]:
    """``--models``, checked while parsing: a typo should not surface only after the FP32 cache is built."""
    tags = text.split(",")
    for tag in tags:
        if tag not in FLOAT_CASTS and tag != "fp32":
            try:
                policy.parse_uniform(tag)
            except policy.PolicyError as err:
                raise argparse.ArgumentTypeError(f"{err}, or one of fp16, bf16, fp32") from None
    return tags


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="part", required=True)
    for p in (sub.add_parser("engine"), sub.add_parser("irs")):
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--out", default=None, help="write the measurements as JSON")
    e = sub.choices["engine"]
    e.add_argument("--checkpoint", default=None, help="a trained checkpoint (default: random ResNet-20 weights)")
    e.add_argument("--seconds", type=float, default=10.0)
    e.add_argument("--plain-batch", type=int, default=1000)
    e.add_argument("--batches", type=_ints, default=None, help="engine batch sizes (default: CPU 100,250,1000; "
                                                              "GPU 1000,4000,10000)")
    e.add_argument("--all-dtypes", action="store_true", help="time bfloat16 on CPU too")
    r = sub.choices["irs"]
    r.add_argument("--config", required=True, help="profile YAML (quantizer rules and calibration)")
    r.add_argument("--fp32", required=True, help="FP32 checkpoint (its σ is used)")
    r.add_argument("--data", required=True)
    r.add_argument("--manifest", required=True)
    r.add_argument("--models", "--bits", dest="models", type=model_tags, default=["W8A8", "W4A4"],
                   help="modified networks: uniform WxAy quantization, fp16 / bf16 weight rounding, fp32 (unchanged)")
    r.add_argument("--images", type=int, default=50, help="val images (spread evenly over the val split)")
    r.add_argument("--n", type=int, default=10_000, help="cached FP32 samples per image")
    r.add_argument("--n0", type=int, default=100)
    r.add_argument("--n-p", type=_ints, default=[100, 200, 500, 1000])
    r.add_argument("--baseline-n", type=_ints, default=[100, 200, 500, 1000, 2000, 4000])
    r.add_argument("--alpha", type=float, default=0.001)
    r.add_argument("--alpha-zeta", type=float, default=0.001)
    r.add_argument("--gamma", type=float, default=0.99)
    r.add_argument("--zeta-counts", type=lambda s: s.split(","), default=list(irs.ZETA_COUNTS),
                   help="which disagreements ζ bounds; each is run (default: both)")
    r.add_argument("--chunk", type=int, default=100)
    r.add_argument("--chunks-per-batch", type=int, default=5)
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--repeats", type=int, default=2, help="time every point this often and keep the fastest")
    r.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "engine":
        if args.batches is None:
            args.batches = [1000, 4000, 10_000] if args.device == "cuda" else [100, 250, 1000]
        run_engine(args)
    else:
        run_irs(args)


if __name__ == "__main__":
    main()
