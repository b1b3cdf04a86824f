"""Certification results as the report reads them: one record per model (method, seed) and σ from the certify
stage's text outputs (summary JSON + Cohen-format TSV) and, for quantized models, the policy that produced them;
and one ``Group`` per method and σ over its seeds, which is what tables and figures show.

Model names are the pipeline's (``arq.layout``): ``fp32``, ``uniform_w4a4_s0``, ``hawq_b1.0_s1``, ``arq_b1.0_s2``, …;
a method is the name without its seed (``arq_b1.0``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from arq.layout import parse, policy_name
from arq.records import read_tsv
from arq.smoothing import ABSTAIN

FAMILIES = {"fp32": "FP32", "uniform": "Uniform", "hawq": "HAWQ-V3", "haq": "HAQ", "random": "Random search",
            "arq": "ARQ"}
ORDER = list(FAMILIES)  # table order: references, baselines, the control, then ARQ
BASE_LABELS = {"fp32": "", "fp32_symreg": "SymReg", "fp32_satnl": "SatNL", "fp32_symreg_satnl": "SymReg+SatNL"}


def family(name: str) -> str:
    return parse(name).family


def budget(name: str) -> float | None:
    return parse(name).budget


def display_name(name: str, budgets: int = 1) -> str:
    """What a reader sees: 'Uniform W4A4', 'HAWQ-V3', 'ARQ (3.0%)' when a profile sweeps several budgets; a model
    from a robust base says which ('ARQ [SymReg+SatNL]', 'FP32 [SatNL]')."""
    n = parse(name)
    if n.family not in FAMILIES:
        return n.method
    base = f" [{BASE_LABELS[n.base]}]" if n.base != "fp32" else ""
    if n.family == "uniform":
        return f"Uniform {(n.variant or '').upper()}{base}"
    return FAMILIES[n.family] + (f" ({n.budget:g}%)" if n.budget is not None and budgets > 1 else "") + base


def sort_key(name: str) -> tuple:
    """Table order: by family, then budget; uniform models from the most bits to the fewest (W8A8 before W4A4),
    then by seed."""
    n = parse(name)
    bits = (0, 0)
    if n.family == "uniform" and n.variant:
        w, a = n.variant[1:].split("a")
        bits = (-int(w), -int(a))
    return (ORDER.index(n.family) if n.family in ORDER else len(ORDER), n.budget or 0.0, bits, n.method,
            -1 if n.seed is None else n.seed)


@dataclass
class Result:
    """One certified model: ``method`` is its full name (with the seed)."""

    method: str
    sigma: float
    summary: dict
    idx: np.ndarray
    radius: np.ndarray
    correct: np.ndarray
    abstain: np.ndarray
    policy: dict | None = field(default=None)
    reward_cache_seconds: float = 0.0  # the FP32 IRS cache a certified-reward search scores against

    @property
    def seed(self) -> int | None:
        return parse(self.method).seed

    def certified(self, r: float) -> np.ndarray:
        """Per image: correct and certified at radius ≥ r (r = 0: correct, the clean smoothed accuracy)."""
        return self.correct & (self.radius >= r)

    @property
    def acr_terms(self) -> np.ndarray:
        return np.where(self.correct, self.radius, 0.0)

    def policy_seconds(self) -> float | None:
        """Wall time spent producing the policy: search episodes (plus the FP32 IRS cache when the reward is
        certified against it), or Hessian + ILP; 0 for uniform; None for FP32."""
        if self.policy is None:
            return None
        p = self.policy
        if "seconds_per_episode" in p:
            cache = self.reward_cache_seconds if p.get("reward_kind") == "arq" else 0.0
            return float(sum(p["seconds_per_episode"].values()) * p["episodes"]) + cache
        return float(p.get("seconds_to_policy", 0.0))

    def mean_bits(self) -> tuple[float, float]:
        """Weight bits per weight (storage / weights) and MAC-weighted activation bits; 32 for FP32."""
        if self.policy is None:
            return 32.0, 32.0
        from arq import cost

        costs = cost.for_arch(self.policy["architecture"])
        layers = self.policy["layers"]
        w = sum(c.weights * layers[c.name]["w_bits"] for c in costs) / sum(c.weights for c in costs)
        a = sum(c.macs * layers[c.name]["a_bits"] for c in costs) / sum(c.macs for c in costs)
        return w, a


@dataclass
class Group:
    """One method at one σ over its seeds: the runs certified the same images, so its per-image values form a
    seeds × images table (one row for FP32). Means are over seeds and images; costs are means over seeds (a
    search's policy, and so its BitOps, differ from seed to seed)."""

    method: str  # without the seed
    sigma: float
    runs: list[Result]

    def __post_init__(self):
        self.runs = sorted(self.runs, key=lambda r: -1 if r.seed is None else r.seed)
        for r in self.runs[1:]:
            if not np.array_equal(r.idx, self.runs[0].idx):
                raise ValueError(f"{r.method} and {self.runs[0].method} at σ={self.sigma:g} were certified on "
                                 "different images; the seeds of a method must share them")

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]

    @property
    def idx(self) -> np.ndarray:
        return self.runs[0].idx

    @property
    def policy(self) -> dict | None:
        return self.runs[0].policy

    @cached_property
    def summary(self) -> dict:
        """The first run's summary with the BitOps averaged over seeds."""
        return {**self.runs[0].summary, "bitops_pct": float(np.mean([r.summary["bitops_pct"] for r in self.runs]))}

    def certified(self, r: float) -> np.ndarray:
        """seeds × images: correct and certified at radius ≥ r."""
        return np.stack([run.certified(r) for run in self.runs])

    @property
    def acr_terms(self) -> np.ndarray:
        return np.stack([run.acr_terms for run in self.runs])

    @property
    def abstain(self) -> np.ndarray:
        return np.stack([run.abstain for run in self.runs])

    def policy_seconds(self) -> float | None:
        seconds = [run.policy_seconds() for run in self.runs]
        return None if seconds[0] is None else float(np.mean(seconds))

    def mean_bits(self) -> tuple[float, float]:
        w, a = zip(*(run.mean_bits() for run in self.runs))
        return float(np.mean(w)), float(np.mean(a))

    def layers(self) -> dict[str, dict[str, float]]:
        """Bits per layer, averaged over the seeds' policies."""
        names = list(self.policy["layers"])
        return {n: {k: float(np.mean([run.policy["layers"][n][k] for run in self.runs])) for k in ("w_bits", "a_bits")}
                for n in names}


def groups(results: list[Result]) -> list[Group]:
    """The results grouped by (method without seed, σ), in table order."""
    by: dict[tuple[str, float], list[Result]] = {}
    for r in results:
        by.setdefault((parse(r.method).method, r.sigma), []).append(r)
    return sorted((Group(m, s, runs) for (m, s), runs in by.items()), key=lambda g: (g.sigma, sort_key(g.method)))


def load(summary_path: str | Path, tsv_path: str | Path, policies: list[str | Path] = ()) -> Result:
    """One model's results; a quantized model's policy is found among ``policies`` by its file name."""
    s = json.loads(Path(summary_path).read_text())
    rows = read_tsv(tsv_path)
    if len(rows) != s["images"]:
        raise ValueError(f"{tsv_path} has {len(rows)} rows but {summary_path} summarises {s['images']} images")
    policy_path = policy_for(s["method"], float(s["sigma"]), list(policies))
    policy = json.loads(Path(policy_path).read_text()) if policy_path else None
    return Result(s["method"], float(s["sigma"]), s, np.array([int(r["idx"]) for r in rows]),
                  np.array([float(r["radius"]) for r in rows]), np.array([int(r["correct"]) == 1 for r in rows]),
                  np.array([int(r["predict"]) == ABSTAIN for r in rows]), policy)


def inconsistencies(summary_path: str | Path, tsv_path: str | Path, tolerance: float = 1e-6) -> list[str]:
    """What is wrong with a certification TSV on its own (a row whose correct flag disagrees with predict = label;
    an abstention with a radius or counted correct) and against its summary JSON (image count, clean and
    certified accuracies, ACR, abstain rate recomputed from the rows); each problem names the file. Empty:
    consistent."""
    from arq.records import summarize

    problems = []
    rows = read_tsv(tsv_path)
    for k, r in enumerate(rows, start=2):  # line numbers, the header being line 1
        try:
            label, predict, radius, correct = int(r["label"]), int(r["predict"]), float(r["radius"]), int(r["correct"])
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"{tsv_path}: line {k} cannot be read ({type(exc).__name__}: {exc})")
            continue
        if correct not in (0, 1) or bool(correct) != (predict == label):
            problems.append(f"{tsv_path}: line {k} (idx {r['idx']}): correct = {correct} but predict {predict}, "
                            f"label {label}")
        if predict == ABSTAIN and (radius != 0 or correct):
            problems.append(f"{tsv_path}: line {k} (idx {r['idx']}): an abstention with radius {radius} and "
                            f"correct = {correct}")
        if radius < 0:
            problems.append(f"{tsv_path}: line {k} (idx {r['idx']}): negative radius {radius}")
    if problems:
        return problems
    s = json.loads(Path(summary_path).read_text())
    if s.get("images") != len(rows):
        return [f"{summary_path} summarises {s.get('images')} images but {tsv_path} has {len(rows)} rows"]
    here = summarize(rows, [float(r) for r in s.get("certified_accuracy", {})])
    for key in ("clean_accuracy", "acr", "abstain_rate"):
        if abs(float(s[key]) - here[key]) > tolerance:
            problems.append(f"{summary_path}: {key} = {s[key]} but the rows of {tsv_path} give {here[key]:.6g}")
    for r, value in s.get("certified_accuracy", {}).items():
        if abs(float(value) - here["certified_accuracy"][f"{float(r):g}"]) > tolerance:
            problems.append(f"{summary_path}: certified accuracy at r={r} = {value} but the rows of {tsv_path} "
                            f"give {here['certified_accuracy'][f'{float(r):g}']:.6g}")
    return problems


def policy_for(method: str, sigma: float, policies: list[str | Path]) -> str | None:
    """The policy file of a quantized model among ``policies`` (uniform ones hold for every σ); None for a base."""
    if parse(method).family == "fp32":
        return None
    from arq.config import sigma_tag

    name = policy_name(method, sigma_tag(sigma))
    for p in policies:
        if Path(p).name == name:
            return str(p)
    raise ValueError(f"no policy given for {method} at σ={sigma:g} (looked for {name})")
