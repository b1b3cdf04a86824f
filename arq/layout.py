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


def report_dir(config: dict) -> str:
    return f"{results_dir(config)}/report"


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


def binaries(config: dict) -> list[str]:
    """The binary files a profile's DAG writes: the prepared data, every model, the FP32 IRS caches, and the search
    states (resume files a search keeps when it ends, useful for extending it). Leftovers on disk that the DAG does
    not make (models of a σ no longer listed, interrupted-run files) are not among them."""
    res, sig = results_dir(config), sigmas(config)
    return ([f"{prepared_dir(config)}/cifar10.pt"]
            + [f"{res}/models/{m}_sigma{s}/model.pt" for s in sig for m in methods(config)]
            + [f"{res}/irs/cache_sigma{s}.pt" for s in sig]
            + [f"{res}/search/{m}_sigma{s}.state.pt" for s in sig for m in searched(config)])


def inside(path: str | Path, root: str | Path) -> Path:
    """``path`` relative to ``root``; a ValueError naming both when it lies outside (DVC tracks only files inside
    its repository)."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        raise ValueError(f"{path} lies outside the repository {Path(root).resolve()}: DVC can track only files "
                         f"inside it (set paths.* of the profile to directories in the repository)") from None


def binary_outputs(config: dict, root: str | Path = ".") -> list[Path]:
    """Those of ``binaries`` present under ``root``, relative to it."""
    root = Path(root)
    return [inside(root / p, root) for p in binaries(config) if (root / p).exists()]
