"""The comparison table: one row per (σ, method) with intervals, and paired tests against ARQ and FP32.

Radii beyond what N samples can certify (``max_certifiable_radius``) are left out: every method is 0 there.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from arq.report import stats
from arq.report.results import Result, budget, display_name, family, sort_key


def radii_shown(radii: list[float], max_radius: float) -> list[float]:
    return [r for r in radii if r <= max_radius]


def _budgets(results: list[Result]) -> int:
    return len({budget(r.method) for r in results if budget(r.method) is not None})


def main_table(results: list[Result], radii: list[float], resamples: int, seed: int) -> pd.DataFrame:
    """BitOps, mean bits, clean and certified accuracy (Clopper–Pearson), ACR (bootstrap), abstain, policy time."""
    nb = _budgets(results)
    rows = []
    for res in sorted(results, key=lambda r: (r.sigma, sort_key(r.method))):
        n = len(res.idx)
        w_bits, a_bits = res.mean_bits()
        row = {"sigma": res.sigma, "method": res.method, "name": display_name(res.method, nb),
               "bitops_pct": res.summary["bitops_pct"], "w_bits": w_bits, "a_bits": a_bits, "images": n,
               "N": res.summary["n"], "alpha": res.summary["alpha"]}
        for r in [0.0] + [r for r in radii_shown(radii, res.summary["max_certifiable_radius"]) if r > 0]:
            key = "clean" if r == 0 else f"r={r:g}"
            k = int(res.certified(r).sum())
            lo, hi = stats.clopper_pearson(k, n)
            row.update({key: k / n, f"{key}_lo": lo, f"{key}_hi": hi})
        lo, hi = stats.bootstrap_mean(res.acr_terms, resamples, seed)
        row.update({"ACR": float(res.acr_terms.mean()), "ACR_lo": lo, "ACR_hi": hi,
                    "abstain": float(res.abstain.mean()), "policy_seconds": res.policy_seconds(),
                    "certify_seconds": res.summary["wall_seconds"]})
        rows.append(row)
    return pd.DataFrame(rows)


def reference_for(method: str, sigma: float, by_key: dict) -> dict[str, str]:
    """Whom a row is tested against: ARQ at the same budget (else ARQ's first budget), and FP32. FP32 itself is
    the reference, not a method: its difference from ARQ is ARQ's from FP32 with the sign flipped."""
    if method == "fp32":
        return {}
    refs = {}
    arq = sorted((m for (m, s) in by_key if s == sigma and family(m) == "arq"), key=sort_key)
    same = [m for m in arq if budget(m) == budget(method)]
    if arq:
        refs["ARQ"] = (same or arq)[0]
    if ("fp32", sigma) in by_key:
        refs["FP32"] = "fp32"
    return {k: v for k, v in refs.items() if v != method}


TEST_COLUMNS = ["sigma", "method", "vs", "reference", "measure", "test", "diff", "low", "high", "only_method",
                "only_reference", "p"]


def paired_tests(results: list[Result], radii: list[float], resamples: int, seed: int) -> pd.DataFrame:
    """Every method against ARQ and against FP32 on the same images: McNemar on clean and certified-at-r,
    paired bootstrap on ACR. Differences are method − reference."""
    by_key = {(r.method, r.sigma): r for r in results}
    rows = []
    for res in sorted(results, key=lambda r: (r.sigma, sort_key(r.method))):
        for vs, ref_method in reference_for(res.method, res.sigma, by_key).items():
            ref = by_key[(ref_method, res.sigma)]
            if not np.array_equal(res.idx, ref.idx):
                raise ValueError(f"{res.method} and {ref_method} at σ={res.sigma:g} were certified on different "
                                 "images; paired tests need the same images")
            for r in [0.0] + [r for r in radii_shown(radii, res.summary["max_certifiable_radius"]) if r > 0]:
                t = stats.mcnemar(res.certified(r), ref.certified(r))
                rows.append({"sigma": res.sigma, "method": res.method, "vs": vs, "reference": ref_method,
                             "measure": "clean" if r == 0 else f"r={r:g}", "test": "McNemar (exact)",
                             "diff": t["diff"], "low": math.nan, "high": math.nan, "only_method": t["only_a"],
                             "only_reference": t["only_b"], "p": t["p"]})
            t = stats.paired_bootstrap(res.acr_terms, ref.acr_terms, resamples, seed)
            rows.append({"sigma": res.sigma, "method": res.method, "vs": vs, "reference": ref_method,
                         "measure": "ACR", "test": "paired bootstrap", "diff": t["diff"], "low": t["low"],
                         "high": t["high"], "only_method": math.nan, "only_reference": math.nan, "p": t["p"]})
    return pd.DataFrame(rows, columns=TEST_COLUMNS)


# ------------------------------------------------------------------------------------------------ formatting

def _measures(df: pd.DataFrame) -> list[str]:
    return ["clean"] + [c for c in df.columns if c.startswith("r=") and not c.endswith(("_lo", "_hi"))]


def _seconds(s) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "–"
    if s < 120:
        return f"{s:.0f} s"
    return f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def markdown(main: pd.DataFrame, tests: pd.DataFrame, title: str, notes: list[str]) -> str:
    out = [f"# {title}", ""]
    for sigma, part in main.groupby("sigma", sort=True):
        part = part.dropna(axis=1, how="all")
        measures = _measures(part)
        out += [f"## σ = {sigma:g}", "",
                f"{int(part['images'].iloc[0])} test images, N = {int(part['N'].iloc[0]):,}, "
                f"α = {part['alpha'].iloc[0]:g}; 95% intervals (Clopper–Pearson for accuracies, bootstrap for ACR).",
                ""]
        head = ["method", "BitOps %", "w̄ / ā bits"] + [("clean acc." if m == "clean" else f"cert. acc. {m}")
                                                        for m in measures] + ["ACR", "abstain", "policy time"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for _, row in part.iterrows():
            cells = [row["name"], f"{row['bitops_pct']:.3f}", f"{row['w_bits']:.2f} / {row['a_bits']:.2f}"]
            cells += [f"{row[m]:.3f} ({row[m + '_lo']:.3f}–{row[m + '_hi']:.3f})" for m in measures]
            cells += [f"{row['ACR']:.3f} ({row['ACR_lo']:.3f}–{row['ACR_hi']:.3f})", f"{row['abstain']:.3f}",
                      _seconds(row.get("policy_seconds"))]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        for vs in ("ARQ", "FP32"):
            t = tests[(tests["sigma"] == sigma) & (tests["vs"] == vs)]
            if t.empty:
                continue
            ms = list(dict.fromkeys(t["measure"]))
            names = part.set_index("method")["name"]
            out += [f"Paired differences, method − reference (p: McNemar exact for accuracies, paired bootstrap "
                    f"for ACR):", "", "| method | reference | " + " | ".join(f"Δ {m}" for m in ms) + " |",
                    "|" + "---|" * (len(ms) + 2)]
            for method, g in t.groupby("method", sort=False):
                reference = names[g["reference"].iloc[0]]
                g = g.set_index("measure")
                cells = []
                for m in ms:
                    d = g.loc[m]
                    ci = "" if math.isnan(d["low"]) else f" ({d['low']:+.3f}…{d['high']:+.3f})"
                    cells.append(f"{d['diff']:+.3f}{ci} p={_p(d['p'])}")
                out.append(f"| {names[method]} | {reference} | " + " | ".join(cells) + " |")
            out.append("")
    out += [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


TEX_SYMBOLS = {"α": r"$\alpha$", "σ": r"$\sigma$", "ℓ": r"$\ell$", "≤": r"$\leq$", "≥": r"$\geq$",
               "×": r"$\times$", "·": r"$\cdot$", "±": r"$\pm$", "–": "--", "—": "---", "’": "'"}


def _tex(text: str) -> str:
    """Plain text as pdfLaTeX reads it: special characters escaped, the Greek and maths we print in math mode."""
    out = []
    for ch in text:
        if ch in "%_&#$":
            out.append("\\" + ch)
        elif ch == "^":
            out.append(r"\textasciicircum{}")
        elif ch == "~":
            out.append(r"\textasciitilde{}")
        else:
            out.append(TEX_SYMBOLS.get(ch, ch))
    return "".join(out)


def latex(main: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs table a paper can \\input: each value with its 95% interval as +/− distances in small print
    (Clopper–Pearson intervals are asymmetric, and never cross 0 or 1)."""
    measures = _measures(main.dropna(axis=1, how="all"))
    cols = "ll" + "r" * (2 + len(measures) + 1)
    head = ["$\\sigma$", "Method", "BitOps (\\%)", "$\\bar b_w$/$\\bar b_a$"] + \
           [("Clean" if m == "clean" else f"$r={m[2:]}$") for m in measures] + ["ACR"]
    lines = [r"\begin{table}[t]", r"\centering", r"\small", f"\\begin{{tabular}}{{{cols}}}", r"\toprule",
             " & ".join(head) + r" \\", r"\midrule"]
    for i, (sigma, part) in enumerate(main.groupby("sigma", sort=True)):
        if i:
            lines.append(r"\midrule")
        for j, (_, row) in enumerate(part.iterrows()):
            cells = [f"{sigma:g}" if j == 0 else "", _tex(row["name"]), f"{row['bitops_pct']:.2f}",
                     f"{row['w_bits']:.1f}/{row['a_bits']:.1f}"]
            for m in measures + ["ACR"]:
                if m not in row or (isinstance(row[m], float) and math.isnan(row[m])):
                    cells.append("--")
                    continue
                up, down = row[f"{m}_hi"] - row[m], row[m] - row[f"{m}_lo"]
                cells.append(f"${row[m]:.3f}^{{+{up:.3f}}}_{{-{down:.3f}}}$")
            lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", f"\\caption{{{_tex(caption)}}}", f"\\label{{{label}}}",
              r"\end{table}"]
    return "\n".join(lines) + "\n"
