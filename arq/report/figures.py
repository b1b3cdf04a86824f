"""The report's figures, each written as PNG and PDF: certified accuracy vs radius, bits per layer, ACR vs
BitOps (the budget sweep), and the search learning curves.

Methods keep one style across figures (colour plus a line style and marker, so greyscale prints stay legible)
and appear under their display names. Captions state N, α, the image count and what the numbers are not.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on CI or clusters
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from arq.io import atomic_path  # noqa: E402
from arq.layout import parse  # noqa: E402
from arq.report.results import Group, budget, display_name, family, sort_key  # noqa: E402

STYLE = {  # family → (colour, line style, marker)
    "fp32": ("black", "-", None),
    "uniform": ("tab:gray", "--", "s"),
    "hawq": ("tab:green", "-.", "^"),
    "haq": ("tab:blue", ":", "o"),
    "random": ("tab:orange", (0, (5, 1, 1, 1)), "x"),
    "arq": ("tab:red", "-", "D"),
}


# the same family at another budget of a sweep: same colour, its own line and marker
BUDGET_VARIANTS = [("-", None), ("--", "*"), (":", "h"), ("-.", "p"), ((0, (3, 1, 1, 1, 1, 1)), "8")]
CAPTION_CHARS_PER_INCH = 17  # 7-pt text: a wrapped caption stays within the figure's width


def style(method: str, budgets: list[float] = ()) -> dict:
    """Colour, line style and marker of a method; ``budgets`` (all budgets drawn) tells apart one family's
    budgets by line style and marker."""
    colour, line, marker = STYLE.get(family(method), ("tab:purple", "-", "v"))
    if parse(method).method == "uniform_w8a8":
        colour, marker = "tab:brown", "P"
    b = budget(method)
    if b is not None and len(budgets) > 1:
        k = sorted(budgets).index(b) % len(BUDGET_VARIANTS)
        if k:
            line, marker = BUDGET_VARIANTS[k]
    return {"color": colour, "linestyle": line, "marker": marker}


def _save(fig, png: str | Path, pdf: str | Path, caption: str) -> None:
    """Writes PNG and PDF with the caption under the plot, wrapped to the figure's width; the saved area grows to
    take it (``bbox_inches="tight"``), so nothing is cut off. No creation date is stored, so the same results give
    the same bytes with the same matplotlib."""
    width = max(40, int(fig.get_figwidth() * CAPTION_CHARS_PER_INCH))
    fig.text(0.01, 0.0, "\n".join(textwrap.wrap(caption, width)), fontsize=7, va="top", ha="left")
    for path, undated in ((png, {}), (pdf, {"CreationDate": None})):
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=Path(path).suffix.lstrip("."), dpi=150, bbox_inches="tight", pad_inches=0.1,
                        metadata=undated)
    plt.close(fig)


def _by_sigma(results: list[Group]) -> dict[float, list[Group]]:
    out: dict[float, list[Group]] = {}
    for r in sorted(results, key=lambda r: (r.sigma, sort_key(r.method))):
        out.setdefault(r.sigma, []).append(r)
    return out


def _budgets(methods) -> list[float]:
    return sorted({budget(m) for m in methods if budget(m) is not None})


def certified_accuracy(results: list[Group], png, pdf, title: str, caption: str) -> list[tuple[str, list[str]]]:
    """One panel per σ, one curve per method; the x axis ends just past the largest radius N samples can certify,
    which is marked. Returns the panels drawn (title, curve labels) for tests."""
    panels = _by_sigma(results)
    budgets = _budgets(r.method for r in results)
    nb = len(budgets)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels) + 0.6, 4.4), squeeze=False, sharey=True)
    drawn = []
    for ax, (sigma, group) in zip(axes[0], panels.items()):
        r_max = max(r.summary["max_certifiable_radius"] for r in group)
        grid = np.linspace(0, r_max * 1.08, 300)
        labels = []
        for res in group:
            curve = [(res.certified(r)).mean() for r in grid]
            st = style(res.method, budgets)
            label = f"{display_name(res.method, nb)} ({res.summary['bitops_pct']:.3g}% BitOps)"
            ax.plot(grid, curve, color=st["color"], linestyle=st["linestyle"], marker=st["marker"], markevery=50,
                    markersize=5, label=label, linewidth=1.4)
            labels.append(label)
        ax.axvline(r_max, color="0.5", linewidth=0.8, linestyle=":")
        ax.text(r_max, 0.98, f" max. certifiable\n radius {r_max:.2f}", fontsize=7, va="top", ha="right",
                color="0.35")
        ax.set_xlabel("ℓ2 radius r (pixel scale [0, 1])")
        ax.set_xlim(0, r_max * 1.08)
        ax.set_ylim(0, 1)
        ax.set_title(f"σ = {sigma:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", loc="upper right", bbox_to_anchor=(1.0, 0.85))
        drawn.append((f"σ = {sigma:g}", labels))
    axes[0][0].set_ylabel("certified accuracy (fraction of test images)")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, png, pdf, caption)
    return drawn


def bits_per_layer(results: list[Group], png, pdf, title: str, caption: str) -> list[tuple[str, list[str]]]:
    """Weight bits (top) and activation bits (bottom) of each layer, one line per quantized method and σ column."""
    panels = {s: [r for r in g if r.policy is not None] for s, g in _by_sigma(results).items()}
    panels = {s: g for s, g in panels.items() if g}
    budgets = _budgets(r.method for r in results)
    nb = len(budgets)
    fig, axes = plt.subplots(2, max(len(panels), 1), figsize=(6.5 * max(len(panels), 1), 6.4), squeeze=False,
                             sharex=True)
    drawn = []
    for col, (sigma, group) in enumerate(panels.items()):
        names = list(group[0].policy["layers"])  # forward order
        x = np.arange(len(names))
        labels = []
        for k, res in enumerate(group):
            st = style(res.method, budgets)
            layers = res.layers()  # the seeds' mean bits
            offset = (k - (len(group) - 1) / 2) * 0.06  # a small shift keeps coinciding lines visible
            label = display_name(res.method, nb)
            for row, key in enumerate(("w_bits", "a_bits")):
                axes[row][col].plot(x + offset, [layers[n][key] for n in names], color=st["color"],
                                    linestyle=st["linestyle"], marker=st["marker"], markersize=4, linewidth=1.1,
                                    label=label)
            labels.append(label)
        for row, what in enumerate(("weight bits", "activation bits")):
            ax = axes[row][col]
            ax.set_ylabel(what)
            ax.set_yticks(range(2, 9))
            ax.set_ylim(1.5, 8.5)
            ax.grid(alpha=0.3)
        axes[0][col].set_title(f"σ = {sigma:g}")
        axes[0][col].legend(fontsize="x-small", ncol=2)
        axes[1][col].set_xticks(x, names, rotation=90, fontsize=6)
        axes[1][col].set_xlabel("layer (forward order)")
        drawn.append((f"σ = {sigma:g}", labels))
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, png, pdf, caption)
    return drawn


def pareto(rows, png, pdf, title: str, caption: str) -> list[tuple[str, list[str]]]:
    """ACR (with its 95% bootstrap interval) against BitOps % on a log axis, one panel per σ; each searched method
    and HAWQ is a line across the budget sweep, FP32 a dashed reference line, uniform models single points.
    ``rows`` is the main comparison table."""
    sigmas = sorted(rows["sigma"].unique())
    fig, axes = plt.subplots(1, len(sigmas), figsize=(5.2 * len(sigmas) + 0.6, 4.4), squeeze=False)
    drawn = []
    for ax, sigma in zip(axes[0], sigmas):
        part = rows[rows["sigma"] == sigma]
        labels = []
        groups: dict[str, list] = {}
        for _, row in part.iterrows():
            groups.setdefault(family(row["method"]) if budget(row["method"]) is not None else row["method"],
                              []).append(row)
        for key, members in sorted(groups.items(), key=lambda kv: sort_key(kv[1][0]["method"])):
            members.sort(key=lambda r: r["bitops_pct"])
            st = style(members[0]["method"])
            name = display_name(members[0]["method"], 1)
            if key == "fp32":
                ax.axhline(members[0]["ACR"], color=st["color"], linestyle="--", linewidth=1,
                           label=f"FP32 (100% BitOps), ACR {members[0]['ACR']:.3f}")
                ax.axhspan(members[0]["ACR_lo"], members[0]["ACR_hi"], color="0.85", alpha=0.5)
                labels.append("FP32")
                continue
            x = [m["bitops_pct"] for m in members]
            y = [m["ACR"] for m in members]
            err = [[m["ACR"] - m["ACR_lo"] for m in members], [m["ACR_hi"] - m["ACR"] for m in members]]
            ax.errorbar(x, y, yerr=err, color=st["color"], linestyle=st["linestyle"] if len(x) > 1 else "none",
                        marker=st["marker"], markersize=6, capsize=3, linewidth=1.2, label=name)
            labels.append(name)
        ax.set_xscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 1, 2, 5, 10 rather than 10^0
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
        ax.set_xlabel("BitOps (% of FP32, log scale)")
        ax.set_ylabel("ACR (ℓ2 radius, pixel scale [0, 1])")
        ax.set_title(f"σ = {sigma:g}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="x-small")
        drawn.append((f"σ = {sigma:g}", labels))
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, png, pdf, caption)
    return drawn


def search_curves(curves: dict[tuple[str, float], list[dict]], png, pdf, title: str,
                  caption: str) -> list[tuple[str, list[str]]]:
    """Per σ and budget: ARQ and random search share the certified reward (left), HAQ has its accuracy reward
    (right). Points: the reward of each episode; lines: best so far. ``curves`` maps (method, σ) to CSV rows."""
    keys = sorted({(s, budget(m)) for m, s in curves})
    fig, axes = plt.subplots(len(keys), 2, figsize=(11, 3.4 * len(keys) + 0.6), squeeze=False)
    drawn = []
    budgets = sorted({b for _, b in keys})
    nb = len(budgets)
    for row, (sigma, b) in enumerate(keys):
        for col, fams in enumerate((("arq", "random"), ("haq",))):
            ax = axes[row][col]
            labels = []
            for (method, s), rows in sorted(curves.items(), key=lambda kv: sort_key(kv[0][0])):
                if s != sigma or budget(method) != b or family(method) not in fams:
                    continue
                st = style(method, budgets)
                ep = [int(r["episode"]) for r in rows]
                ax.plot(ep, [float(r["reward"]) for r in rows], linestyle="none", marker=st["marker"] or ".",
                        markersize=4, alpha=0.55, color=st["color"])
                name = display_name(method, nb)
                first = name not in labels  # one legend entry per method; its seeds share the style
                ax.plot(ep, [float(r["best_reward"]) for r in rows], color=st["color"], linestyle=st["linestyle"],
                        linewidth=1.6, label=f"{name}: best so far (points: each episode)" if first else None)
                if first:
                    labels.append(name)
            ax.set_xlabel("episode")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("reward: λ·(ACR − ACR_FP32)" if col == 0 else "reward: 0.1·(top-1 − top-1_FP32) in pp")
            ax.set_title(f"σ = {sigma:g}, budget {b:g}% BitOps — " + ("certified reward" if col == 0
                                                                      else "HAQ's accuracy reward"))
            ax.grid(alpha=0.3)
            if labels:
                ax.legend(fontsize="x-small")
            drawn.append((ax.get_title(), labels))
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, png, pdf, caption)
    return drawn


BASE_STYLE = {"fp32": ("black", "-", "o"), "fp32_symreg": ("tab:blue", "--", "s"),
              "fp32_satnl": ("tab:orange", ":", "^"), "fp32_symreg_satnl": ("tab:red", "-.", "D")}
SWEEP_PANELS = (("ptq", False, "PTQ, WbAb"), ("ptq", True, "PTQ, weights only (Wb, A8)"), ("qat", False, "QAT, WbAb"))
SWEEP_MEASURES = (("noisy_val_acc", "base classifier: noisy val acc."), ("clean_accuracy", "smoothed clean acc."),
                  ("acr", "ACR"))


def sweep(rows: list[dict], png, pdf, title: str, caption: str) -> list[tuple[str, list[str]]]:
    """The bit-width sweep: per σ, a row of panels per measure (noisy val accuracy of the base classifier, smoothed
    clean accuracy, ACR) and a column per kind of point (PTQ WbAb, PTQ weights only, QAT WbAb); one curve per base
    variant against the bits b. ``rows``: the sweep CSVs' rows."""
    from arq.report.results import BASE_LABELS

    sigmas = sorted({float(r["sigma"]) for r in rows})
    fig, axes = plt.subplots(len(SWEEP_MEASURES) * len(sigmas), len(SWEEP_PANELS),
                             figsize=(4.2 * len(SWEEP_PANELS), 2.9 * len(SWEEP_MEASURES) * len(sigmas) + 0.6),
                             squeeze=False)
    drawn = []
    bases = sorted({r["base"] for r in rows}, key=list(BASE_STYLE).index)
    for i, sigma in enumerate(sigmas):
        for j, (measure, label) in enumerate(SWEEP_MEASURES):
            for k, (mode, weight_only, panel) in enumerate(SWEEP_PANELS):
                ax = axes[i * len(SWEEP_MEASURES) + j][k]
                names = []
                for base in bases:
                    # W8A8 is a point of both PTQ panels
                    pts = sorted((int(r["w_bits"]), float(r[measure])) for r in rows
                                 if float(r["sigma"]) == sigma and r["base"] == base and r["mode"] == mode
                                 and int(r["a_bits"]) == (8 if weight_only else int(r["w_bits"])))
                    if not pts:
                        continue
                    colour, line, marker = BASE_STYLE[base]
                    name = f"FP32 [{BASE_LABELS[base]}]" if BASE_LABELS[base] else "FP32 (plain)"
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colour, linestyle=line, marker=marker,
                            label=name)
                    names.append(name)
                ax.set_xlabel("bits b")
                ax.set_xticks(range(2, 9))
                ax.set_xlim(1.5, 8.5)
                ax.set_ylabel(label)
                ax.set_title(f"σ = {sigma:g}: {panel}", fontsize="small")
                ax.grid(alpha=0.3)
                if names:
                    ax.legend(fontsize="x-small")
                drawn.append((ax.get_title() + f" — {label}", names))
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, png, pdf, caption)
    return drawn
