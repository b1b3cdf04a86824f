"""The certification stage: Cohen's CERTIFY (and PREDICT) on a profile's certification subset.

Each image's noise comes from a generator derived from (purpose, seed, idx) by arq.rng, so certification is
reproducible, an interrupted run resumes with identical results, and no other stage draws the same noise.
Rows are appended to a ``.partial`` file as they finish (``arq.records``) and the complete TSV is published
atomically.
"""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from arq import rng
from arq.data import to_unit
from arq.engine import Engine
from arq.io import write_json, write_text
from arq.records import TSV_COLUMNS, format_bound, format_row, parse_time, read_partial, summarize, write_tsv
from arq.smoothing import Smooth, max_radius


def subset_positions(size: int, max_images: int | None) -> torch.Tensor:
    """Positions of at most ``max_images`` images spread evenly over a subset of ``size`` (all when None).

    The canonical order is grouped by class, so taking the first k would certify a single class."""
    if max_images is None or max_images >= size:
        return torch.arange(size)
    return (torch.arange(max_images) * size) // max_images


def image_generator(seed: int, idx: int, device: torch.device, purpose: str = "certify") -> torch.Generator:
    """The generator of one image's noise; ``purpose`` (arq.rng) keeps CERTIFY and PREDICT streams apart."""
    return rng.generator(purpose, seed, idx, device=device)


def certify_dataset(smooth: Smooth, x: torch.Tensor, y: torch.Tensor, idx: Iterable[int], n0: int, n: int,
                    alpha: float, seed: int, out_tsv: str | Path, fingerprint: dict,
                    progress: Callable | None = None, log: Callable = print) -> tuple[list[dict], float]:
    """Certify each image, appending rows to ``<out>.partial`` as they finish; resume from it when its
    fingerprint matches and every row fits its image; publish the complete TSV atomically. Returns the rows and
    sampling seconds."""
    out_tsv = Path(out_tsv)
    partial, meta = out_tsv.with_name(out_tsv.name + ".partial"), out_tsv.with_name(out_tsv.name + ".partial.json")
    fingerprint = json.loads(json.dumps(fingerprint))  # normalise types for comparison with the stored copy
    idx = [int(i) for i in idx]
    labels = [int(v) for v in y]
    rows = read_partial(partial, meta, fingerprint, idx, labels, log)
    write_json(meta, fingerprint)
    write_text(partial, "\t".join(TSV_COLUMNS) + "\n" + "".join(format_row(r) for r in rows))  # torn line dropped
    done = len(rows)
    seconds = sum(parse_time(r["time"]) for r in rows)
    iterator = range(done, len(idx))
    if progress is not None:
        iterator = progress(iterator, total=len(idx), initial=done)
    with open(partial, "a") as f:
        for i in iterator:
            t0 = time.perf_counter()
            cert = smooth.certify(x[i], n0, n, alpha, image_generator(seed, idx[i], smooth.device))
            elapsed = time.perf_counter() - t0
            seconds += elapsed
            row = {"idx": idx[i], "label": labels[i], "predict": cert.prediction, "radius": format_bound(cert.radius),
                   "correct": int(cert.prediction == labels[i]), "time": str(datetime.timedelta(seconds=elapsed))}
            f.write(format_row(row))
            f.flush()
            rows.append(row)
    write_tsv(out_tsv, rows)
    partial.unlink()
    meta.unlink()
    return rows, seconds


def progress(desc: str):
    from tqdm import tqdm

    def wrap(iterable, total, initial):
        return tqdm(iterable, total=total, initial=initial, desc=desc, unit="img", mininterval=5, dynamic_ncols=False)
    return wrap


def run_certify(config: dict, sigma: float, method: str, model_path: str | Path, data, out_tsv: str | Path,
                summary_json: str | Path, device: torch.device, log: Callable = print) -> dict:
    """CERTIFY every image of the certification subset with the profile's (N0, N, α); TSV + JSON summary.

    The checkpoint must be the ``method`` model trained at ``sigma`` of this profile: what the outputs claim."""
    from arq import models
    from arq.io import origin, provenance, sha256_file

    start = time.perf_counter()
    cc = config["certify"]
    model, meta = models.load_for_stage(model_path, config, sigma, method, log)
    engine = Engine.from_config(config)
    sigma = float(meta["sigma"])
    smooth = Smooth(engine.prepare(model, device), len(data.manifest["classes"]), sigma, cc["batch_size"])
    pick = subset_positions(len(data.cert), cc["max_images"])
    k = len(pick)
    fingerprint = {"model_sha256": sha256_file(model_path), "certify": cc, "engine": engine.describe(),
                   "data": data.manifest["file_sha256"]}
    rows, seconds = certify_dataset(smooth, to_unit(data.cert.x[pick]), data.cert.y[pick], data.cert_idx[pick].tolist(), cc["n0"],
                                    cc["n"], cc["alpha"], cc["seed"], out_tsv, fingerprint,
                                    progress(f"certify σ={sigma}"), log)
    bitops_pct = float(meta["policy"]["bitops_pct"]) if "policy" in meta else 100.0
    summary = {"method": method, "sigma": sigma, "bitops_pct": bitops_pct, "n0": cc["n0"], "n": cc["n"],
               "alpha": cc["alpha"], **summarize(rows, config["report"]["radii"]),
               "samples_per_s": round(k * (cc["n0"] + cc["n"]) / seconds, 1),
               "max_certifiable_radius": round(max_radius(sigma, cc["n"], cc["alpha"]), 4),
               "engine": engine.describe(), "subset_rule": data.manifest["cert_rule"],
               "data_note": data.manifest.get("note", ""),
               **provenance(config, device, time.perf_counter() - start, {"model": origin(model_path, meta)})}
    write_json(summary_json, summary)
    return summary


def run_predict(config: dict, sigma: float, method: str, model_path: str | Path, data, out_tsv: str | Path, n: int,
                alpha: float, device: torch.device, log: Callable = print) -> list[dict]:
    """PREDICT on the certification subset; Cohen's prediction format (idx label predict correct time)."""
    from arq import models

    model, meta = models.load_for_stage(model_path, config, sigma, method, log)
    smooth = Smooth(Engine.from_config(config).prepare(model, device), len(data.manifest["classes"]),
                    float(meta["sigma"]), config["certify"]["batch_size"])
    pick = subset_positions(len(data.cert), config["certify"]["max_images"]).tolist()
    rows = []
    for i in progress("predict")(pick, total=len(pick), initial=0):
        t0 = time.perf_counter()
        idx = int(data.cert_idx[i])
        pred = smooth.predict(to_unit(data.cert.x[i]), n, alpha, image_generator(config["certify"]["seed"], idx, device,
                                                                                 "predict"))
        label = int(data.cert.y[i])
        rows.append({"idx": idx, "label": label, "predict": pred, "correct": int(pred == label),
                     "time": str(datetime.timedelta(seconds=time.perf_counter() - t0))})
    cols = ("idx", "label", "predict", "correct", "time")
    write_tsv(out_tsv, rows, cols)
    return rows
