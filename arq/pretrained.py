"""Published base models converted into our checkpoints: the ``import_base`` stage.

Two formats are read (DESIGN §4-§5; the research notes describe Cohen et al.'s code):

- **cohen**: Cohen, Rosenfeld & Kolter's released noise-trained ImageNet ResNet-50s. Their network is
  ``Sequential(NormalizeLayer, DataParallel(torchvision resnet50))``, saved as ``{"epoch", "arch", "state_dict",
  "optimizer"}``, so every weight key carries the prefix ``1.module.``; the normalization layer keeps its mean and
  standard deviation as plain attributes, so it has no keys, and its values are the standard ImageNet ones, which
  our ``Normalized`` wrapper also uses.
- **torchvision**: a plain torchvision ``state_dict`` (as ``torchvision.models.*(weights=...)`` gives), optionally
  inside ``{"state_dict": ...}`` or ``{"model": ...}`` and optionally saved from ``DataParallel`` (``module.``).
  These networks were trained without noise, so the profile noise-finetunes them (``finetune_base``) before use.

Either way the weights land under ``net.`` in our ``Normalized`` model and the normalization buffers are ours;
a conversion that leaves a key unmatched, or a tensor of another shape, is an error naming it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from arq import models

FORMATS = ("cohen", "torchvision")


def _state(obj, path: Path) -> dict:
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise models.CheckpointError(f"{path} holds no state_dict of tensors")
    return obj


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    for p in prefixes:
        if key.startswith(p):
            return key[len(p):]
    return key


def convert(obj, arch: str, fmt: str, path: Path = Path("<checkpoint>"), num_classes: int | None = None) -> dict:
    """The state_dict of our ``models.build(arch, num_classes)`` holding the weights of a published checkpoint."""
    if fmt not in FORMATS:
        raise ValueError(f"import format must be one of {FORMATS}, not {fmt!r}")
    if fmt == "cohen" and isinstance(obj, dict) and obj.get("arch") not in (None, arch):
        raise models.CheckpointError(f"{path} is Cohen et al.'s {obj['arch']!r} checkpoint, not {arch!r}")
    state = _state(obj, path)
    prefixes = ("1.module.", "1.") if fmt == "cohen" else ("module.",)
    if fmt == "cohen" and not all(k.startswith("1.") for k in state):
        odd = next(k for k in state if not k.startswith("1."))
        raise models.CheckpointError(f"{path}: key {odd!r} is not under the network of Cohen et al.'s "
                                     f"Sequential(NormalizeLayer, DataParallel(network)); is this a torchvision file?")
    ours = models.build(arch, num_classes).state_dict()
    converted = {f"net.{_strip(k, prefixes)}": v for k, v in state.items()}
    for k, v in ours.items():
        if k.startswith("normalize."):
            converted[k] = v  # ours: the standard ImageNet mean and std, the values Cohen's layer holds
    missing = sorted(set(ours) - set(converted))
    extra = sorted(set(converted) - set(ours))
    if missing or extra:
        raise models.CheckpointError(
            f"{path} does not fit {arch}: " + "; ".join(
                ([f"{len(missing)} weight(s) missing, e.g. {missing[0]}"] if missing else []) +
                ([f"{len(extra)} unexpected, e.g. {extra[0]}"] if extra else [])))
    for k, v in ours.items():
        if converted[k].shape != v.shape:
            raise models.CheckpointError(f"{path}: {k} has shape {tuple(converted[k].shape)}, {arch} needs "
                                         f"{tuple(v.shape)}" + (f" for {num_classes} classes" if num_classes else ""))
    return converted


def run_import(config: dict, sigma: float, source: str | Path, fmt: str, out: str | Path,
               metrics_json: str | Path | None = None, log=print, num_classes: int | None = None) -> dict:
    """Write ``source`` as this profile's FP32 base checkpoint for σ (the σ it was noise-trained at, for cohen), for
    data of ``num_classes`` classes (the architecture's default: ImageNet's 1000)."""
    import time

    from arq.io import provenance, sha256_file, write_json

    start = time.perf_counter()
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"published checkpoint not found: {source}")
    arch = config["model"]["arch"]
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise models.CheckpointError(f"cannot read {source}: {exc}") from exc
    model = models.build(arch, num_classes)
    model.load_state_dict(convert(obj, arch, fmt, source, num_classes))
    meta = {"sigma": float(sigma), "method": "fp32", "profile": config["profile"],
            "imported": {"path": str(source), "sha256": sha256_file(source), "format": fmt,
                         "noise_trained": fmt == "cohen"}}
    models.save_checkpoint(out, model, arch, **meta)
    if metrics_json is not None:
        write_json(metrics_json, {**meta, "num_classes": models.num_classes(model),
                                  **provenance(config, torch.device("cpu"), time.perf_counter() - start)})
    log(f"imported {source} ({fmt} format) as the {arch} base for σ={sigma} → {out}")
    return meta
