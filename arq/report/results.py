"""Certification results as the report reads them: one record per (method, σ) from the certify stage's text
outputs (summary JSON + Cohen-format TSV) and, for quantized models, the policy that produced them.

Method ids are the pipeline's model names: ``fp32``, ``uniform_w4a4``, ``hawq_b1.5``, ``arq_b1.5``, …
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from arq.smoothing import ABSTAIN, read_tsv

FAMILIES = {"fp32": "FP32", "uniform": "Uniform", "hawq": "HAWQ-V3", "haq": "HAQ", "random": "Random search",
            "arq": "ARQ"}
ORDER = list(FAMILIES)  # table order: references, baselines, the control, then ARQ


def family(method: str) -> str:
    return method.split("_", 1)[0]


def budget(method: str) -> float | None:
    m = re.search(r"_b([0-9]+\.[0-9]+)$", method)
    return float(m.group(1)) if m else None


def display_name(method: str, budgets: int = 1) -> str:
    """What a reader sees: 'Uniform W4A4', 'HAWQ-V3', 'ARQ (3.0%)' when a profile sweeps several budgets."""
    fam = family(method)
    if fam not in FAMILIES:
        return method
    if fam == "uniform":
        return f"Uniform {method.split('_', 1)[1].upper()}"
    b = budget(method)
    return FAMILIES[fam] + (f" ({b:g}%)" if b is not None and budgets > 1 else "")


def sort_key(method: str) -> tuple:
    """Table order: by family, then budget; uniform models from the most bits to the fewest (W8A8 before W4A4)."""
    fam = family(method)
    m = re.fullmatch(r"uniform_w(\d+)a(\d+)", method)
    bits = (-int(m.group(1)), -int(m.group(2))) if m else (0, 0)
    return (ORDER.index(fam) if fam in ORDER else len(ORDER), budget(method) or 0.0, bits, method)


@dataclass
class Result:
    method: str
    sigma: float
    summary: dict
    idx: np.ndarray
    radius: np.ndarray
    correct: np.ndarray
    abstain: np.ndarray
    policy: dict | None = field(default=None)
    reward_cache_seconds: float = 0.0  # the FP32 IRS cache a certified-reward search scores against

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


def policy_for(method: str, sigma: float, policies: list[str | Path]) -> str | None:
    """The policy file of a quantized model among ``policies`` (uniform ones hold for every σ)."""
    if method == "fp32":
        return None
    from arq.config import sigma_tag

    names = {f"{method}.json", f"{method}_sigma{sigma_tag(sigma)}.json"}
    for p in policies:
        if Path(p).name in names:
            return str(p)
    raise ValueError(f"no policy given for {method} at σ={sigma:g} (looked for {' or '.join(sorted(names))})")
