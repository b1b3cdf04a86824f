"""Tables and figures from certification results.

Reads only the JSON summaries and Cohen-format TSVs that the certify stage writes, so a reviewer can
regenerate every table and figure from text files alone.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on CI or clusters
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from arq.io import atomic_path, write_text  # noqa: E402
from arq.smoothing import read_tsv  # noqa: E402


def table(summaries: list[str | Path]) -> pd.DataFrame:
    """One row per certified model: method, σ, cost, clean accuracy, certified accuracy per radius, ACR."""
    rows = []
    for path in summaries:
        s = json.loads(Path(path).read_text())
        row = {"method": s["method"], "sigma": s["sigma"], "bitops_pct": s["bitops_pct"], "images": s["images"],
               "clean_acc": s["clean_accuracy"]}
        row.update({f"r={r}": v for r, v in s["certified_accuracy"].items()})
        row.update({"ACR": s["acr"], "abstain": s["abstain_rate"], "N": s["n"],
                    "samples_per_s": s["samples_per_s"], "seconds": s["wall_seconds"]})
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["sigma", "bitops_pct"], ascending=[True, False], kind="stable")


def write_table(df: pd.DataFrame, md_path: str | Path, csv_path: str | Path, title: str) -> None:
    with atomic_path(csv_path) as tmp:
        df.to_csv(tmp, index=False)
    md = df.to_markdown(index=False, floatfmt=".3f")
    write_text(md_path, f"# {title}\n\n{md}\n")


def _radii(tsv: str | Path) -> tuple[np.ndarray, np.ndarray]:
    rows = read_tsv(tsv)
    return (np.array([float(r["radius"]) for r in rows]),
            np.array([int(r["correct"]) for r in rows], dtype=bool))


def certified_curve(tsv: str | Path, grid: np.ndarray) -> np.ndarray:
    radius, correct = _radii(tsv)
    return _curve(radius, correct, grid)


def _curve(radius: np.ndarray, correct: np.ndarray, grid: np.ndarray) -> np.ndarray:
    return np.array([(correct & (radius >= r)).mean() for r in grid])


def figure(panels: list[tuple[str, list[tuple[str, str | Path]]]], png: str | Path, pdf: str | Path,
           title: str) -> None:
    """Certified accuracy vs ℓ2 radius: one panel per (panel title, curves), one curve per (label, TSV)."""
    loaded = [(name, [(label, *_radii(tsv)) for label, tsv in curves]) for name, curves in panels]
    fig, axes = plt.subplots(1, len(loaded), figsize=(4.6 * len(loaded) + 0.9, 3.8), squeeze=False, sharey=True)
    for ax, (name, curves) in zip(axes[0], loaded):
        max_r = max((radius.max(initial=0.0) for _, radius, _ in curves), default=0.0)
        grid = np.linspace(0, max(max_r * 1.05, 0.25), 400)
        for label, radius, correct in curves:
            ax.plot(grid, _curve(radius, correct, grid), label=label)
        ax.set_xlabel("ℓ2 radius")
        ax.set_ylim(0, 1)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel("certified accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    for path in (png, pdf):
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=Path(path).suffix.lstrip("."), dpi=150)
    plt.close(fig)


def run(config: dict, summaries: list[str], tsvs: list[str], md: str, csv: str, png: str, pdf: str) -> pd.DataFrame:
    """The report stage: table and figure for one profile, from the certify stage's outputs."""
    if len(tsvs) != len(summaries):
        raise ValueError("each summary needs its TSV: --tsvs and --summaries must list the same number of files")
    df = table(summaries)
    write_table(df, md, csv, f"Certification results (profile {config['profile']})")
    # df keeps each summary's input position as its index, so tsvs[i] belongs to row i
    panels: dict[float, list] = {}
    for i, row in zip(df.index, df.itertuples()):
        panels.setdefault(row.sigma, []).append((f"{row.method} ({row.bitops_pct:.3g}% BitOps)", tsvs[i]))
    figure([(f"σ = {sigma:g}", curves) for sigma, curves in panels.items()], png, pdf,
           f"{config['model']['arch']} / CIFAR-10, profile {config['profile']}")
    return df
