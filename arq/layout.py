"""Where a profile's files live. One definition, read by the Snakemake rules, the report regeneration and the DVC
artifact commands, so that what the workflow writes, what the report reads and what DVC tracks cannot drift apart.

Model names: ``fp32`` for the base model, ``<family>_<variant>`` for quantized ones (``uniform_w4a4``,
``hawq_b1.5``, ``arq_b1.5``). Binary files (``*.pt``: prepared data, checkpoints, IRS caches, search states) are
DVC's; text results (JSON, TSV, CSV, policies, tables) are git's.
"""
from __future__ import annotations

from pathlib import Path

from arq.config import sigma_tag


def results_dir(config: dict) -> str:
    return f"{config['paths']['results']}/{config['profile']}"


def prepared_dir(config: dict) -> str:
    return f"{config['paths']['data']}/prepared/{config['profile']}"


def figures_dir(config: dict) -> str:
    return f"{config['paths']['figures']}/{config['profile']}"


def sigmas(config: dict) -> list[str]:
    return [sigma_tag(s) for s in config["sigmas"]]


def budgets(config: dict) -> list[str]:
    return [repr(float(b)) for b in config["search"]["budgets"]]


def searched(config: dict) -> list[str]:
    """Searched models, e.g. ``arq_b1.5``: every search method at every budget."""
    return [f"{m}_b{b}" for m in config["search"]["methods"] for b in budgets(config)]


def methods(config: dict) -> list[str]:
    """Every model the comparison certifies, in workflow order: FP32, uniform, HAWQ, searched."""
    hawq = [f"hawq_b{b}" for b in budgets(config)] if config["hawq"]["enabled"] else []
    uniform = [f"uniform_{tag.lower()}" for tag in config["quant"]["uniform"]]
    return ["fp32"] + uniform + hawq + searched(config)


def policy_file(config: dict, method: str, sigma: str) -> str:
    """Uniform policies do not depend on σ; searched and HAWQ ones are found per σ."""
    if method.startswith("uniform_"):
        return f"{results_dir(config)}/policies/{method}.json"
    return f"{results_dir(config)}/policies/{method}_sigma{sigma}.json"


def report_inputs(config: dict) -> dict[str, list[str]]:
    """The text results the report reads: certification summaries and TSVs, policies, search CSVs and the FP32
    IRS cache summaries (their time counts towards the certified-reward searches)."""
    res, sig, meth, srch = results_dir(config), sigmas(config), methods(config), searched(config)
    return {
        "summaries": [f"{res}/certify/{m}_sigma{s}.json" for s in sig for m in meth],
        "tsvs": [f"{res}/certify/{m}_sigma{s}.tsv" for s in sig for m in meth],
        "policies": sorted({policy_file(config, m, s) for m in meth if m != "fp32" for s in sig}),
        "search_csvs": [f"{res}/search/{m}_sigma{s}.csv" for s in sig for m in srch],
        "irs_caches": [f"{res}/irs/cache_sigma{s}.json" for s in sig] if srch else [],
    }


def binary_outputs(config: dict, root: str | Path = ".") -> list[Path]:
    """The binary files of a profile present under ``root``: prepared data, checkpoints, IRS caches, search
    states. Interrupted-run leftovers (``*.partial``, resume files) are not results and are left out."""
    root = Path(root)
    found = []
    for base in (prepared_dir(config), results_dir(config)):
        for path in sorted((root / base).rglob("*.pt")):
            if not any(part in path.name for part in (".partial", ".resume.")):
                found.append(path.relative_to(root))
    return found
