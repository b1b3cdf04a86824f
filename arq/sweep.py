"""The bit-width sweep of one base variant at one σ: how much of its accuracy and certified radius each uniform
bit-width keeps, without training (post-training quantization) and with the shared finetune (QAT).

Each point is the pipeline's own two stages with the sweep's settings and nothing else changed: ``arq.train.finetune``
of the uniform policy (``finetune.epochs`` = 0 for PTQ: calibration only), then ``arq.certify.run_certify`` on
``sweep.images`` of the certification subset at (``sweep.n0``, ``sweep.n``). So a point is exactly the single run of
those settings (``point_config``), and every point of every variant sees the same finetune batches and the same
certification noise. A point's text results stay in ``<out_dir>/<point>/`` (the model is deleted once certified),
which makes the sweep resumable point by point.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from arq import policy
from arq.config import config_hash
from arq.io import provenance, write_json, write_text
from arq.layout import model_name
from arq.variants import variant

COLUMNS = ("base", "sigma", "mode", "point", "w_bits", "a_bits", "bitops_pct", "noisy_val_acc", "clean_accuracy",
           "acr", "abstain_rate", "images", "n", "seconds")


@dataclass(frozen=True)
class Point:
    mode: str  # "ptq" (calibration only) or "qat" (the shared finetune)
    w_bits: int
    a_bits: int

    @property
    def tag(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"

    @property
    def name(self) -> str:
        return f"{self.mode}_{self.tag.lower()}"


def points(config: dict) -> list[Point]:
    """PTQ at WbAb for ``sweep.ptq`` and at WbA8 for ``sweep.weight_only`` (once where both list a point), then QAT
    at WbAb for ``sweep.qat``."""
    sw = config["sweep"]
    ptq = [Point("ptq", b, b) for b in sw["ptq"]]
    ptq += [Point("ptq", b, 8) for b in sw["weight_only"] if Point("ptq", b, 8) not in ptq]
    return ptq + [Point("qat", b, b) for b in sw["qat"]]


def point_config(config: dict, point: Point) -> dict:
    """The profile as one point runs it: the finetune without epochs for PTQ, the certification at the sweep's
    (n0, n) on its images."""
    cfg = copy.deepcopy(config)
    if point.mode == "ptq":
        cfg["finetune"]["epochs"] = 0
    sw = config["sweep"]
    cfg["certify"].update(n0=sw["n0"], n=sw["n"], max_images=sw["images"])
    return cfg


def point_model(point: Point, base: str) -> str:
    """The model name a point's finetune and certification carry (``uniform_w4a8_symreg_s0``): a uniform model from
    that base with seed 0, so the finetune draws exactly what that uniform baseline's seed 0 draws."""
    return model_name(f"uniform_{point.tag.lower()}{variant(base).suffix}", 0)


def _done(summary: Path, cfg: dict) -> dict | None:
    if not summary.exists():
        return None
    try:
        doc = json.loads(summary.read_text())
    except ValueError:
        return None
    return doc if doc.get("config_hash") == config_hash(cfg) else None


def run_point(config: dict, point: Point, base: str, sigma: float, base_model: str | Path, data, out_dir: Path,
              device: torch.device, log: Callable = print) -> dict:
    """One point (resumable: a certified point with the same settings is read back, not rerun)."""
    from arq.certify import run_certify
    from arq.train import finetune

    cfg = point_config(config, point)
    d = Path(out_dir) / point.name
    method = point_model(point, base)
    cert = _done(d / "certify.json", cfg)
    if cert is None:
        if not ((d / "model.pt").exists() and _done(d / "finetune.json", cfg)):  # else finetuned before the cut
            doc = policy.uniform_policy(cfg, point.tag)
            finetune(cfg, sigma, base_model, doc, data, d / "model.pt", d / "model.resume.pt", d / "finetune.csv",
                     d / "finetune.json", device, method, log=log)
        cert = run_certify(cfg, sigma, method, d / "model.pt", data, d / "certify.tsv", d / "certify.json", device,
                           log=log)
        (d / "model.pt").unlink()  # the text results are the point's record; the model is a minute to remake
    else:
        log(f"{point.name}: certified before with these settings, read back")
    ft = json.loads((d / "finetune.json").read_text())
    return {"base": base, "sigma": sigma, "mode": point.mode, "point": point.tag, "w_bits": point.w_bits,
            "a_bits": point.a_bits, "bitops_pct": round(cert["bitops_pct"], 6),
            "noisy_val_acc": ft["final_noisy_val_acc"], "clean_accuracy": cert["clean_accuracy"], "acr": cert["acr"],
            "abstain_rate": cert["abstain_rate"], "images": cert["images"], "n": cert["n"],
            "seconds": round(ft["wall_seconds"] + cert["wall_seconds"], 2)}


def run_sweep(config: dict, sigma: float, base: str, base_model: str | Path, data, out_csv: str | Path,
              summary_json: str | Path, out_dir: str | Path, device: torch.device, log: Callable = print) -> list[dict]:
    """Every point of ``points`` for one base variant at σ; the CSV (a row per point) and a summary."""
    from arq import models

    start = time.perf_counter()
    models.load_for_stage(base_model, config, sigma, base, log)  # the right base before any point's work
    todo = points(config)
    rows = []
    for k, point in enumerate(todo, 1):
        log(f"[{k}/{len(todo)}] {base} σ={sigma}: {point.mode.upper()} {point.tag}")
        row = run_point(config, point, base, sigma, base_model, data, Path(out_dir), device, log)
        rows.append(row)
        log(f"[{k}/{len(todo)}] {point.name}: noisy val acc {row['noisy_val_acc']:.3f}, smoothed clean "
            f"{row['clean_accuracy']:.3f}, ACR {row['acr']:.3f}")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text(out_csv, buf.getvalue())
    write_json(summary_json, {"base": base, "sigma": sigma, "points": len(rows),
                              "settings": config["sweep"], "finetune": config["finetune"],
                              **provenance(config, device, time.perf_counter() - start)})
    return rows
