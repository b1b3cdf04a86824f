"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): PREDICT and CERTIFY with exact statistics.

Noise is drawn on the model's device in large batches and class counts are accumulated there; the host
only sees one count vector per image. Each image's noise comes from a generator derived from (purpose, seed,
idx) by arq.rng, so certification is reproducible, an interrupted run resumes with identical results, and no
other stage draws the same noise.
"""
from __future__ import annotations

import csv
import datetime
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Callable, Iterable

import torch
from scipy.stats import beta, binomtest, norm
from torch import nn

from arq import rng
from arq.io import set_aside, write_json, write_text

ABSTAIN = -1
TSV_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1-α) Clopper–Pearson lower bound on a binomial proportion from k successes in n."""
    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


def upper_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1-α) Clopper–Pearson upper bound on a binomial proportion from k successes in n."""
    return 1.0 if k == n else float(beta.ppf(1 - alpha, k + 1, n - k))


def certified_radius(sigma: float, p_lower: float) -> float:
    """Cohen's Theorem 1 with p_B = 1 - p_A: R = σ Φ⁻¹(p_A); 0 when the bound does not exceed ½."""
    return sigma * float(norm.ppf(p_lower)) if p_lower > 0.5 else 0.0


@dataclass(frozen=True)
class Certificate:
    prediction: int  # ABSTAIN when p_A's lower bound is not above ½
    radius: float
    p_lower: float
    count: int  # samples (of n) that voted for the selected class


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Executed(nn.Module):
    """The base network as the engine runs it: inputs in the chosen memory layout, convolutions and matrix
    products under autocast when a reduced dtype is chosen. Logits come back as float32."""

    def __init__(self, model: nn.Module, channels_last: bool, dtype: torch.dtype):
        super().__init__()
        self.model, self.channels_last, self.dtype = model, channels_last, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype == torch.float32:
            return self.model(x)
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x).float()


@dataclass(frozen=True)
class Engine:
    """How the base classifier f is executed while sampling (config section ``engine``).

    A certificate is a statement about the classifier *as executed*. Channels-last only changes the memory
    layout (the arithmetic is the same up to summation order). ``compile`` (TorchInductor with frozen weights:
    batch norm folded into the convolutions, fused kernels) and a reduced ``dtype`` change the arithmetic, so a
    few noisy samples near a decision boundary can be classified differently than by the eager float32
    network: the certified classifier is then that compiled or reduced-precision network, which is what the
    summaries record (``engine``) and what must be deployed for the certificate to apply."""

    channels_last: bool = True
    compile: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"engine.dtype must be one of {sorted(DTYPES)}, not {self.dtype!r}")

    @classmethod
    def from_config(cls, config: dict) -> "Engine":
        return cls(**config["engine"])

    def describe(self) -> dict:
        return asdict(self)

    def prepare(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The executable form of ``model`` on ``device`` (eval mode; the weights are shared, not copied)."""
        model = model.to(device).eval()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        run = Executed(model, self.channels_last, DTYPES[self.dtype]).eval()
        if self.compile:
            # one graph per batch shape (a certification uses two or three); frozen weights let Inductor fold
            # batch norm and pre-pack convolution weights
            run = torch.compile(run, dynamic=False, options={"freezing": True})
        return run


class Smooth:
    """The smoothed classifier g(x) = argmax_c P[f(x+ε) = c], ε ~ N(0, σ²I), around a base classifier f.

    ``base`` is run as given; pass ``Engine.prepare(model, device)`` for the layout and numerics of choice."""

    def __init__(self, base: nn.Module, num_classes: int, sigma: float, batch_size: int = 1000):
        self.base = base.eval()
        self.num_classes = num_classes
        self.sigma = sigma
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return model_device(self.base)

    @torch.inference_mode()
    def sample_counts(self, x: torch.Tensor, num: int, gen: torch.Generator) -> torch.Tensor:
        """Class counts of f over ``num`` noisy copies of the single input x (counted on the device)."""
        x = x.to(self.device)
        counts = torch.zeros(self.num_classes, dtype=torch.int64, device=self.device)
        remaining = num
        while remaining > 0:
            b = min(self.batch_size, remaining)
            batch = x.unsqueeze(0).expand(b, *x.shape)
            batch = batch + self.sigma * torch.randn(batch.shape, generator=gen, device=self.device)
            counts += torch.bincount(self.base(batch).argmax(1), minlength=self.num_classes)
            remaining -= b
        return counts

    def predict(self, x: torch.Tensor, n: int, alpha: float, gen: torch.Generator) -> int:
        """Cohen's PREDICT: the top class if a two-sided binomial test of top vs runner-up rejects at α."""
        counts = self.sample_counts(x, n, gen).cpu()
        top2 = counts.topk(2)
        n_a, n_b = int(top2.values[0]), int(top2.values[1])
        if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
            return ABSTAIN
        return int(top2.indices[0])

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, gen: torch.Generator) -> Certificate:
        """Cohen's CERTIFY: select the class on n0 samples, bound its probability on n fresh samples."""
        c_hat = int(self.sample_counts(x, n0, gen).argmax())
        n_a = int(self.sample_counts(x, n, gen)[c_hat])
        p_lower = lower_confidence_bound(n_a, n, alpha)
        if p_lower <= 0.5:
            return Certificate(ABSTAIN, 0.0, p_lower, n_a)
        return Certificate(c_hat, certified_radius(self.sigma, p_lower), p_lower, n_a)


def model_device(model: nn.Module) -> torch.device:
    """Where a model's tensors live; CPU for a model without parameters or buffers (a fixed function)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def subset_positions(size: int, max_images: int | None) -> torch.Tensor:
    """Positions of at most ``max_images`` images spread evenly over a subset of ``size`` (all when None).

    The canonical order is grouped by class, so taking the first k would certify a single class."""
    if max_images is None or max_images >= size:
        return torch.arange(size)
    return (torch.arange(max_images) * size) // max_images


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → [0,1] floats: noise is added in this space, as in training (Cohen et al.)."""
    return x.float().div(255) if x.dtype == torch.uint8 else x


def image_generator(seed: int, idx: int, device: torch.device, purpose: str = "certify") -> torch.Generator:
    """The generator of one image's noise; ``purpose`` (arq.rng) keeps CERTIFY and PREDICT streams apart."""
    return rng.generator(purpose, seed, idx, device=device)


# ------------------------------------------------------------------------------------- dataset certification

def format_bound(value: float, rounding: str = ROUND_FLOOR, digits: int = 6) -> str:
    """``value`` to ``digits`` significant digits, rounded towards ``rounding`` (floor for a lower bound such as a
    radius, ceiling for an upper bound such as ζ), so a number read back from text never claims more."""
    if not math.isfinite(value) or value == 0:
        return repr(float(value)) if not math.isfinite(value) else "0"
    exact = Decimal(value)  # the binary value, exactly
    text = format(exact.quantize(Decimal(1).scaleb(exact.adjusted() - digits + 1), rounding=rounding), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _row_problem(fields: list[str], idx: int, label: int) -> str | None:
    """Why a row of a ``.partial`` cannot be the certificate of image ``idx`` with ``label`` (None if it can)."""
    if len(fields) != len(TSV_COLUMNS):
        return f"has {len(fields)} columns, expected {len(TSV_COLUMNS)}"
    row = dict(zip(TSV_COLUMNS, fields))
    try:
        r_idx, r_label, r_pred, r_correct = (int(row[k]) for k in ("idx", "label", "predict", "correct"))
        radius = float(row["radius"])
        _parse_time(row["time"])
    except ValueError:
        return f"does not parse as idx/label/predict/correct integers, a radius and a time: {fields}"
    if r_idx != idx:
        return f"is for image {r_idx}, expected image {idx} at this position"
    if r_label != label:
        return f"gives label {r_label} for image {idx}, whose label is {label}"
    if r_correct != int(r_pred == r_label):
        return f"says correct={r_correct} for prediction {r_pred} and label {r_label}"
    if not (math.isfinite(radius) and radius >= 0) or (r_pred == ABSTAIN and radius != 0):
        return f"has an impossible radius {row['radius']} for prediction {r_pred}"
    return None


def _read_partial(partial: Path, meta: Path, fingerprint: dict, idx: list[int], labels: list[int],
                  log: Callable) -> list[dict]:
    """Rows of an interrupted run with the same fingerprint, each checked against the image it must certify.

    A torn last line (the run was killed while writing it) is dropped. Anything else that does not fit (an
    unreadable settings file, a row out of order, missing, duplicated or malformed) sets the partial aside and
    the certification starts over: a resumed file must never misalign rows and images."""
    if not partial.exists() and not meta.exists():
        return []
    try:
        stored = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        set_aside([partial, meta], f"its settings file {meta.name} is unreadable ({exc})", log)
        return []
    if stored != fingerprint:
        log(f"discarding {partial}: it was made with another model, data or certification settings")
        return []
    try:
        lines = partial.read_text().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as exc:
        set_aside([partial, meta], f"it is unreadable ({exc})", log)
        return []
    if not lines or lines[0] != "\t".join(TSV_COLUMNS) + "\n":
        set_aside([partial, meta], "its header is not Cohen's TSV header", log)
        return []
    body = lines[1:]
    if body and not body[-1].endswith("\n"):
        log(f"{partial}: dropping the torn last row {body[-1]!r} (the run was killed while writing it)")
        body = body[:-1]
    if len(body) > len(idx):
        set_aside([partial, meta], f"it holds {len(body)} rows for {len(idx)} images", log)
        return []
    rows = []
    for k, line in enumerate(body):
        fields = line.rstrip("\n").split("\t")
        problem = _row_problem(fields, idx[k], labels[k])
        if problem:
            set_aside([partial, meta], f"row {k + 1} {problem}", log)
            return []
        rows.append(dict(zip(TSV_COLUMNS, fields)))
    if rows:
        log(f"resuming from {partial}: {len(rows)} of {len(idx)} images already certified")
    return rows


def _format_row(row: dict, columns: tuple[str, ...] = TSV_COLUMNS) -> str:
    return "\t".join(str(row[c]) for c in columns) + "\n"


def write_tsv(path: str | Path, rows: list[dict], columns: tuple[str, ...] = TSV_COLUMNS) -> None:
    """A complete tab-separated file with a header line, written atomically."""
    write_text(path, "\t".join(columns) + "\n" + "".join(_format_row(r, columns) for r in rows))


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
    rows = _read_partial(partial, meta, fingerprint, idx, labels, log)
    write_json(meta, fingerprint)
    write_text(partial, "\t".join(TSV_COLUMNS) + "\n" + "".join(_format_row(r) for r in rows))  # torn line dropped
    done = len(rows)
    seconds = sum(_parse_time(r["time"]) for r in rows)
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
            f.write(_format_row(row))
            f.flush()
            rows.append(row)
    write_tsv(out_tsv, rows)
    partial.unlink()
    meta.unlink()
    return rows, seconds


def _parse_time(text: str) -> float:
    h, m, s = text.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def read_tsv(path: str | Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def summarize(rows: list[dict], radii: Iterable[float]) -> dict:
    """Clean smoothed accuracy, certified accuracy at each radius, ACR and abstain rate."""
    radius = [float(r["radius"]) for r in rows]
    correct = [int(r["correct"]) for r in rows]
    abstain = [int(r["predict"]) == ABSTAIN for r in rows]
    m = len(rows)
    return {
        "images": m,
        "clean_accuracy": sum(correct) / m,
        "certified_accuracy": {f"{r:g}": sum(c and rad >= r for c, rad in zip(correct, radius)) / m for r in radii},
        "acr": sum(c * rad for c, rad in zip(correct, radius)) / m,
        "abstain_rate": sum(abstain) / m,
    }


def max_radius(sigma: float, n: int, alpha: float) -> float:
    """Largest radius CERTIFY can return with n samples (all of them agreeing)."""
    return certified_radius(sigma, math.exp(math.log(alpha) / n))


# ------------------------------------------------------------------------------------------------- stages

def _progress(desc: str):
    from tqdm import tqdm

    def wrap(iterable, total, initial):
        return tqdm(iterable, total=total, initial=initial, desc=desc, unit="img", mininterval=5, dynamic_ncols=False)
    return wrap


def run_certify(config: dict, model_path: str | Path, data, out_tsv: str | Path, summary_json: str | Path,
                device: torch.device, method: str, sigma: float, log: Callable = print) -> dict:
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
                                    _progress(f"certify σ={sigma}"), log)
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


def run_predict(config: dict, model_path: str | Path, data, out_tsv: str | Path, n: int, alpha: float,
                device: torch.device, method: str, sigma: float, log: Callable = print) -> list[dict]:
    """PREDICT on the certification subset; Cohen's prediction format (idx label predict correct time)."""
    from arq import models

    model, meta = models.load_for_stage(model_path, config, sigma, method, log)
    smooth = Smooth(Engine.from_config(config).prepare(model, device), len(data.manifest["classes"]),
                    float(meta["sigma"]), config["certify"]["batch_size"])
    pick = subset_positions(len(data.cert), config["certify"]["max_images"]).tolist()
    rows = []
    for i in _progress("predict")(pick, total=len(pick), initial=0):
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
