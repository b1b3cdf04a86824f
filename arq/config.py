"""Profile configuration: load, validate against the one schema, hash.

The schema (workflow/schemas/config.schema.yaml) is the single definition of every knob; the CLI and the
Snakefile both validate through it, so an invalid value fails the same way everywhere, naming the key.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """An invalid configuration; the message names the offending key."""


def load_schema() -> dict:
    if not SCHEMA_PATH.exists():
        raise ConfigError(f"config schema not found at {SCHEMA_PATH}; arq must run from a checkout of the repository "
                          "(pip install -e .)")
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _key(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def validate(config: dict) -> dict:
    """Raise ConfigError naming the first offending key; return the config unchanged otherwise. A profile of several
    architectures is valid when each architecture's part (``split``) is."""
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), _key(e)))
    if errors:
        lines = [f"  {_key(e)}: {e.message}" for e in errors]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines))
    if "per_arch" in config and isinstance(config["model"]["arch"], str):
        raise ConfigError("invalid configuration:\n  per_arch: only a profile of several architectures (model.arch a "
                          "list) has settings per architecture")
    if isinstance(config["model"]["arch"], list):
        archs = architectures(config)
        for arch in config.get("per_arch", {}):
            if arch not in archs:
                raise ConfigError(f"invalid configuration:\n  per_arch.{arch}: not one of model.arch {archs}")
        for arch in archs:
            try:
                validate(for_arch(config, arch))
            except ConfigError as exc:
                raise ConfigError(f"{exc}\n  (in the part of architecture {arch}: the profile with per_arch.{arch} "
                                  "applied)") from exc
        return config
    if not _increasing(config["train"]["lr_milestones"]):
        raise ConfigError("invalid configuration:\n  train.lr_milestones: must be increasing")
    q = config["quant"]
    lo, hi = q["min_bits"], q["max_bits"]
    if lo > hi:
        raise ConfigError(f"invalid configuration:\n  quant.min_bits: {lo} is above quant.max_bits {hi}")
    if q["pin_first_last"] and not lo <= q["pinned_bits"] <= hi:
        raise ConfigError(f"invalid configuration:\n  quant.pinned_bits: {q['pinned_bits']} is outside {lo}..{hi}")
    for i, tag in enumerate(q["uniform"]):
        w, a = (int(b) for b in tag[1:].split("A"))
        if not (lo <= w <= hi and lo <= a <= hi):
            raise ConfigError(f"invalid configuration:\n  quant.uniform.{i}: {tag} has bits outside {lo}..{hi}")
    sc = config["search"]
    budgets = {float(b) for b in sc["budgets"]}
    for key, seeds in sc["seeds_by_budget"].items():
        try:
            budget = float(key)
        except ValueError:
            budget = None
        if budget not in budgets:
            raise ConfigError(f"invalid configuration:\n  search.seeds_by_budget.{key}: not one of search.budgets "
                              f"{sc['budgets']} (write the budget as it is written there, quoted: '0.7')")
        extra = sorted(set(seeds) - set(sc["seeds"]))
        if extra:
            raise ConfigError(f"invalid configuration:\n  search.seeds_by_budget.{key}: seeds {extra} are not in "
                              f"search.seeds {sc['seeds']} (a budget runs a subset of them, so that its models "
                              "share seeds with the references for the paired tests)")
    for key in ("ptq", "weight_only", "qat") if config["sweep"]["enabled"] else ():
        for i, b in enumerate(config["sweep"][key]):
            if not lo <= b <= hi:
                raise ConfigError(f"invalid configuration:\n  sweep.{key}.{i}: {b} bits is outside quant.min_bits.."
                                  f"max_bits {lo}..{hi}")
    _check_pretrained(config)
    if config["irs"]["n"] % config["irs"]["chunk"]:
        raise ConfigError("invalid configuration:\n  irs.n: must be a multiple of irs.chunk "
                          f"({config['irs']['n']} is not a multiple of {config['irs']['chunk']})")
    return config


def _check_pretrained(config: dict) -> None:
    """Imported base models: one checkpoint per σ, a finetune recipe exactly for the format that needs one, the
    plain base only (a robust variant is trained from scratch with its own objective), Cohen's files for ResNet-50."""
    pre = config["pretrained"]
    if pre is None:
        return
    bad = "invalid configuration:\n  pretrained."
    want = {sigma_tag(s) for s in config["sigmas"]}
    have = set(pre["checkpoints"])
    if want - have:
        raise ConfigError(f"{bad}checkpoints: no checkpoint for σ {sorted(want - have)} (keys are the σ of sigmas "
                          f"as quoted numbers, e.g. '{sorted(want)[0]}')")
    if have - want:
        raise ConfigError(f"{bad}checkpoints: {sorted(have - want)} are not σ of sigmas {config['sigmas']}")
    if pre["format"] == "torchvision" and pre["finetune"] is None:
        raise ConfigError(f"{bad}finetune: a torchvision checkpoint was trained without noise; finetune_base needs a "
                          "recipe (the keys of train)")
    if pre["format"] == "cohen" and pre["finetune"] is not None:
        raise ConfigError(f"{bad}finetune: must be null for cohen checkpoints, which are noise-trained at their σ")
    if pre["format"] == "cohen" and config["model"]["arch"] != "resnet50":
        raise ConfigError(f"{bad}format: Cohen et al. released ImageNet ResNet-50s, not {config['model']['arch']}")
    if config["robust_base"]["bases"] != ["fp32"]:
        raise ConfigError(f"{bad}format: imported base models replace the plain base only; robust_base.bases must "
                          "be [fp32]")
    if pre["finetune"] is not None and not _increasing(pre["finetune"]["lr_milestones"]):
        raise ConfigError(f"{bad}finetune.lr_milestones: must be increasing")


def _increasing(values: list) -> bool:
    """Strictly increasing (learning-rate milestones: the schema checks their type, not their order)."""
    return all(a < b for a, b in zip(values, values[1:]))


def architectures(config: dict) -> list[str]:
    """The architectures a profile runs: ``model.arch``, one name or a list."""
    arch = config["model"]["arch"]
    return [arch] if isinstance(arch, str) else list(arch)


def for_arch(config: dict, arch: str) -> dict:
    """One architecture's part of a profile of several: ``model.arch`` that one, its ``per_arch`` settings merged in,
    and the profile named ``<profile>/<arch>``, so that its results, figures, logs and prepared data live in a
    folder of their own under the profile's. A profile of one architecture is its own part, unchanged."""
    if isinstance(config["model"]["arch"], str):
        if arch != config["model"]["arch"]:
            raise ConfigError(f"profile {config['profile']!r} runs {config['model']['arch']!r}, not {arch!r}")
        return config
    if arch not in architectures(config):
        raise ConfigError(f"profile {config['profile']!r} runs {architectures(config)}, not {arch!r}")
    part = {k: v for k, v in config.items() if k != "per_arch"}
    part = merge(part, config.get("per_arch", {}).get(arch, {}))
    return {**part, "profile": f"{config['profile']}/{arch}", "model": {**part["model"], "arch": arch}}


def split(config: dict) -> list[dict]:
    """Each architecture's part of a profile (one part, the profile itself, for a profile of one architecture)."""
    return [for_arch(config, arch) for arch in architectures(config)]


def _read(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a mapping of settings")
    return config


def merge(base: dict, overlay: dict) -> dict:
    """``base`` with ``overlay`` applied key by key (mappings merge recursively, anything else replaces), as
    Snakemake merges several --configfile files."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load(path: str | Path, *overlays: str | Path) -> dict:
    """A profile, complete on its own, with optional partial overlays applied in order; validated twice.

    A profile never inherits a setting it does not state: it is validated alone before any overlay, so a
    missing key is an error rather than a silent default from another file."""
    path = Path(path)
    config = _read(path)
    try:
        validate(config)
    except ConfigError as exc:
        raise ConfigError(f"{path} is not a complete profile ({exc}); give a complete profile first and any "
                          "partial overlay after it") from exc
    for overlay in overlays:
        config = merge(config, _read(Path(overlay)))
    if overlays:
        try:
            validate(config)
        except ConfigError as exc:
            raise ConfigError(f"{path} with overlays {', '.join(map(str, overlays))}: {exc}") from exc
    return config


def drop_unlisted(merged: dict, profile: dict) -> dict:
    """Remove, in place, the keys of ``merged`` that ``profile`` lacks, at every level: what Snakemake's merge of the
    default config/config.yaml under a complete profile added (e.g. CIFAR-10's ``data.val_size`` under an
    ImageFolder profile). Values stay those of ``merged``, so ``--config`` overrides of listed keys hold."""
    for key in list(merged):
        if key not in profile:
            del merged[key]
        elif isinstance(merged[key], dict) and isinstance(profile[key], dict):
            drop_unlisted(merged[key], profile[key])
    return merged


def config_hash(config: dict) -> str:
    """Short stable hash of the full configuration (key order does not matter)."""
    canon = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def sigma_tag(sigma: float) -> str:
    """Canonical text for σ in paths and tables (0.25, 0.5, 1.0)."""
    return repr(float(sigma))


def search_settings(config: dict) -> dict:
    """The settings one search depends on. Which methods, budgets and seeds a profile sweeps is left out (each
    search knows its own method, budget and seed), so adding a budget or a seed neither reruns nor refuses to
    resume the searches already run."""
    sweep = ("methods", "budgets", "seeds", "seeds_by_budget")
    search = {k: v for k, v in config["search"].items() if k not in sweep}
    return {"search": search, **{k: config[k] for k in ("quant", "model", "irs", "engine")}}
