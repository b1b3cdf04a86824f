"""Certification records: Cohen's TSV rows, their checks, the resumable ``.partial`` file and the summary.

Rows are ``idx label predict radius correct time`` so Cohen's own analysis scripts read our files. Numbers are
written rounded towards the safe side, and a resumed file must fit the images it certifies row by row.
"""
from __future__ import annotations

import csv
import json
import math
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Callable, Iterable

from arq.io import set_aside, write_text
from arq.smoothing import ABSTAIN

TSV_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")


def format_bound(value: float, rounding: str = ROUND_FLOOR, digits: int = 6) -> str:
    """``value`` to ``digits`` significant digits, rounded towards ``rounding`` (floor for a lower bound such as a
    radius, ceiling for an upper bound such as ζ), so a number read back from text never claims more."""
    if not math.isfinite(value) or value == 0:
        return repr(float(value)) if not math.isfinite(value) else "0"
    exact = Decimal(value)  # the binary value, exactly
    text = format(exact.quantize(Decimal(1).scaleb(exact.adjusted() - digits + 1), rounding=rounding), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def row_problem(fields: list[str], idx: int, label: int) -> str | None:
    """Why a row of a ``.partial`` cannot be the certificate of image ``idx`` with ``label`` (None if it can)."""
    if len(fields) != len(TSV_COLUMNS):
        return f"has {len(fields)} columns, expected {len(TSV_COLUMNS)}"
    row = dict(zip(TSV_COLUMNS, fields))
    try:
        r_idx, r_label, r_pred, r_correct = (int(row[k]) for k in ("idx", "label", "predict", "correct"))
        radius = float(row["radius"])
        parse_time(row["time"])
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


def read_partial(partial: Path, meta: Path, fingerprint: dict, idx: list[int], labels: list[int],
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
        problem = row_problem(fields, idx[k], labels[k])
        if problem:
            set_aside([partial, meta], f"row {k + 1} {problem}", log)
            return []
        rows.append(dict(zip(TSV_COLUMNS, fields)))
    if rows:
        log(f"resuming from {partial}: {len(rows)} of {len(idx)} images already certified")
    return rows


def format_row(row: dict, columns: tuple[str, ...] = TSV_COLUMNS) -> str:
    return "\t".join(str(row[c]) for c in columns) + "\n"


def write_tsv(path: str | Path, rows: list[dict], columns: tuple[str, ...] = TSV_COLUMNS) -> None:
    """A complete tab-separated file with a header line, written atomically."""
    write_text(path, "\t".join(columns) + "\n" + "".join(format_row(r, columns) for r in rows))


def parse_time(text: str) -> float:
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
