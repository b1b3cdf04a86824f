"""Summaries, tables and figures (arq/report.py) and resumable dataset certification (arq/smoothing.py)."""
from __future__ import annotations

import json
from decimal import ROUND_CEILING

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from arq import models, report
from arq.data import CLASSES, Prepared, Split
from arq.smoothing import (
    TSV_COLUMNS,
    Certificate,
    Smooth,
    certify_dataset,
    format_bound,
    max_radius,
    read_tsv,
    run_certify,
    summarize,
)

RADII = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]

# (idx, label, predict, radius, correct) — hand-made certification results for two noise levels
ROWS_025 = [(0, 0, 0, 0.5, 1), (20, 1, 1, 0.1, 1), (40, 2, -1, 0.0, 0), (60, 3, 5, 0.3, 0), (80, 4, 4, 0.25, 1),
            (100, 5, 5, 0.05, 1)]
ROWS_050 = [(0, 0, 0, 1.2, 1), (20, 1, -1, 0.0, 0), (40, 2, 2, 0.8, 1), (60, 3, 3, 0.4, 1), (80, 4, 7, 0.6, 0)]

# the same numbers worked out by hand
EXPECTED = {
    0.25: {"clean": 4 / 6, "cert": [4 / 6, 2 / 6, 1 / 6, 0, 0, 0], "acr": 0.9 / 6, "abstain": 1 / 6},
    0.5: {"clean": 3 / 5, "cert": [3 / 5, 3 / 5, 2 / 5, 2 / 5, 1 / 5, 0], "acr": 2.4 / 5, "abstain": 1 / 5},
}


def _rows(table):
    return [dict(zip(TSV_COLUMNS, (str(i), str(l), str(p), f"{r:.6g}", str(c), "0:00:00.5"))) for i, l, p, r, c
            in table]


def _write_tsv(path, table):
    path.write_text("\t".join(TSV_COLUMNS) + "\n" + "".join(
        "\t".join(r[c] for c in TSV_COLUMNS) + "\n" for r in _rows(table)))
    return path


def _write_summary(path, sigma, table):
    """A summary JSON with exactly the keys run_certify writes."""
    s = {"method": "fp32", "sigma": sigma, "bitops_pct": 100.0, "n0": 100, "n": 100_000, "alpha": 0.001,
         **summarize(_rows(table), RADII), "samples_per_s": 1234.5,
         "max_certifiable_radius": round(max_radius(sigma, 100_000, 0.001), 4),
         "engine": {"channels_last": True, "compile": False, "dtype": "float32"},
         "subset_rule": "every 20-th test image of the canonical order", "data_note": "synthetic",
         "profile": "unit", "config_hash": "0" * 16, "git_commit": "abc", "device": "cpu", "torch": torch.__version__,
         "wall_seconds": 12.5}
    path.write_text(json.dumps(s))
    return path


# -------------------------------------------------------------------------------------------- summarize

@pytest.mark.parametrize("sigma,table", [(0.25, ROWS_025), (0.5, ROWS_050)])
def test_summarize_hand_computed(sigma, table):
    s = summarize(_rows(table), RADII)
    e = EXPECTED[sigma]
    assert s["images"] == len(table)
    assert s["clean_accuracy"] == pytest.approx(e["clean"])
    assert list(s["certified_accuracy"]) == ["0", "0.25", "0.5", "0.75", "1", "1.25"]
    assert list(s["certified_accuracy"].values()) == pytest.approx(e["cert"])
    assert s["acr"] == pytest.approx(e["acr"])
    assert s["abstain_rate"] == pytest.approx(e["abstain"])


def test_summarize_radius_threshold_is_inclusive():
    rows = _rows([(0, 1, 1, 0.25, 1), (1, 1, 1, 0.2499, 1)])
    assert summarize(rows, [0.25])["certified_accuracy"]["0.25"] == 0.5


# ------------------------------------------------------------------------------------------ report stage

@pytest.fixture
def results(tmp_path):
    d = tmp_path / "certify"
    d.mkdir()
    # listed σ = 0.5 first: the table and the figure must both come out sorted by σ
    summaries = [_write_summary(d / "fp32_sigma0.5.json", 0.5, ROWS_050),
                 _write_summary(d / "fp32_sigma0.25.json", 0.25, ROWS_025)]
    tsvs = [_write_tsv(d / "fp32_sigma0.5.tsv", ROWS_050), _write_tsv(d / "fp32_sigma0.25.tsv", ROWS_025)]
    return [str(s) for s in summaries], [str(t) for t in tsvs]


def test_certified_curve_on_a_grid(results):
    _, tsvs = results
    grid = np.array([0.0, 0.4, 0.5, 1.0, 1.2, 1.3])
    assert report.certified_curve(tsvs[0], grid).tolist() == pytest.approx([0.6, 0.6, 0.4, 0.2, 0.2, 0.0])
    grid = np.array([0.0, 0.05, 0.06, 0.25, 0.5, 0.51])
    assert report.certified_curve(tsvs[1], grid).tolist() == pytest.approx([4 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0])


def test_report_run_writes_table_and_figures(results, tmp_path, smoke_config, monkeypatch):
    summaries, tsvs = results
    seen = []
    real_figure = report.figure

    def spy(curves, png, pdf, title):
        seen.append(curves)
        return real_figure(curves, png, pdf, title)

    monkeypatch.setattr(report, "figure", spy)
    out = tmp_path / "report"
    md, csv, png, pdf = out / "table.md", out / "table.csv", tmp_path / "fig" / "c.png", tmp_path / "fig" / "c.pdf"
    df = report.run(smoke_config, summaries, tsvs, str(md), str(csv), str(png), str(pdf))

    table = pd.read_csv(csv)
    assert len(table) == 2
    assert table["sigma"].tolist() == [0.25, 0.5]
    assert table["method"].tolist() == ["fp32", "fp32"]
    for _, row in table.iterrows():
        e = EXPECTED[row["sigma"]]
        assert row["clean_acc"] == pytest.approx(e["clean"], rel=1e-3)
        assert row["ACR"] == pytest.approx(e["acr"], rel=1e-3)
        assert row["abstain"] == pytest.approx(e["abstain"], rel=1e-3)
        assert [row[f"r={r:g}"] for r in RADII] == pytest.approx(e["cert"], rel=1e-3)
        assert row["N"] == 100_000 and row["images"] in (5, 6)
        assert row["seconds"] == 12.5
        assert row["samples_per_s"] == pytest.approx(1234.5, rel=1e-3)  # CSV keeps 4 significant digits
    assert df["sigma"].tolist() == [0.25, 0.5]

    text = md.read_text()
    assert text.startswith("# Certification results (profile smoke)")
    lines = [l for l in text.splitlines() if l.startswith("|")]
    assert len(lines) == 4  # header, separator, one row per σ
    assert "0.667" in lines[2] and "0.600" in lines[3]  # clean accuracy, 3 decimals, σ-sorted

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000
    # curves are labelled by their own TSV, in table order
    assert seen == [[("σ = 0.25", [("fp32 (100% BitOps)", tsvs[1])]), ("σ = 0.5", [("fp32 (100% BitOps)", tsvs[0])])]]


def test_report_requires_one_tsv_per_summary(results, tmp_path, smoke_config):
    summaries, tsvs = results
    with pytest.raises(ValueError, match="same number"):
        report.run(smoke_config, summaries, tsvs[:1], *(str(tmp_path / n) for n in ("a.md", "a.csv", "a.png",
                                                                                       "a.pdf")))


# ------------------------------------------------------------------------------- certify_dataset resumption

class Interrupt(Exception):
    pass


@pytest.fixture
def certify_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 10))  # votes depend on the noise: counts vary by seed
    smooth = Smooth(model, num_classes=10, sigma=0.5, batch_size=64)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 4, 4, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    idx = [0, 20, 40, 60, 80, 100]
    return smooth, x, y, idx


def _certify(setup, out, fingerprint, progress=None, log=print):
    smooth, x, y, idx = setup
    return certify_dataset(smooth, x, y, idx, n0=10, n=100, alpha=0.01, seed=3, out_tsv=out,
                           fingerprint=fingerprint, progress=progress, log=log)


def _crash_after(k):
    def wrap(iterable, total, initial):
        for count, i in enumerate(iterable):
            if count == k:
                raise Interrupt
            yield i
    return wrap


def _recording(log):
    def wrap(iterable, total, initial):
        log.append((total, initial))
        return iterable
    return wrap


def _without_time(path):
    return [{k: v for k, v in r.items() if k != "time"} for r in read_tsv(path)]


FP = {"model_sha256": "ab" * 32, "certify": {"n0": 10, "n": 100, "alpha": 0.01}, "data": "cd" * 32}


def test_certify_dataset_uninterrupted(certify_setup, tmp_path):
    out = tmp_path / "res" / "fp32_sigma0.5.tsv"
    rows, seconds = _certify(certify_setup, out, FP)
    assert out.read_text().splitlines()[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    table = read_tsv(out)
    assert [r["idx"] for r in table] == ["0", "20", "40", "60", "80", "100"]
    assert [int(r["label"]) for r in table] == certify_setup[2].tolist()
    assert all(int(r["correct"]) == (r["predict"] == r["label"]) for r in table)
    assert seconds > 0 and len(rows) == 6
    assert not list(out.parent.glob("*.partial*"))
    # a second run gives identical results (per-image generators seeded by (seed, idx))
    again = tmp_path / "again.tsv"
    _certify(certify_setup, again, FP)
    assert _without_time(again) == _without_time(out)


def test_certify_dataset_resumes_after_an_interruption(certify_setup, tmp_path):
    ref = tmp_path / "ref.tsv"
    _certify(certify_setup, ref, FP)

    out = tmp_path / "run" / "fp32.tsv"
    with pytest.raises(Interrupt):
        _certify(certify_setup, out, FP, _crash_after(3))
    partial = out.with_name("fp32.tsv.partial")
    assert partial.exists() and out.with_name("fp32.tsv.partial.json").exists()
    assert not out.exists()
    assert len(partial.read_text().splitlines()) == 1 + 3

    calls = []
    rows, seconds = _certify(certify_setup, out, json.loads(json.dumps(FP)), _recording(calls))
    assert calls == [(6, 3)]  # resumed after the three finished images
    assert _without_time(out) == _without_time(ref)
    assert len(read_tsv(out)) == 6 and len(rows) == 6
    assert not partial.exists() and not out.with_name("fp32.tsv.partial.json").exists()


def test_certify_dataset_drops_a_torn_last_line(certify_setup, tmp_path):
    ref = tmp_path / "ref.tsv"
    _certify(certify_setup, ref, FP)
    out = tmp_path / "run.tsv"
    with pytest.raises(Interrupt):
        _certify(certify_setup, out, FP, _crash_after(4))
    partial = out.with_name("run.tsv.partial")
    with open(partial, "a") as f:
        f.write("80\t4\t")  # killed while writing the fifth row
    calls = []
    _certify(certify_setup, out, FP, _recording(calls))
    assert calls == [(6, 4)]
    assert _without_time(out) == _without_time(ref)


def test_certify_dataset_discards_a_partial_with_another_fingerprint(certify_setup, tmp_path):
    ref = tmp_path / "ref.tsv"
    _certify(certify_setup, ref, FP)
    out = tmp_path / "run.tsv"
    with pytest.raises(Interrupt):
        _certify(certify_setup, out, {**FP, "model_sha256": "ef" * 32}, _crash_after(3))
    # make the stale rows recognisable: if they were reused, the result would show it
    partial = out.with_name("run.tsv.partial")
    lines = partial.read_text().splitlines(keepends=True)
    stale = []
    for line in lines[1:]:
        fields = line.rstrip("\n").split("\t")
        fields[3] = "9.99"
        stale.append("\t".join(fields) + "\n")
    partial.write_text(lines[0] + "".join(stale))
    assert len(read_tsv(partial)) == 3
    calls = []
    _certify(certify_setup, out, FP, _recording(calls))
    assert calls == [(6, 0)]  # started afresh
    assert _without_time(out) == _without_time(ref)
    assert all(r["radius"] != "9.99" for r in read_tsv(out))


def _interrupted_after(setup, out, k):
    with pytest.raises(Interrupt):
        _certify(setup, out, FP, _crash_after(k))
    return out.with_name(out.name + ".partial")


def _edit_rows(partial, edit):
    lines = partial.read_text().splitlines(keepends=True)
    partial.write_text(lines[0] + "".join(edit(lines[1:])))


def _swap_label(rows):
    f = rows[1].rstrip("\n").split("\t")
    f[1] = str((int(f[1]) + 1) % 10)
    return [rows[0], "\t".join(f) + "\n", *rows[2:]]


def _flip_correct(rows):
    f = rows[0].rstrip("\n").split("\t")
    f[4] = str(1 - int(f[4]))
    return ["\t".join(f) + "\n", *rows[1:]]


MISALIGNMENTS = {
    "a middle row deleted": lambda rows: [rows[0], *rows[2:]],
    "a row duplicated": lambda rows: [rows[0], rows[0], *rows[1:]],
    "rows swapped": lambda rows: [rows[1], rows[0], *rows[2:]],
    "a label changed": _swap_label,
    "correct inconsistent": _flip_correct,
    "a radius not a number": lambda rows: ["\t".join(rows[0].split("\t")[:3] + ["abc"] + rows[0].split("\t")[4:]),
                                           *rows[1:]],
    "a column missing": lambda rows: ["\t".join(rows[0].split("\t")[1:]), *rows[1:]],
    "rows for more images than exist": lambda rows: rows * 3,
}


@pytest.mark.parametrize("damage", list(MISALIGNMENTS))
def test_a_misaligned_partial_is_set_aside_not_resumed(certify_setup, tmp_path, damage):
    """Resuming used to accept any rows of the right width: deleting one middle row gave a TSV with one image
    twice, one missing, and a wrong summary, with exit 0. Every row must be the certificate of the image at its
    position, or the partial is set aside and the certification starts over."""
    ref = tmp_path / "ref.tsv"
    _certify(certify_setup, ref, FP)
    out = tmp_path / "run.tsv"
    partial = _interrupted_after(certify_setup, out, 4)
    _edit_rows(partial, MISALIGNMENTS[damage])
    calls, said = [], []
    _certify(certify_setup, out, FP, _recording(calls), said.append)
    assert calls == [(6, 0)]  # started over
    assert _without_time(out) == _without_time(ref)
    assert (tmp_path / "run.tsv.partial.corrupt").exists() and (tmp_path / "run.tsv.partial.json.corrupt").exists()
    assert any("setting" in m and "aside" in m for m in said), said


def test_a_torn_partial_settings_file_is_set_aside(certify_setup, tmp_path):
    """The .partial.json is written atomically now; a torn one (from an older run or a full disk) is set aside
    with a message, not a JSONDecodeError traceback."""
    ref = tmp_path / "ref.tsv"
    _certify(certify_setup, ref, FP)
    out = tmp_path / "run.tsv"
    _interrupted_after(certify_setup, out, 3)
    out.with_name("run.tsv.partial.json").write_text('{"model_sha2')
    said = []
    _certify(certify_setup, out, FP, None, said.append)
    assert _without_time(out) == _without_time(ref)
    assert any("unreadable" in m for m in said), said


def test_a_resumed_certification_says_so(certify_setup, tmp_path):
    out = tmp_path / "run.tsv"
    _interrupted_after(certify_setup, out, 2)
    said = []
    _certify(certify_setup, out, FP, None, said.append)
    assert any("resuming" in m and "2 of 6" in m for m in said), said


def test_radii_are_written_rounded_down(certify_setup, tmp_path, monkeypatch):
    """A radius is a lower bound: '%.6g' rounded 0.1234567 up to 0.123457, a certificate larger than proven."""
    from arq import smoothing

    monkeypatch.setattr(smoothing.Smooth, "certify",
                        lambda self, x, n0, n, alpha, gen: Certificate(1, 0.1234567, 0.6, 70))
    rows, _ = _certify(certify_setup, tmp_path / "r.tsv", FP)
    assert {r["radius"] for r in read_tsv(tmp_path / "r.tsv")} == {"0.123456"}
    g = torch.Generator().manual_seed(0)
    for value in (torch.rand(2000, generator=g, dtype=torch.float64) * 3).tolist():
        text = format_bound(value)
        assert float(text) <= value and value - float(text) <= 1e-5 * value
        assert float(format_bound(value, ROUND_CEILING)) >= value


def test_smooth_runs_a_base_classifier_without_parameters():
    fixed = nn.Sequential(nn.Flatten(), nn.Identity())  # no parameters, no buffers: a fixed function of x
    smooth = Smooth(lambda_module(lambda x: torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long),
                                                                          10).float()), 10, 0.25)
    assert smooth.device == torch.device("cpu")
    cert = smooth.certify(torch.rand(3, 4, 4), 10, 100, 0.01, torch.Generator().manual_seed(0))
    assert cert.prediction == 0 and cert.radius > 0
    assert Smooth(fixed, 10, 0.25).device == torch.device("cpu")


def lambda_module(fn):
    class Fn(nn.Module):
        def forward(self, x):
            return fn(x)
    return Fn()


# --------------------------------------------------------------------- the certify stage, in process

def _prepared_like_load_prepared():
    """A Prepared as load_prepared returns it: every split uint8 pixels, as stored in the prepared file."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(10)
    return Prepared(train=Split(x, y), val=Split(x, y), cert=Split(x, y), cert_idx=torch.arange(0, 200, 20),
                    manifest={"classes": list(CLASSES), "file_sha256": "ab" * 32, "cert_rule": "every 20-th",
                              "note": "synthetic"})


def test_run_certify_writes_what_the_report_reads(tmp_path, smoke_config):
    torch.manual_seed(0)
    model_path = tmp_path / "model.pt"
    models.save_checkpoint(model_path, models.build("resnet20"), "resnet20", sigma=0.25)
    data = _prepared_like_load_prepared()
    cfg = smoke_config
    cfg["certify"].update(n0=4, n=16, batch_size=20, max_images=5)
    cfg["report"]["radii"] = RADII
    out = tmp_path / "c" / "fp32_sigma0.25.tsv"
    summary = run_certify(cfg, model_path, data, out, tmp_path / "c" / "fp32_sigma0.25.json", torch.device("cpu"),
                          "fp32", 0.25)
    on_disk = json.loads((tmp_path / "c" / "fp32_sigma0.25.json").read_text())
    assert on_disk == summary
    synthetic = json.loads(_write_summary(tmp_path / "s.json", 0.25, ROWS_025).read_text())
    assert set(on_disk) == set(synthetic)  # the report tests use the real format
    assert summary["sigma"] == 0.25 and summary["n"] == 16 and summary["images"] == 5
    assert summary["max_certifiable_radius"] == round(max_radius(0.25, 16, 0.001), 4)
    rows = read_tsv(out)
    assert [int(r["idx"]) for r in rows] == [0, 40, 80, 120, 160]
    df = report.run(cfg, [str(tmp_path / "c" / "fp32_sigma0.25.json")], [str(out)], str(tmp_path / "t.md"),
                    str(tmp_path / "t.csv"), str(tmp_path / "f.png"), str(tmp_path / "f.pdf"))
    assert df["images"].tolist() == [5]


class RangeSpy(nn.Module):
    """Records the largest input magnitude it is fed; votes class 0."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.max_abs = 0.0

    def forward(self, x):
        self.max_abs = max(self.max_abs, float(x.abs().max()))
        return torch.zeros(len(x), 10).index_fill_(1, torch.tensor([0]), 1.0)


@pytest.mark.parametrize("stage", ["certify", "predict"])
def test_smoothing_stages_add_noise_to_pixels_in_unit_range(tmp_path, smoke_config, monkeypatch, stage,
                                                           tiny_source):
    """Training adds noise to pixels in [0,1] (train.augment / noisy_accuracy divide by 255); CERTIFY and
    PREDICT, fed what prepare + load_prepared produce, must smooth the same input, not 0..255 pixel values."""
    from arq import smoothing
    from arq.data import load_prepared, prepare

    cfg = smoke_config
    cfg["data"].update(path=str(tiny_source.root), val_size=4, cert_skip=1)
    prepare(cfg, tmp_path / "prep" / "d.pt", tmp_path / "prep" / "m.json")
    data = load_prepared(tmp_path / "prep" / "d.pt", tmp_path / "prep" / "m.json")
    spy = RangeSpy()
    monkeypatch.setattr(models, "load_checkpoint", lambda path, arch=None, **kw: (spy, {"arch": arch, "sigma": 0.25}))
    model_path = tmp_path / "model.pt"
    model_path.write_bytes(b"stand-in")  # hashed for the resume fingerprint only
    cfg["certify"].update(n0=4, n=16, batch_size=20, max_images=3)
    if stage == "certify":
        smoothing.run_certify(cfg, model_path, data, tmp_path / "c.tsv", tmp_path / "c.json", torch.device("cpu"),
                              "fp32", 0.25)
    else:
        smoothing.run_predict(cfg, model_path, data, tmp_path / "p.tsv", 16, 0.001, torch.device("cpu"), "fp32", 0.25)
    assert spy.max_abs > 0.5  # it saw the images
    # pixels in [0,1] plus N(0, 0.25²) noise stay far below 1 + 8σ = 3 for 3×16×3072 draws
    assert spy.max_abs < 3.0, f"the base classifier saw inputs up to {spy.max_abs:.1f}: pixels were not scaled to [0,1]"


# ------------------------------------------------------------- a checkpoint must be what the outputs claim

@pytest.mark.parametrize("sigma, method, profile, complaint", [
    (0.5, "fp32", "smoke", "trained at σ=0.5, but this stage is for σ=0.25"),
    (0.25, "uniform_w4a4", "smoke", "holds the model 'uniform_w4a4', but this stage is for 'fp32'"),
    (0.25, "fp32", "cpu-short", "belongs to profile 'cpu-short', but this run is profile 'smoke'"),
])
def test_certify_refuses_a_checkpoint_for_another_sigma_method_or_profile(tmp_path, smoke_config, sigma, method,
                                                                          profile, complaint):
    """A σ=0.5 checkpoint used to certify into a file named for σ=0.25 with exit 0."""
    cfg = smoke_config
    model_path = tmp_path / "model.pt"
    models.save_checkpoint(model_path, models.build("resnet20"), "resnet20", sigma=sigma, method=method,
                           profile=profile)
    with pytest.raises(models.CheckpointError, match=complaint.replace("(", r"\(").replace(")", r"\)")):
        run_certify(cfg, model_path, _prepared_like_load_prepared(), tmp_path / "c.tsv", tmp_path / "c.json",
                    torch.device("cpu"), "fp32", 0.25)
    assert not (tmp_path / "c.tsv").exists() and not (tmp_path / "c.json").exists()


def test_the_cli_names_the_mismatch_instead_of_a_traceback(tmp_path, smoke_config, tiny_source, capsys):
    import yaml

    from arq.cli import main
    from arq.data import prepare

    cfg = smoke_config
    cfg["data"].update(path=str(tiny_source.root), val_size=4, cert_skip=1)
    config_file = tmp_path / "profile.yaml"
    config_file.write_text(yaml.safe_dump(cfg))
    prepare(cfg, tmp_path / "d.pt", tmp_path / "m.json", log=lambda s: None)
    model_path = tmp_path / "model.pt"
    models.save_checkpoint(model_path, models.build("resnet20"), "resnet20", sigma=0.5, profile="smoke")
    rc = main(["certify", "--config", str(config_file), "--data", str(tmp_path / "d.pt"), "--manifest",
               str(tmp_path / "m.json"), "--model", str(model_path), "--sigma", "0.25", "--out",
               str(tmp_path / "fp32_sigma0.25.tsv"), "--summary", str(tmp_path / "fp32_sigma0.25.json")])
    assert rc == 2
    assert "arq certify: error:" in capsys.readouterr().err
