"""Where a profile's files live. One definition, read by the Snakemake rules, the report regeneration and the DVC
artifact commands, so that what the workflow writes, what the report reads and what DVC tracks cannot drift apart.

Model names: ``fp32`` for the base model; ``<family>_<variant>_s<seed>`` for quantized ones (``uniform_w4a4_s0``,
``hawq_b1.0_s1``, ``arq_b1.0_s2``), one per seed of ``search.seeds`` (or of the subset ``search.seeds_by_budget``
gives a budget): a search's seed drives its agent and episode
noise, and every quantized model's final finetune draws from ``finetune.seed + seed``, so uniform and HAWQ models
get the same seed spread as the searched ones. Without the seed, ``<family>_<variant>`` names the method (a row of
the report). A robust base variant (arq.variants) is named ``fp32_symreg``, ``fp32_satnl`` or ``fp32_symreg_satnl``,
and a model made from it carries the variant's tag before its seed (``arq_b1.0_symreg_satnl_s2``); the plain base's
names and files are the ones above. ``model_name`` builds a name and ``parse`` reads one back. Binary files (``*.pt``: prepared data,
checkpoints, IRS caches, search states) are DVC's; text results (JSON, TSV, CSV, policies, tables) are git's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from arq.config import ConfigError, sigma_tag
from arq.variants import variant

NAME = re.compile(r"(?P<family>[a-z0-9]+)(?:_(?P<variant>[a-z0-9.]+))?")
# a model made from a robust base variant (arq.variants) carries the variant's suffix before its seed
BASE_SUFFIX = r"_symreg_satnl|_symreg|_satnl"
SPLIT = re.compile(rf"(?P<rest>.+?)(?P<base>{BASE_SUFFIX})?(?:_s(?P<seed>[0-9]+))?")


@dataclass(frozen=True)
class Name:
    """A parsed model name: ``arq_b1.0_s2`` → family 'arq', variant 'b1.0', budget 1.0, seed 2, base 'fp32';
    ``arq_b1.0_symreg_s2`` → the same from the base ``fp32_symreg``; ``fp32_satnl`` → that base itself."""

    family: str
    variant: str | None
    seed: int | None
    base: str = "fp32"

    @property
    def suffix(self) -> str:
        """The base variant's suffix (``_symreg``; empty for the plain base)."""
        return variant(self.base).suffix

    @property
    def method(self) -> str:
        """The name without its seed: the report's row (``arq_b1.0``, ``uniform_w3a3``, ``fp32``, ``arq_b1.0_satnl``,
        ``fp32_symreg``)."""
        return (self.family if self.variant is None else f"{self.family}_{self.variant}") + self.suffix

    @property
    def plain(self) -> str:
        """The method as made from the plain base (``arq_b1.0_satnl`` → ``arq_b1.0``)."""
        return self.family if self.variant is None else f"{self.family}_{self.variant}"

    @property
    def budget(self) -> float | None:
        m = re.fullmatch(r"b([0-9]+\.[0-9]+)", self.variant or "")
        return float(m.group(1)) if m else None


def model_name(method: str, seed: int | None) -> str:
    """``arq_b1.0`` and 2 → ``arq_b1.0_s2``; the FP32 base has no seed."""
    return method if seed is None else f"{method}_s{int(seed)}"


def parse(name: str) -> Name:
    split = SPLIT.fullmatch(name)
    m = NAME.fullmatch(split["rest"]) if split else None
    if not m or (m["family"] == "fp32" and (split["seed"] is not None or m["variant"])):
        raise ValueError(f"{name!r} is not a model name (fp32, or <family>_<variant>_s<seed>, e.g. arq_b1.0_s0, "
                         f"optionally from a robust base: fp32_symreg, arq_b1.0_symreg_s0)")
    base = "fp32" + (split["base"] or "")
    return Name(m["family"], m["variant"], None if split["seed"] is None else int(split["seed"]), base)


def results_dir(config: dict) -> str:
    return f"{config['paths']['results']}/{config['profile']}"


def prepared_dir(config: dict) -> str:
    return f"{config['paths']['data']}/prepared/{config['profile']}"


def prepared_data(config: dict) -> str:
    """The prepared dataset's tensor file, or a streamed tree's listing (its manifest lies beside it)."""
    name = "listing.tsv.gz" if config["data"]["source"] == "imagefolder" else "cifar10.pt"
    return f"{prepared_dir(config)}/{name}"


def report_dir(config: dict) -> str:
    return f"{results_dir(config)}/report"


def figures_dir(config: dict) -> str:
    return f"{config['paths']['figures']}/{config['profile']}"


def sigmas(config: dict) -> list[str]:
    return [sigma_tag(s) for s in config["sigmas"]]


def budgets(config: dict) -> list[str]:
    return [repr(float(b)) for b in config["search"]["budgets"]]


def seeds(config: dict, budget: str | float | None = None) -> list[int]:
    """``search.seeds``; at a budget that ``search.seeds_by_budget`` lists, that budget's (a subset of them)."""
    sc = config["search"]
    if budget is not None:
        for key, chosen in sc["seeds_by_budget"].items():
            if float(key) == float(budget):
                return [int(s) for s in chosen]
    return [int(s) for s in sc["seeds"]]


def uniform_seeds(config: dict) -> dict[str, list[int]]:
    """The uniform baselines and their seeds: ``quant.uniform`` with every seed of ``search.seeds``, plus, with
    ``quant.uniform_fit_budgets``, each budget's uniform policies with the most bits that fit it
    (arq.policy.uniform_within; W3A2 and W2A3 at 0.7%) with that budget's seeds, so every budget has the uniform
    model it allows. A tag that several budgets add gets the union of their seeds."""
    from arq import policy

    out = {t.upper(): seeds(config) for t in config["quant"]["uniform"]}
    if config["quant"]["uniform_fit_budgets"]:
        costs, rules = policy.for_config(config)
        for b in config["search"]["budgets"]:
            for tag in policy.uniform_within(costs, rules, float(b)):
                out[tag] = sorted(set(out.get(tag, [])) | set(seeds(config, b)))
    return out


def uniform_tags(config: dict) -> list[str]:
    """The uniform baselines' tags (``W4A4``), in order: ``uniform_seeds``."""
    return list(uniform_seeds(config))


def searched(config: dict) -> list[str]:
    """Searched models, e.g. ``arq_b1.0_s0``: every search method at every budget and that budget's seeds; then the
    searches run on each robust base for its arms (``arq_b1.0_symreg_s0``)."""
    plain = [model_name(f"{m}_b{b}", s) for m in config["search"]["methods"] for b in budgets(config)
             for s in seeds(config, b)]
    return plain + [m for m in arms(config) if parse(m).family in config["search"]["methods"]]


def bases(config: dict) -> list[str]:
    """The FP32 base variants the profile trains (``robust_base.bases``): ``fp32`` first, then the robust ones."""
    listed = config["robust_base"]["bases"]
    return ["fp32"] + [b for b in listed if b != "fp32"]


def arm_seeds(config: dict, method: str) -> list[int]:
    """The seeds of a comparison method (``uniform_w3a3``, ``hawq_b1.0``, ``arq_b1.0``): its budget's, or the
    uniform baseline's."""
    name = parse(method)
    if name.family == "uniform":
        return uniform_seeds(config).get(name.variant.upper(), [])
    return seeds(config, name.budget)


def arms(config: dict) -> list[str]:
    """The models finetuned from each robust base (``robust_base.arms`` × the robust bases × the arm's seeds), e.g.
    ``arq_b1.0_symreg_s0``: the same methods, policies searched or allocated on that base."""
    return [model_name(arm + variant(base).suffix, s) for base in bases(config)[1:]
            for arm in config["robust_base"]["arms"] for s in arm_seeds(config, arm)]


def check(config: dict) -> dict:
    """The cross-checks that need more than one key (``config.validate`` has done the rest): a streamed tree's
    search holds a bounded number of images; every ``robust_base.arms`` entry is a method the profile runs, and
    there is a robust base to make it from. Raises ConfigError naming the key; returns the config."""
    if config["data"]["source"] == "imagefolder" and config["search"]["finetune"]["train_images"] is None:
        raise ConfigError("invalid configuration:\n  search.finetune.train_images: a search holds its training "
                          "images on the device, and a streamed ImageFolder tree is too large for that; give a number")
    rb = config["robust_base"]
    if not rb["arms"]:
        return config
    if bases(config) == ["fp32"]:
        raise ConfigError("invalid configuration:\n  robust_base.arms: robust_base.bases lists no robust base to "
                          "finetune them from (add fp32_symreg, fp32_satnl or fp32_symreg_satnl)")
    plain = {parse(m).method for m in methods({**config, "robust_base": {**rb, "arms": []}})}
    for i, arm in enumerate(rb["arms"]):
        if arm not in plain:
            raise ConfigError(f"invalid configuration:\n  robust_base.arms.{i}: {arm} is not a method this profile "
                              f"runs ({', '.join(sorted(plain - {'fp32'}))})")
    return config


def methods(config: dict) -> list[str]:
    """Every model the profile certifies, in workflow order: FP32, uniform, HAWQ, searched (quantized ones once per
    seed of their budget, ``seeds``); then the robust bases and the arms finetuned from them."""
    uniform = [model_name(f"uniform_{tag.lower()}", s) for tag, chosen in uniform_seeds(config).items()
               for s in chosen]
    hawq = ([model_name(f"hawq_b{b}", s) for b in budgets(config) for s in seeds(config, b)]
            if config["hawq"]["enabled"] else [])
    return (["fp32"] + uniform + hawq + [m for m in searched(config) if parse(m).base == "fp32"]
            + bases(config)[1:] + arms(config))


def policy_name(model: str, sigma: str) -> str:
    """The file name of a quantized model's policy. Uniform policies depend on neither σ nor the seed, HAWQ's on σ
    only (the seed varies their finetune), a search's on σ and its seed."""
    name = parse(model)
    if name.family == "uniform":  # the same policy whatever the base
        return f"{name.plain}.json"
    if name.family == "hawq":
        return f"{name.method}_sigma{sigma}.json"
    return f"{model}_sigma{sigma}.json"


def policy_file(config: dict, model: str, sigma: str) -> str:
    return f"{results_dir(config)}/policies/{policy_name(model, sigma)}"


def cache_file(config: dict, base: str, sigma: str, ext: str = "pt") -> str:
    """The IRS cache of a base variant at σ (its certification of the val subset): ``irs/cache_sigma0.25.pt`` for the
    plain base, ``irs/cache_symreg_sigma0.25.pt`` for fp32_symreg."""
    return f"{results_dir(config)}/irs/cache{variant(base).suffix}_sigma{sigma}.{ext}"


def sweep_file(config: dict, base: str, sigma: str) -> str:
    """The bit-width sweep's CSV of a base variant at σ (arq.sweep)."""
    return f"{results_dir(config)}/sweep/{base}_sigma{sigma}.csv"


def report_inputs(config: dict) -> dict[str, list[str]]:
    """The text results the report reads: certification summaries and TSVs, policies, search CSVs, the FP32
    IRS cache summaries (their time counts towards the certified-reward searches) and the bit-width sweeps."""
    res, sig, meth, srch = results_dir(config), sigmas(config), methods(config), searched(config)
    return {
        "summaries": [f"{res}/certify/{m}_sigma{s}.json" for s in sig for m in meth],
        "tsvs": [f"{res}/certify/{m}_sigma{s}.tsv" for s in sig for m in meth],
        "policies": sorted({policy_file(config, m, s) for m in meth if parse(m).family != "fp32" for s in sig}),
        "search_csvs": [f"{res}/search/{m}_sigma{s}.csv" for s in sig for m in srch],
        "irs_caches": sorted({cache_file(config, parse(m).base, s, "json") for m in srch for s in sig}),
        "sweeps": [sweep_file(config, b, s) for s in sig for b in bases(config)] if config["sweep"]["enabled"] else [],
    }


def binaries(config: dict) -> list[str]:
    """The binary files a profile's DAG writes: the prepared data, every model, the FP32 IRS caches, and the search
    states (resume files a search keeps when it ends, useful for extending it). Leftovers on disk that the DAG does
    not make (models of a σ no longer listed, interrupted-run files) are not among them."""
    res, sig = results_dir(config), sigmas(config)
    return ([prepared_data(config)]
            + [f"{res}/models/{m}_sigma{s}/model.pt" for s in sig for m in methods(config)]
            + [cache_file(config, b, s) for s in sig for b in bases(config)]
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
