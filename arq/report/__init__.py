"""The report stage: the comparison table and the figures of one profile, from text results alone.

It reads the certify stage's summaries and TSVs, the policies and the search CSVs, so a reviewer can rebuild every
table and figure without a checkpoint. Modules: ``results`` (loading, method names), ``stats`` (intervals and
paired tests), ``tables`` (Markdown, CSV, LaTeX), ``figures``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from arq import layout
from arq.config import sigma_tag
from arq.io import atomic_path, write_text
from arq.report import figures, tables
from arq.report.results import Group, groups, load

CAVEAT = ("CIFAR-10 test subset; ResNet-20; fewer samples per image and shorter training than the paper's protocol "
          "unless the profile is 'paper'")


def _profile_note(config: dict, results: list[Group]) -> str:
    s = results[0].summary
    return (f"Profile '{config['profile']}': {s['images']} CIFAR-10 test images per model, N = {s['n']:,} noise "
            f"samples (N0 = {s['n0']}), α = {s['alpha']:g}; {config['model']['arch']}.")


TABLES = {"table_md": "table.md", "table_csv": "table.csv", "table_tex": "table.tex", "tests_csv": "tests.csv",
          "metrics": "metrics.json", "curves": "curves.csv"}
ROBUST_TABLES = {"robust_md": "robust.md", "robust_csv": "robust.csv", "robust_tests_csv": "robust_tests.csv"}
CURVE_STEP = 0.01  # radius grid of curves.csv
FIGURES = {"certified": "certified_accuracy", "bits": "bits_per_layer", "pareto": "acr_vs_bitops",
           "search": "search_curves", "sweep": "bit_width_sweep"}


def outputs(report_dir: str | Path, figures_dir: str | Path, searches: bool, quantized: bool = True,
            robust: bool = False, sweep: bool = False) -> dict:
    """The files the report writes: tables under ``report_dir``, figures (PNG, PDF) under ``figures_dir``; the
    bits figure only when there are quantized models, the search figure only when there are searches, the robust
    bases' tables when a robust base was certified, the bit-width sweep figure when the profile sweeps."""
    drawn = {"search": searches, "bits": quantized, "sweep": sweep}
    out = {k: str(Path(report_dir) / v) for k, v in {**TABLES, **(ROBUST_TABLES if robust else {})}.items()}
    out.update({k: (str(Path(figures_dir) / f"{v}.png"), str(Path(figures_dir) / f"{v}.pdf"))
                for k, v in FIGURES.items() if drawn.get(k, True)})
    return out


def is_robust(summary_path: str | Path) -> bool:
    """Whether a certification summary (``<model>_sigma<σ>.json``) is of a model made from a robust base."""
    return layout.parse(Path(summary_path).stem.rsplit("_sigma", 1)[0]).base != "fp32"


def metrics(main) -> dict:
    """The headline numbers per model and σ (``dvc metrics show``): cost, clean and certified accuracy, ACR."""
    keep = ["bitops_pct", "w_bits", "a_bits", "clean"] + [c for c in main.columns if c.startswith("r=") and
                                                          not c.endswith(("_lo", "_hi", "_sd"))] + ["ACR", "abstain"]
    return {f"{row['method']}_sigma{sigma_tag(row['sigma'])}": {k: round(float(row[k]), 6) for k in keep}
            for _, row in main.iterrows()}


def curve_table(results: list[Group]):
    """Certified accuracy against radius, one row per (σ, model, radius) on a grid of CURVE_STEP up to the largest
    certifiable radius: the data behind the certified-accuracy figure, for ``dvc plots``."""
    import numpy as np
    import pandas as pd

    rows = []
    for r in results:
        grid = np.arange(0.0, r.summary["max_certifiable_radius"] + CURVE_STEP / 2, CURVE_STEP)
        rows += [{"sigma": r.sigma, "model": f"{r.method}_sigma{sigma_tag(r.sigma)}", "radius": round(float(x), 6),
                  "certified_accuracy": float(r.certified(x).mean())} for x in grid]
    return pd.DataFrame(rows, columns=["sigma", "model", "radius", "certified_accuracy"])


def run(config: dict, summaries: list[str], tsvs: list[str], policies: list[str], search_csvs: list[str],
        out: dict, irs_caches: list[str] = (), sweeps: list[str] = ()) -> dict:
    """Write the comparison (``out``: table_md, table_csv, table_tex, tests_csv) and the figures (``out``:
    certified, bits when there are quantized models, pareto, and search when there are search CSVs; each a
    (png, pdf) pair). ``irs_caches``: summaries of the FP32 IRS caches, whose cost counts towards the policy time
    of the searches rewarded against them. Models made from a robust base (arq.variants) are left out of the
    comparison and shown beside their plain-base counterparts in the robust tables (``out``: robust_*); ``sweeps``:
    the bit-width sweep CSVs (``out``: sweep figure). Returns the tables."""
    if len(tsvs) != len(summaries):
        raise ValueError("each summary needs its TSV: --tsvs and --summaries must list the same number of files")
    results = [load(s, t, policies) for s, t in zip(summaries, tsvs)]
    cache_seconds = {}
    for path in irs_caches:
        c = json.loads(Path(path).read_text())
        cache_seconds[(c.get("base", "fp32"), float(c["sigma"]))] = float(c["wall_seconds"])
    for r in results:
        if r.policy is not None and r.policy.get("reward_kind") == "arq":
            key = (layout.parse(r.method).base, r.sigma)
            if key not in cache_seconds:
                raise ValueError(f"{r.method} at σ={r.sigma} was searched against the {key[0]} IRS cache, whose cost "
                                 f"is part of its policy time: give that cache's summary (--irs-caches)")
            r.reward_cache_seconds = cache_seconds[key]
    rc = config["report"]
    every = groups(results)  # one per method and σ, over its seeds
    grouped = [g for g in every if layout.parse(g.method).base == "fp32"]
    if len(grouped) < len(every):
        robust, robust_tests = tables.robust_tables(every, rc["radii"], rc["bootstrap"], rc["seed"])
        rb = config["robust_base"]
        write_text(out["robust_md"], tables.markdown(
            robust, robust_tests, f"Robust bases (profile {config['profile']})",
            [_profile_note(config, every),
             "Each method made from a robust base (SymReg: symmetry regularization, weight "
             f"{rb['symreg']['weight']:g}, pairing {rb['symreg']['pairing']}; SatNL: tanh weights with a learned "
             f"{rb['satnl']['scale']} bound" + (f", {'ASAM' if rb['sam']['adaptive'] else 'SAM'} ρ {rb['sam']['rho']:g}"
                                                 if rb["sam"] else "")
             + "; arq/variants, our reconstruction) beside the same method from the plain base: same seeds, same "
             "finetune, same images; its policy searched or allocated on its own base.",
             f"Intervals: {rc['bootstrap']:,} bootstrap resamples (seed {rc['seed']}); {CAVEAT}."]))
        for df, key in ((robust, "robust_csv"), (robust_tests, "robust_tests_csv")):
            with atomic_path(out[key]) as tmp:
                df.to_csv(tmp, index=False, float_format="%.6g")
    if sweeps:
        _sweep_figure(config, sweeps, out["sweep"])
    main = tables.main_table(grouped, rc["radii"], rc["bootstrap"], rc["seed"])
    per_seed = tables.seed_table(grouped, rc["radii"], rc["bootstrap"], rc["seed"])
    tests = tables.paired_tests(grouped, rc["radii"], rc["bootstrap"], rc["seed"])
    note = _profile_note(config, grouped)
    notes = [note, "w̄: weight bits per weight (storage / weights); ā: activation bits weighted by MACs.",
             "Policy time: search episodes (calibration, finetune, reward, agent), plus the FP32 IRS cache for the "
             "certified rewards (ARQ, random search); Hessian + ILP for HAWQ; on the device the stage ran on; "
             "uniform policies cost nothing.",
             f"Intervals: {rc['bootstrap']:,} bootstrap resamples (seed {rc['seed']}); {CAVEAT}."]
    seeds = sorted({len(g.runs) for g in grouped if g.policy is not None})
    if seeds and seeds[-1] > 1:
        notes.insert(1, "Quantized methods are means over their seeds (one search, finetune and certification per "
                        "seed; uniform and HAWQ-V3 models differ only in the finetune seed); table.csv keeps every "
                        "seed's row.")
    write_text(out["table_md"], tables.markdown(main, tests, f"Method comparison (profile {config['profile']})", notes))
    for df, key in ((per_seed, "table_csv"), (tests, "tests_csv")):
        with atomic_path(out[key]) as tmp:
            df.to_csv(tmp, index=False, float_format="%.6g")
    write_text(out["table_tex"], tables.latex(
        main, f"Certified robustness of quantized {config['model']['arch']} on CIFAR-10 (profile {config['profile']}): "
              f"clean and certified accuracy and ACR with 95% interval half-widths. {note}",
        f"tab:arq-{config['profile']}"))
    write_text(out["metrics"], json.dumps(metrics(main), indent=1) + "\n")
    with atomic_path(out["curves"]) as tmp:
        curve_table(grouped).to_csv(tmp, index=False, float_format="%.6g")
    arch = config["model"]["arch"]
    figures.certified_accuracy(grouped, *out["certified"], f"Certified accuracy, {arch} on CIFAR-10",
                               f"{note} Dotted line: the largest radius N samples can certify at α. {CAVEAT}.")
    if "bits" in out:
        if not any(r.policy is not None for r in grouped):
            raise ValueError("the bits-per-layer figure needs at least one quantized model's results")
        figures.bits_per_layer(grouped, *out["bits"], f"Bits per layer of each method's policy, {arch}",
                               f"Pinned first conv and last FC at {config['quant']['pinned_bits']} bits; a method "
                               f"with several seeds shows its seeds' mean bits. Profile '{config['profile']}'.")
    figures.pareto(main, *out["pareto"], f"ACR against cost, {arch} on CIFAR-10",
                   f"{note} ACR: the certified radius averaged over all images, 0 where the smoothed prediction is wrong or "
                   f"abstains. Error bars: 95% bootstrap intervals of ACR (over seeds and images for methods with "
                   f"several seeds); grey band: FP32's. Budgets swept: "
                   f"{', '.join(f'{b:g}%' for b in config['search']['budgets'])}. {CAVEAT}.")
    search_csvs = [p for p in search_csvs if layout.parse(Path(p).stem.rsplit("_sigma", 1)[0]).base == "fp32"]
    if search_csvs:
        curves = {}
        for path in search_csvs:
            name = Path(path).stem  # <method>_b<budget>_sigma<σ>
            method, sigma = name.rsplit("_sigma", 1)
            with open(path) as f:
                curves[(method, float(sigma))] = list(csv.DictReader(f))
        sc = config["search"]
        figures.search_curves(curves, *out["search"], f"Search learning curves, {arch}",
                              f"{sc['episodes']} episodes, the first {sc['warmup']} with random actions for DDPG; "
                              f"rewards after {sc['finetune']['steps']} QAT steps"
                              + (f" and BatchNorm re-estimation on {sc['finetune']['bn_images']} images"
                                 if sc['finetune']['bn_images'] else "")
                              + f". ARQ and random search share the certified reward on {config['irs']['images']} val "
                              f"images; HAQ's is clean top-1 on {sc['haq_images']} val images. "
                              + (f"One line per seed ({len(sc['seeds'])} seeds). " if len(sc["seeds"]) > 1 else "")
                              + f"Profile '{config['profile']}'.")
    return {"main": main, "tests": tests}


def _sweep_figure(config: dict, sweeps: list[str], files: tuple[str, str]) -> None:
    rows = [row for path in sweeps for row in csv.DictReader(open(path))]
    sw, fc = config["sweep"], config["finetune"]
    figures.sweep(rows, *files, f"Bit-width sweep of each base variant, {config['model']['arch']} on CIFAR-10",
                  f"Uniform policies (first conv and last FC at {config['quant']['pinned_bits']} bits). PTQ: calibration "
                  f"only; QAT: the shared finetune ({fc['epochs']} epochs on {fc['train_images'] or 'all'} images). "
                  f"Noisy val accuracy: the quantized base classifier on {fc['val_images'] or 'all'} val images under "
                  f"N(0, σ²) noise; smoothed clean accuracy and ACR: {sw['images']} certification images at "
                  f"N0 = {sw['n0']}, N = {sw['n']:,}, α = {config['certify']['alpha']:g}, one seed. "
                  f"Profile '{config['profile']}'. {CAVEAT}.")


def regenerate(config: dict, report_dir: str | Path | None = None, figures_dir: str | Path | None = None) -> dict:
    """Rebuild a profile's tables and figures from its text results alone (no checkpoint, no Snakemake), into its
    own report and figures directories unless others are given. Returns the files written."""
    inputs = layout.report_inputs(config)
    missing = [p for paths in inputs.values() for p in paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"profile {config['profile']!r} lacks {len(missing)} text result(s) the report reads, "
                                f"e.g. {', '.join(missing[:3])}: run its workflow first")
    out = outputs(report_dir or layout.report_dir(config), figures_dir or layout.figures_dir(config),
                  bool(inputs["search_csvs"]), bool(inputs["policies"]), any(map(is_robust, inputs["summaries"])),
                  bool(inputs["sweeps"]))
    run(config, inputs["summaries"], inputs["tsvs"], inputs["policies"], inputs["search_csvs"], out,
        inputs["irs_caches"], inputs["sweeps"])
    return out


def check(config: dict, scratch: str | Path) -> list[str]:
    """First the inputs: every certification TSV consistent with itself and with its summary JSON
    (``results.inconsistencies``, naming the file). Then regenerate into ``scratch`` and compare every table with
    the one in the profile's report directory, byte for byte. Returns the input problems, or else a unified diff per
    differing or missing table (empty: all consistent and identical). Figures are rebuilt too, so a broken figure
    fails, but not compared: their bytes depend on the matplotlib build."""
    import difflib

    from arq.report.results import inconsistencies

    inputs = layout.report_inputs(config)
    problems = [p + "\n" for s, t in zip(inputs["summaries"], inputs["tsvs"]) if Path(s).exists() and Path(t).exists()
                for p in inconsistencies(s, t)]
    if problems:
        return problems
    out = regenerate(config, Path(scratch) / "report", Path(scratch) / "figures")
    diffs = []
    for key, name in {**TABLES, **ROBUST_TABLES}.items():
        if key not in out:
            continue
        committed = Path(layout.report_dir(config)) / name
        if not committed.exists():
            diffs.append(f"{committed}: missing\n")
            continue
        old, new = committed.read_text(), Path(out[key]).read_text()
        if new != old:
            diffs.append("".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(committed),
                                                      f"regenerated {name}")))
    return diffs
