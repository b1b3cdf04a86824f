"""Reward–outcome fidelity: does a search proxy rank policies the way the final finetune and certification do?

A search scores each episode's policy by a cheap proxy (a few QAT steps, a small reward set); what matters is the
policy's certified ACR after the real finetune recipe. This benchmark measures, per candidate proxy, the Spearman
correlation between its reward and that outcome, with a bootstrap 95% interval over policies, and its seconds per
episode. The profile then adopts the proxy with the best fidelity for its cost (README *Search*).

1. Pool: ``--pool`` seeded policies at ``--budget``% of FP32 BitOps, each drawn around its own mean weight and
   activation bits (uniform in the bit range), so that the pool holds weight-heavy, activation-heavy and balanced
   allocations; then the search's budget walk. Each is scored by the profile's own proxy (``today``).
2. ``--policies`` of them at evenly spaced ranks of that score (the lowest and highest included): the reward range
   is spanned, not just its crowded middle.
3. Each selected policy is scored by every proxy in ``PROXIES`` (overlays on the profile's ``search`` and ``irs``
   sections), then finetuned with the profile's ``finetune`` recipe (the one every method's final model gets) and
   certified with Cohen's CERTIFY (N0, ``--outcome-n``, α) on ``--outcome-images`` class-balanced val images that
   no reward set contains, with noise of its own stream: proxy and outcome share neither images nor noise. The
   test split is never touched.

Resumable: each finished policy is appended to ``<out>.rows.jsonl`` (the pool to ``<out>.pool.jsonl``), both tagged
with a fingerprint of the settings; a rerun continues after the last finished policy and refuses files from other
settings. Prints progress per policy.

Batches run with other ``--seed`` values (new pools, new policies, same settings) are pooled with ``--combine``:
one ρ per proxy over all their policies, its bootstrap resampling policies within each batch.

    python benchmarks/proxy_outcome.py --config config/cpu.yaml --fp32 results/cpu/models/fp32_sigma0.25/model.pt \\
        --data data/prepared/cpu/cifar10.pt --manifest data/prepared/cpu/manifest.json \\
        --out benchmarks/results/proxy_outcome_cpu.json
    python benchmarks/proxy_outcome.py --combine benchmarks/results/proxy_outcome_cpu.json \\
        benchmarks/results/proxy_outcome_cpu_seed1.json --out benchmarks/results/proxy_outcome_cpu_combined.json
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from arq import cost, irs, models, policy, rng, train
from arq.config import config_hash
from arq.config import load as load_config
from arq.data import Split, balanced_positions, load_prepared, to_unit
from arq.engine import Engine
from arq.io import device_name, git_commit, sha256_file, write_json, write_text
from arq.search.constraint import enforce_budget
from arq.search.evaluate import EpisodeEvaluator
from arq.smoothing import Smooth

# name → (overlay on search.finetune, overlay on search, overlay on irs, reward kind). "today" is the profile as is.
PROXIES = {
    "today": ({}, {}, {}, "arq"),
    "bn": ({"bn_images": 1024}, {}, {}, "arq"),
    "qat32_lr0.01_bn": ({"steps": 32, "lr": 0.01, "bn_images": 1024}, {}, {}, "arq"),
    "bn_cohen": ({"bn_images": 1024}, {"certifier": "cohen"}, {}, "arq"),
    "bn_100img": ({"bn_images": 1024}, {}, {"images": 100}, "arq"),
    "distill_bn": ({"distill": True, "bn_images": 1024}, {}, {}, "arq"),
    "haq_1000img": ({}, {}, {}, "haq"),
}
DESCRIPTIONS = {
    "today": "the profile's proxy: calibration, {steps} QAT steps at lr {lr:g}, IRS reward on {images} val images",
    "bn": "today + BatchNorm statistics re-estimated on 1,024 noisy training images before scoring",
    "qat32_lr0.01_bn": "32 QAT steps at lr 0.01 (the final recipe's rate) + BatchNorm re-estimation",
    "bn_cohen": "bn, with Cohen's CERTIFY at the same sample count instead of IRS",
    "bn_100img": "bn, with the IRS reward on 100 val images instead of {images}",
    "distill_bn": "bn, the QAT steps distilled to the FP32 model's outputs (the agreement IRS rewards)",
    "haq_1000img": "HAQ's reward (clean top-1 on 1,000 class-balanced val images) after today's finetune",
}


def proxy_config(cfg: dict, name: str) -> dict:
    ft, search, ic, _ = PROXIES[name]
    out = copy.deepcopy(cfg)
    out["search"]["finetune"].update(ft)
    out["search"].update(search)
    out["irs"].update(ic)
    return out


def diverse_policies(costs, rules, budget: float, count: int, seed: int) -> list[dict]:
    """``count`` policies, each around its own mean weight and activation bits, walked down to the budget."""
    g = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        mw, ma = g.uniform(rules.min_bits, rules.max_bits, size=2)
        chosen = {n: {"w_bits": int(np.clip(round(g.normal(mw, 1.5)), rules.min_bits, rules.max_bits)),
                      "a_bits": int(np.clip(round(g.normal(ma, 1.5)), rules.min_bits, rules.max_bits))}
                  for n in rules.layers}
        chosen.update({n: {"w_bits": b, "a_bits": b} for n, b in rules.pinned.items()})
        out.append(enforce_budget(chosen, costs, rules, budget))
    return out


def spread(scores: list[float], k: int) -> list[int]:
    """Indices of ``k`` items at evenly spaced ranks of ``scores`` (lowest and highest included)."""
    order = np.argsort(scores, kind="stable")
    ranks = np.unique(np.round(np.linspace(0, len(scores) - 1, k)).astype(int))
    return sorted(int(order[r]) for r in ranks)


def spearman_interval(x, y, resamples: int, seed: int) -> dict:
    """Spearman ρ and its percentile bootstrap 95% interval over the paired items (resamples with a constant
    side, where ρ is undefined, are dropped and counted)."""
    return stratified_spearman_interval([(x, y)], resamples, seed)


def two_bit_layers(row: dict) -> dict:
    """How many layers of a policy row sit at 2 weight bits and at 2 activation bits (pinned layers never do)."""
    return {"w2": sum(b == 2 for b in row["w_bits"]), "a2": sum(b == 2 for b in row["a_bits"])}


def stratified_spearman_interval(batches: list[tuple[list, list]], resamples: int, seed: int) -> dict:
    """Spearman ρ over the pooled items of several batches, with a percentile bootstrap 95% interval that
    resamples items within each batch (each batch keeps its size: its policies were drawn, and spread over its
    own reward range, on their own)."""
    x = np.concatenate([np.asarray(b[0], float) for b in batches])
    y = np.concatenate([np.asarray(b[1], float) for b in batches])
    offsets = np.cumsum([0] + [len(b[0]) for b in batches])
    rho = float(spearmanr(x, y)[0])
    g = np.random.default_rng(seed)
    values, undefined = [], 0
    for _ in range(resamples):
        i = np.concatenate([g.integers(lo, hi, hi - lo) for lo, hi in zip(offsets[:-1], offsets[1:])])
        if np.ptp(x[i]) == 0 or np.ptp(y[i]) == 0:
            undefined += 1
            continue
        values.append(spearmanr(x[i], y[i])[0])
    lo, hi = np.quantile(values, [0.025, 0.975]) if values else (float("nan"), float("nan"))
    return {"rho": round(rho, 4), "low": round(float(lo), 4), "high": round(float(hi), 4),
            "resamples": resamples, "undefined_resamples": undefined}


def bits_fidelity(rows: list[dict], names) -> dict:
    """Spearman ρ of the outcome ACR and of each proxy's reward with the number of layers at W2 and at A2: what
    decides the outcome, and whether a proxy sees it the same way."""
    counts = [two_bit_layers(r) for r in rows]
    series = {"outcome": [r["outcome_acr"] for r in rows],
              **{n: [r["proxies"][n]["reward"] for r in rows] for n in names}}
    def rho(x, y):  # None where one side is constant (ρ undefined)
        return round(float(spearmanr(x, y)[0]), 4) if np.ptp(x) > 0 and np.ptp(y) > 0 else None

    return {k: {b: rho(v, [c[b] for c in counts]) for b in ("w2", "a2")} for k, v in series.items()}


COMBINED_SAME = ("budget_pct", "sigma", "profile", "config_hash", "outcome")


def _settings_of(value):
    """A summary field without what its batch measured (the outcome's ACR range), so that settings compare."""
    return {k: v for k, v in value.items() if k != "acr_range"} if isinstance(value, dict) else value


def combine(summaries: list[dict], resamples: int, seed: int) -> dict:
    """The batches of several runs (other ``--seed``, same settings) as one study: pooled Spearman ρ per proxy
    with a bootstrap interval stratified by batch, each batch's own ρ, and the 2-bit-layer table over all rows."""
    if len(summaries) < 2:
        raise SystemExit("--combine needs at least two summaries")
    for key in COMBINED_SAME:
        values = {json.dumps(_settings_of(s_[key]), sort_keys=True) for s_ in summaries}
        if len(values) > 1:
            raise SystemExit(f"the summaries differ in {key!r}; only batches of the same study can be combined")
    settings = {json.dumps({k: v["settings"] for k, v in s_["proxies"].items()}, sort_keys=True) for s_ in summaries}
    if len(settings) > 1:
        raise SystemExit("the summaries score different proxies; only batches of the same study can be combined")
    seeds = [s_["args"]["seed"] for s_ in summaries]
    if len(set(seeds)) < len(seeds):
        raise SystemExit(f"two summaries share a --seed ({seeds}): the same policies would be counted twice")
    names = list(summaries[0]["proxies"])
    rows = [r for s_ in summaries for r in s_["rows"]]
    proxies = {}
    for name in names:
        batches = [([r["proxies"][name]["reward"] for r in s_["rows"]], [r["outcome_acr"] for r in s_["rows"]])
                   for s_ in summaries]
        seconds = [r["proxies"][name]["seconds"] for r in rows]
        proxies[name] = {"description": summaries[0]["proxies"][name]["description"],
                         "spearman": stratified_spearman_interval(batches, resamples, seed),
                         "per_batch": {str(sd): s_["proxies"][name]["spearman"]
                                       for sd, s_ in zip(seeds, summaries)},
                         "seconds_per_episode": round(float(np.mean(seconds)), 2),
                         "settings": summaries[0]["proxies"][name]["settings"]}
    outcome = [r["outcome_acr"] for r in rows]
    return {"proxies": proxies, "policies": len(rows), "batches": seeds,
            "bits": bits_fidelity(rows, names),
            "outcome": {**summaries[0]["outcome"], "acr_range": [min(outcome), max(outcome)]},
            **{k: summaries[0][k] for k in ("budget_pct", "sigma", "profile", "config_hash")},
            "sources": [{"seed": sd, "git_commit": s_["git_commit"], "device": s_["device"],
                         "wall_seconds": s_["wall_seconds_this_run"]} for sd, s_ in zip(seeds, summaries)]}


def print_table(result: dict) -> None:
    for name, v in result["proxies"].items():
        f = v["spearman"]
        verdict = "validated (interval above 0)" if f["low"] > 0 else "not validated (interval includes 0)"
        print(f"  {name:16s} ρ = {f['rho']:+.3f} [{f['low']:+.3f}, {f['high']:+.3f}]  "
              f"{v['seconds_per_episode']:.1f} s per episode  {verdict}", flush=True)


class Study:
    def __init__(self, args):
        self.args = args
        self.cfg = load_config(args.config)
        self.device = torch.device(args.device)
        self.data = load_prepared(args.data, args.manifest)
        self.fp32, meta = models.load_checkpoint(args.fp32, self.cfg["model"]["arch"])
        self.sigma = float(meta["sigma"])
        self.costs, self.rules = policy.for_config(self.cfg)
        self.classes = len(self.data.manifest["classes"])
        self.train = train.first_images(self.data.train, self.cfg["search"]["finetune"]["train_images"])
        self.caches: dict[int, irs.Cache] = {}
        self.fingerprint = {"config_hash": config_hash(self.cfg), "fp32_sha256": sha256_file(args.fp32),
                            **{k: getattr(args, k) for k in ("budget", "pool", "policies", "seed", "outcome_images",
                                                              "outcome_n")},
                            "proxies": {k: list(v) for k, v in PROXIES.items()}}

    def cache(self, images: int) -> irs.Cache:
        """The FP32 model's IRS cache of ``images`` class-balanced val images (built once, kept beside --out)."""
        if images not in self.caches:
            path = Path(f"{self.args.out}.cache{images}.pt")
            ic = self.cfg["irs"]
            if path.exists():
                self.caches[images] = irs.Cache.load(path, {"model_sha256": self.fingerprint["fp32_sha256"]})
            else:
                pos = balanced_positions(self.data.val.y, images)
                t0 = time.perf_counter()
                c = irs.build_cache(Engine.from_config(self.cfg).prepare(copy.deepcopy(self.fp32), self.device),
                                    to_unit(self.data.val.x[pos]), self.data.val.y[pos], pos.tolist(), self.sigma,
                                    ic["n0"], ic["n"], ic["alpha"], ic["seed"], ic["chunk"], ic["chunks_per_batch"],
                                    {"model_sha256": self.fingerprint["fp32_sha256"], "split": "val"})
                c.save(path)
                print(f"FP32 IRS cache: {images} val images × {ic['n']} samples in {time.perf_counter() - t0:.0f} s",
                      flush=True)
                self.caches[images] = c
        return self.caches[images]

    def evaluator(self, name: str) -> EpisodeEvaluator:
        cfg = proxy_config(self.cfg, name)
        reward = PROXIES[name][3]
        if reward == "haq":
            pos = balanced_positions(self.data.val.y, cfg["search"]["haq_images"])
            val = Split(self.data.val.x[pos], self.data.val.y[pos])
            return EpisodeEvaluator(self.fp32, cfg, self.sigma, self.train, val, self.classes, self.device, "haq", self.args.seed)
        cache = self.cache(cfg["irs"]["images"])
        val = Split(self.data.val.x[cache.idx], self.data.val.y[cache.idx])
        return EpisodeEvaluator(self.fp32, cfg, self.sigma, self.train, val, self.classes, self.device, "arq", self.args.seed,
                                cache)

    def reward_images(self) -> int:
        """Per class, how many val images any reward set takes (the outcome skips them)."""
        counts = [proxy_config(self.cfg, n)["irs"]["images"] for n in PROXIES if PROXIES[n][3] == "arq"]
        counts += [proxy_config(self.cfg, n)["search"]["haq_images"] for n in PROXIES if PROXIES[n][3] == "haq"]
        return -(-max(counts) // self.classes)

    def outcome(self, layers: dict) -> dict:
        """The policy's certified ACR after the profile's final finetune, on val images no reward uses."""
        doc = policy.make(layers, self.costs, self.rules, "proxy-outcome study")
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            train.finetune(self.cfg, self.sigma, self.args.fp32, doc, self.data, t / "model.pt", t / "resume.pt",
                           t / "finetune.csv", t / "finetune.json", self.device, "fidelity", log=lambda *_: None)
            model, _ = models.load_checkpoint(t / "model.pt", self.cfg["model"]["arch"])
            finetuned = json.loads((t / "finetune.json").read_text())["final_noisy_val_acc"]
        t_ft = time.perf_counter() - t0
        pos = balanced_positions(self.data.val.y, self.args.outcome_images, skip=self.reward_images())
        x, y = to_unit(self.data.val.x[pos]).to(self.device), self.data.val.y[pos]
        run = Engine.from_config(self.cfg).prepare(model, self.device)
        smooth = Smooth(run, self.classes, self.sigma, batch_size=self.cfg["certify"]["batch_size"])
        cc = self.cfg["certify"]
        t0 = time.perf_counter()
        radii, correct = [], []
        for i in range(len(pos)):
            cert = smooth.certify(x[i], cc["n0"], self.args.outcome_n, cc["alpha"],
                                  rng.generator("fidelity-outcome", self.args.seed, int(pos[i]), device=self.device))
            radii.append(round(cert.radius, 6))
            correct.append(int(cert.prediction == int(y[i])))
        terms = [r * c for r, c in zip(radii, correct)]
        return {"outcome_acr": float(np.mean(terms)), "outcome_clean": float(np.mean(correct)),
                "outcome_radii": radii, "outcome_correct": correct, "finetune_noisy_val_acc": finetuned,
                "seconds_finetune": round(t_ft, 1), "seconds_certify": round(time.perf_counter() - t0, 1)}

    # ------------------------------------------------------------------------------------------ resumable steps
    def _read(self, path: Path) -> list[dict]:
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line of a killed run: dropped, and that policy redone
                write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
                break
        if rows and any(r.get("fingerprint") != self.fingerprint for r in rows):
            raise SystemExit(f"{path} was written with other settings; move it away to start afresh")
        return rows

    def pool(self) -> list[dict]:
        path = Path(f"{self.args.out}.pool.jsonl")
        rows = self._read(path)
        candidates = diverse_policies(self.costs, self.rules, self.args.budget, self.args.pool, self.args.seed)
        evaluate = self.evaluator("today") if len(rows) < len(candidates) else None
        with path.open("a") as f:
            for k in range(len(rows), len(candidates)):
                t0 = time.perf_counter()
                reward, info = evaluate(candidates[k])
                rows.append({"fingerprint": self.fingerprint, "policy": k, "reward": reward,
                             "bitops_pct": cost.bitops_pct(self.costs, candidates[k]), "layers": candidates[k]})
                f.write(json.dumps(rows[-1]) + "\n")
                f.flush()
                print(f"pool {k + 1}/{len(candidates)}: reward {reward:+.4f} ({time.perf_counter() - t0:.1f} s)",
                      flush=True)
        return rows

    def rows(self, pool: list[dict]) -> list[dict]:
        chosen = spread([r["reward"] for r in pool], self.args.policies)
        path = Path(f"{self.args.out}.rows.jsonl")
        rows = self._read(path)
        done = {r["policy"] for r in rows}
        evaluators = {}
        with path.open("a") as f:
            for n, k in enumerate(chosen):
                if k in done:
                    continue
                layers = pool[k]["layers"]
                row = {"fingerprint": self.fingerprint, "policy": k, "bitops_pct": pool[k]["bitops_pct"],
                       "w_bits": [layers[n_]["w_bits"] for n_ in self.rules.layers],
                       "a_bits": [layers[n_]["a_bits"] for n_ in self.rules.layers], "proxies": {}}
                for name in PROXIES:
                    evaluators.setdefault(name, self.evaluator(name))
                    t0 = time.perf_counter()
                    reward, info = evaluators[name](layers)
                    row["proxies"][name] = {"reward": reward, "seconds": round(time.perf_counter() - t0, 2),
                                            **{k_: v for k_, v in info.items() if k_ != "seconds"}}
                row.update(self.outcome(layers))
                rows.append(row)
                f.write(json.dumps(row) + "\n")
                f.flush()
                print(f"policy {n + 1}/{len(chosen)} (pool #{k}): outcome ACR {row['outcome_acr']:.4f}; rewards "
                      + ", ".join(f"{p} {v['reward']:+.4f}" for p, v in row["proxies"].items())
                      + f"; finetune {row['seconds_finetune']:.0f} s, certify {row['seconds_certify']:.0f} s",
                      flush=True)
        return rows

    def summary(self, pool: list[dict], rows: list[dict]) -> dict:
        outcome = [r["outcome_acr"] for r in rows]
        sc = self.cfg["search"]
        fmt = {"steps": sc["finetune"]["steps"], "lr": sc["finetune"]["lr"], "images": self.cfg["irs"]["images"]}
        proxies = {}
        for name in PROXIES:
            fid = spearman_interval([r["proxies"][name]["reward"] for r in rows], outcome, self.args.resamples,
                                    self.args.seed)
            proxies[name] = {"description": DESCRIPTIONS[name].format(**fmt), "spearman": fid,
                             "seconds_per_episode": round(float(np.mean([r["proxies"][name]["seconds"]
                                                                         for r in rows])), 2),
                             "settings": {"finetune": PROXIES[name][0], "search": PROXIES[name][1],
                                          "irs": PROXIES[name][2], "reward": PROXIES[name][3]}}
        result = {"proxies": proxies, "policies": len(rows), "pool": len(pool), "bits": bits_fidelity(rows, PROXIES),
                "outcome": {"images": self.args.outcome_images, "n0": self.cfg["certify"]["n0"],
                            "n": self.args.outcome_n, "alpha": self.cfg["certify"]["alpha"],
                            "skip_per_class": self.reward_images(), "finetune": self.cfg["finetune"],
                            "acr_range": [min(outcome), max(outcome)]},
                "rows": [{k: v for k, v in r.items() if k != "fingerprint"} for r in rows],
                "pool_rewards": [round(r["reward"], 6) for r in pool]}
        print_table(result)
        return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config")
    ap.add_argument("--fp32")
    ap.add_argument("--data")
    ap.add_argument("--manifest")
    ap.add_argument("--combine", nargs="+", metavar="SUMMARY",
                    help="instead of running: pool the summaries of batches run with other --seed into --out")
    ap.add_argument("--budget", type=float, default=1.0, help="BitOps budget, %% of FP32")
    ap.add_argument("--pool", type=int, default=42, help="policies scored by today's proxy")
    ap.add_argument("--policies", type=int, default=14, help="of them, at evenly spaced ranks, taken to the outcome")
    ap.add_argument("--outcome-images", type=int, default=100, help="class-balanced val images, none in a reward set")
    ap.add_argument("--outcome-n", type=int, default=2000, help="CERTIFY samples per outcome image")
    ap.add_argument("--resamples", type=int, default=10000, help="bootstrap resamples of the ρ interval")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="the summary JSON; resume files are kept beside it")
    args = ap.parse_args()
    if args.combine:
        result = combine([json.loads(Path(p).read_text()) for p in args.combine], args.resamples, args.seed)
        print(f"{result['policies']} policies from batches {result['batches']}; Spearman ρ with the outcome ACR "
              "[95% bootstrap, stratified by batch]:")
        print_table(result)
        write_json(args.out, {**result, "git_commit": git_commit(), "args": vars(args)})
        return
    missing = [k for k in ("config", "fp32", "data", "manifest") if getattr(args, k) is None]
    if missing:
        ap.error("a run needs " + ", ".join(f"--{k}" for k in missing) + " (or --combine)")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    study = Study(args)
    pool = study.pool()
    rows = study.rows(pool)
    print(f"\n{len(rows)} policies at {args.budget}% BitOps, σ={study.sigma}; outcome: final finetune + CERTIFY "
          f"N={args.outcome_n} on {args.outcome_images} val images; Spearman ρ with the outcome ACR [95% bootstrap]:")
    result = study.summary(pool, rows)
    write_json(args.out, {**result, "budget_pct": args.budget, "sigma": study.sigma, "profile": study.cfg["profile"],
                          "config_hash": config_hash(study.cfg), "device": device_name(study.device),
                          "torch": str(torch.__version__), "git_commit": git_commit(),
                          "wall_seconds_this_run": round(time.perf_counter() - start, 1),
                          "args": vars(args)})


if __name__ == "__main__":
    main()
