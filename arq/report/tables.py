"""The comparison table: one row per (σ, method) with intervals, and paired tests against ARQ and FP32.

A method run with several seeds is a row of means over its seeds, with its SD across seeds and hierarchical
bootstrap intervals (arq.report.stats); the CSV also keeps a row per seed. With one seed a row is exactly the
single model's: Clopper–Pearson for accuracies, the image bootstrap for ACR, McNemar in the paired tests.
Radii beyond what N samples can certify (``max_certifiable_radius``) are left out: every method is 0 there.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from arq.report import stats
from arq.layout import parse
from arq.report.results import Group, budget, display_name, family, sort_key


def radii_shown(radii: list[float], max_radius: float) -> list[float]:
    return [r for r in radii if r <= max_radius]


def _budgets(groups: list[Group]) -> int:
    return len({budget(g.method) for g in groups if budget(g.method) is not None})


def _measured(radii: list[float], g: Group) -> list[float]:
    return [0.0] + [r for r in radii_shown(radii, g.summary["max_certifiable_radius"]) if r > 0]


def _sd(per_seed: np.ndarray) -> float:
    return float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else math.nan


def group_row(g: Group, radii: list[float], resamples: int, seed: int, nb: int) -> dict:
    """BitOps, mean bits, clean and certified accuracy, ACR (with intervals; SD across seeds), abstain, times."""
    n, seeds = len(g.idx), len(g.runs)
    w_bits, a_bits = g.mean_bits()
    row = {"sigma": g.sigma, "method": g.method, "seed": g.seeds[0] if seeds == 1 else None, "seeds": seeds,
           "name": display_name(g.method, nb), "bitops_pct": g.summary["bitops_pct"], "w_bits": w_bits,
           "a_bits": a_bits, "images": n, "N": g.summary["n"], "alpha": g.summary["alpha"]}
    for r in _measured(radii, g):
        key = "clean" if r == 0 else f"r={r:g}"
        table = g.certified(r)
        if seeds == 1:
            lo, hi = stats.clopper_pearson(int(table.sum()), n)
        else:
            lo, hi = stats.bootstrap_mean(table, resamples, seed)
        row.update({key: float(table.mean()), f"{key}_lo": lo, f"{key}_hi": hi, f"{key}_sd": _sd(table.mean(1))})
    lo, hi = stats.bootstrap_mean(g.acr_terms, resamples, seed)
    row.update({"ACR": float(g.acr_terms.mean()), "ACR_lo": lo, "ACR_hi": hi, "ACR_sd": _sd(g.acr_terms.mean(1)),
                "abstain": float(g.abstain.mean()), "policy_seconds": g.policy_seconds(),
                "certify_seconds": float(np.mean([r.summary["wall_seconds"] for r in g.runs]))})
    return row


def main_table(groups: list[Group], radii: list[float], resamples: int, seed: int) -> pd.DataFrame:
    """One row per (σ, method): means over its seeds (see ``group_row``)."""
    nb = _budgets(groups)
    return pd.DataFrame([group_row(g, radii, resamples, seed, nb) for g in groups])


def seed_table(groups: list[Group], radii: list[float], resamples: int, seed: int) -> pd.DataFrame:
    """The CSV's rows: every model (method and seed) on its own, then the across-seed row of every method with
    several seeds (its ``seed`` empty)."""
    nb = _budgets(groups)
    rows = [group_row(Group(g.method, g.sigma, [run]), radii, resamples, seed, nb) for g in groups for run in g.runs]
    rows += [group_row(g, radii, resamples, seed, nb) for g in groups if len(g.runs) > 1]
    out = pd.DataFrame(rows)
    out["seed"] = out["seed"].astype("Int64")
    return out


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


def paired_tables(a: Group, b: Group, measure) -> tuple[np.ndarray, np.ndarray, list]:
    """``measure(group)`` of both as seeds × images tables with row k of each from the same seed: the seeds both
    have, or all of ``a``'s against a reference with a single seedless model (FP32)."""
    ta, tb = measure(a), measure(b)
    if b.seeds == [None]:
        return ta, np.broadcast_to(tb, ta.shape), a.seeds
    common = [s for s in a.seeds if s in b.seeds]
    if not common:
        raise ValueError(f"{a.method} (seeds {a.seeds}) and {b.method} (seeds {b.seeds}) at σ={a.sigma:g} share "
                         "no seed; paired tests need the same seeds")
    return ta[[a.seeds.index(s) for s in common]], tb[[b.seeds.index(s) for s in common]], common


TEST_COLUMNS = ["sigma", "method", "vs", "reference", "seeds", "measure", "test", "diff", "low", "high", "only_method",
                "only_reference", "p"]


def compare(g: Group, ref: Group, vs: str, radii: list[float], resamples: int, seed: int) -> list[dict]:
    """``g`` against ``ref`` on the same images and seeds: with one seed, McNemar on clean and certified-at-r; with
    several, the paired hierarchical bootstrap; the paired (hierarchical) bootstrap on ACR. Differences are
    g − ref."""
    if not np.array_equal(g.idx, ref.idx):
        raise ValueError(f"{g.method} and {ref.method} at σ={g.sigma:g} were certified on different "
                         "images; paired tests need the same images")
    base = {"sigma": g.sigma, "method": g.method, "vs": vs, "reference": ref.method}
    rows = []
    for r in _measured(radii, g):
        a, b, common = paired_tables(g, ref, lambda x: x.certified(r))
        measure = "clean" if r == 0 else f"r={r:g}"
        if len(common) == 1:
            t = stats.mcnemar(a[0], b[0])
            rows.append({**base, "seeds": 1, "measure": measure, "test": "McNemar (exact)", "diff": t["diff"],
                         "low": math.nan, "high": math.nan, "only_method": t["only_a"],
                         "only_reference": t["only_b"], "p": t["p"]})
        else:
            t = stats.paired_bootstrap(a, b, resamples, seed)
            rows.append({**base, "seeds": len(common), "measure": measure,
                         "test": "paired hierarchical bootstrap", "diff": t["diff"], "low": t["low"],
                         "high": t["high"], "only_method": math.nan, "only_reference": math.nan, "p": t["p"]})
    a, b, common = paired_tables(g, ref, lambda x: x.acr_terms)
    t = stats.paired_bootstrap(a, b, resamples, seed)
    rows.append({**base, "seeds": len(common), "measure": "ACR",
                 "test": "paired bootstrap" if len(common) == 1 else "paired hierarchical bootstrap",
                 "diff": t["diff"], "low": t["low"], "high": t["high"], "only_method": math.nan,
                 "only_reference": math.nan, "p": t["p"]})
    return rows


def paired_tests(groups: list[Group], radii: list[float], resamples: int, seed: int) -> pd.DataFrame:
    """Every method against ARQ and against FP32 on the same images and seeds (``compare``)."""
    by_key = {(g.method, g.sigma): g for g in groups}
    rows = []
    for g in groups:
        for vs, ref_method in reference_for(g.method, g.sigma, by_key).items():
            rows += compare(g, by_key[(ref_method, g.sigma)], vs, radii, resamples, seed)
    return pd.DataFrame(rows, columns=TEST_COLUMNS)


PLAIN_BASE = "plain base"


def robust_tables(groups: list[Group], radii: list[float], resamples: int, seed: int
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The robust-base question: every method made from a robust base (``fp32_symreg``, ``arq_b1.0_satnl``, …)
    beside the same method from the plain base, and paired tests robust − plain on the shared seeds and images.
    Rows: per σ and method, the plain base's model first, then each robust base's (arq.variants.BASES order)."""
    from arq.variants import BASES

    by_key = {(g.method, g.sigma): g for g in groups}
    robust = [g for g in groups if parse(g.method).base != "fp32"]
    nb = _budgets(groups)
    rows, tests = [], []
    arms = sorted({(g.sigma, parse(g.method).plain) for g in robust}, key=lambda k: (k[0], sort_key(k[1])))
    for sigma, plain in arms:
        ref = by_key.get((plain, sigma))
        if ref is None:
            raise ValueError(f"the robust bases' {plain} at σ={sigma:g} has no plain-base counterpart to be compared "
                             "with: certify the plain base's model too")
        rows.append({**group_row(ref, radii, resamples, seed, nb), "base": "fp32"})
        for g in sorted((g for g in robust if g.sigma == sigma and parse(g.method).plain == plain),
                        key=lambda g: BASES.index(parse(g.method).base)):
            rows.append({**group_row(g, radii, resamples, seed, nb), "base": parse(g.method).base})
            tests += compare(g, ref, PLAIN_BASE, radii, resamples, seed)
    return pd.DataFrame(rows), pd.DataFrame(tests, columns=TEST_COLUMNS)


# ------------------------------------------------------------------------------------------------ formatting

def _measures(df: pd.DataFrame) -> list[str]:
    return ["clean"] + [c for c in df.columns if c.startswith("r=") and not c.endswith(("_lo", "_hi", "_sd"))]


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
        seeded = int(part["seeds"].max()) > 1
        intervals = ("Clopper–Pearson for accuracies, bootstrap for ACR" if not seeded else
                     "Clopper–Pearson for one-seed accuracies, otherwise a hierarchical bootstrap over seeds and "
                     "images; means over seeds, SD across seeds")
        out += [f"## σ = {sigma:g}", "",
                f"{int(part['images'].iloc[0])} test images, N = {int(part['N'].iloc[0]):,}, "
                f"α = {part['alpha'].iloc[0]:g}; 95% intervals ({intervals}).", ""]
        head = ["method"] + (["seeds"] if seeded else []) + ["BitOps %", "w̄ / ā bits"] + \
            [("clean acc." if m == "clean" else f"cert. acc. {m}") for m in measures] + ["ACR"] + \
            (["ACR SD"] if seeded else []) + ["abstain", "policy time"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for _, row in part.iterrows():
            cells = [row["name"]] + ([str(int(row["seeds"]))] if seeded else []) + \
                [f"{row['bitops_pct']:.3f}", f"{row['w_bits']:.2f} / {row['a_bits']:.2f}"]
            cells += [f"{row[m]:.3f} ({row[m + '_lo']:.3f}–{row[m + '_hi']:.3f})" for m in measures]
            cells += [f"{row['ACR']:.3f} ({row['ACR_lo']:.3f}–{row['ACR_hi']:.3f})"]
            if seeded:
                cells.append("–" if math.isnan(row.get("ACR_sd", math.nan)) else f"{row['ACR_sd']:.3f}")
            cells += [f"{row['abstain']:.3f}", _seconds(row.get("policy_seconds"))]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        for vs in ("ARQ", "FP32", PLAIN_BASE):
            t = tests[(tests["sigma"] == sigma) & (tests["vs"] == vs)]
            if t.empty:
                continue
            ms = list(dict.fromkeys(t["measure"]))
            names = part.set_index("method")["name"]
            how = ("McNemar exact for accuracies, paired bootstrap for ACR" if not seeded else
                   "McNemar exact for one-seed accuracies, otherwise paired hierarchical bootstrap over the shared "
                   "seeds and images")
            out += [f"Paired differences, method − reference (p: {how}):", "", "| method | reference | " + " | ".join(f"Δ {m}" for m in ms) + " |",
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
