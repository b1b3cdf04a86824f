"""Summaries, tables and figures (arq/report/) and resumable dataset certification (arq/certify.py, arq/records.py)."""
from __future__ import annotations

import json
from decimal import ROUND_CEILING
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from arq import models, report
from arq.certify import certify_dataset, run_certify
from arq.data import CLASSES, Prepared, Split
from arq.records import TSV_COLUMNS, format_bound, read_tsv, summarize
from arq.smoothing import Certificate, Smooth, max_radius

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
         "wall_seconds": 12.5, "upstream": {"model": {"source": "model.pt", "config_hash": "0" * 16}}}
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

# a second model certified on the same σ=0.25 images: correct only on images 0 and 20, with other radii
ROWS_025_B = [(0, 0, 0, 0.3, 1), (20, 1, 1, 0.2, 1), (40, 2, -1, 0.0, 0), (60, 3, 5, 0.3, 0), (80, 4, 1, 0.1, 0),
              (100, 5, -1, 0.0, 0)]


def _policy(path, method, w, a):
    from arq import cost, policy

    costs = cost.for_arch("resnet20")
    rules = policy.rules_for("resnet20", costs, {"pin_first_last": True, "pinned_bits": 8, "min_bits": 2,
                                                 "max_bits": 8})
    doc = policy.make(policy.uniform_layers(rules, w, a), costs, rules, method)
    if method.startswith("arq"):
        doc.update(seconds_per_episode={"seconds_calibrate": 1.0, "seconds_finetune": 2.0, "seconds_reward": 3.0,
                                        "seconds_agent": 0.5}, episodes=10, reward_kind="arq")
    policy.save(path, doc)
    return path


@pytest.fixture
def results(tmp_path):
    d = tmp_path / "certify"
    d.mkdir()
    # listed σ = 0.5 first: the table and the figure must both come out sorted by σ
    summaries = [_write_summary(d / "fp32_sigma0.5.json", 0.5, ROWS_050),
                 _write_summary(d / "fp32_sigma0.25.json", 0.25, ROWS_025)]
    tsvs = [_write_tsv(d / "fp32_sigma0.5.tsv", ROWS_050), _write_tsv(d / "fp32_sigma0.25.tsv", ROWS_025)]
    return [str(s) for s in summaries], [str(t) for t in tsvs]


@pytest.fixture
def comparison(tmp_path, results):
    """FP32 at two σ plus an 'ARQ' model (a W4A4 policy under that name) at σ=0.25 on the same images."""
    summaries, tsvs = results
    d = tmp_path / "certify"
    s = json.loads(_write_summary(d / "arq_b1.5_sigma0.25.json", 0.25, ROWS_025_B).read_text())
    s.update(method="arq_b1.5", bitops_pct=1.613)
    (d / "arq_b1.5_sigma0.25.json").write_text(json.dumps(s))
    _write_tsv(d / "arq_b1.5_sigma0.25.tsv", ROWS_025_B)
    pol = _policy(tmp_path / "arq_b1.5_sigma0.25.json", "arq_b1.5", 4, 4)
    return (summaries + [str(d / "arq_b1.5_sigma0.25.json")], tsvs + [str(d / "arq_b1.5_sigma0.25.tsv")],
            [str(pol)])


def _cache(tmp_path, sigma=0.25, seconds=35.0):
    """The FP32 IRS cache summary a certified-reward search's policy time includes."""
    path = tmp_path / f"cache_sigma{sigma}.json"
    path.write_text(json.dumps({"sigma": sigma, "wall_seconds": seconds}))
    return [str(path)]


def _approx(v):  # the CSV keeps 6 significant digits
    return pytest.approx(v, rel=1e-5)


def test_the_comparison_table_against_hand_computed_values(comparison, tmp_path, smoke_config):
    summaries, tsvs, policies = comparison
    smoke_config["report"].update(radii=RADII, bootstrap=2000, seed=0)
    out = report.outputs(tmp_path / "report", tmp_path / "fig", searches=False)
    caches = [tmp_path / "cache_sigma0.25.json", tmp_path / "cache_sigma0.5.json"]
    caches[0].write_text(json.dumps({"sigma": 0.25, "wall_seconds": 35.0}))
    caches[1].write_text(json.dumps({"sigma": 0.5, "wall_seconds": 1000.0}))
    tables = report.run(smoke_config, summaries, tsvs, policies, [], out, [str(c) for c in caches])
    main = pd.read_csv(out["table_csv"])
    assert main["method"].tolist() == ["fp32", "arq_b1.5", "fp32"] and main["sigma"].tolist() == [0.25, 0.25, 0.5]
    fp = main.iloc[0]
    # 4 of 6 correct: Clopper–Pearson 95% = (Beta(.025; 4, 3), Beta(.975; 5, 2))
    assert (fp["clean"], fp["clean_lo"], fp["clean_hi"]) == _approx((4 / 6, 0.2227781, 0.9567281))
    assert fp["r=0.25"] == _approx(2 / 6) and fp["ACR"] == _approx(0.9 / 6)
    assert fp["ACR_lo"] <= fp["ACR"] <= fp["ACR_hi"] and fp["abstain"] == _approx(1 / 6)
    assert fp["w_bits"] == 32 and np.isnan(fp["policy_seconds"])
    arq = main.iloc[1]
    assert arq["name"] == "ARQ" and arq["bitops_pct"] == _approx(1.613)
    assert arq["policy_seconds"] == _approx(100.0)  # 6.5 s per episode × 10 episodes + its σ's IRS cache, 35 s
    assert 4 < arq["w_bits"] < 4.2 and 4 < arq["a_bits"] < 4.2  # W4A4 with the 8-bit first conv and last FC
    # N = 100,000 at α = .001 certifies at most σ·Φ⁻¹(.001^(1/N)) ≈ 1.1 at σ=0.25: radii above it are left out
    assert "r=1.25" in main.columns and np.isnan(main.iloc[0]["r=1.25"]) and main.iloc[2]["r=1.25"] == 0

    tests = pd.read_csv(out["tests_csv"])
    t = tests[(tests["method"] == "arq_b1.5") & (tests["vs"] == "FP32")].set_index("measure")
    # clean: FP32 alone right on images 80 and 100, ARQ alone on none → exact McNemar p = 2·½² = .5
    assert (t.loc["clean", "only_method"], t.loc["clean", "only_reference"]) == (0, 2)
    assert t.loc["clean", "p"] == _approx(0.5) and t.loc["clean", "diff"] == _approx(-2 / 6)
    # r = 0.25: FP32 certifies 0 and 80, ARQ only 0 → one discordant image, p = 1
    assert (t.loc["r=0.25", "only_reference"], t.loc["r=0.25", "p"]) == (1, 1.0)
    acr = t.loc["ACR"]
    assert acr["diff"] == _approx((0.5 - 0.9) / 6) and acr["low"] <= acr["diff"] <= acr["high"]
    assert 0 < acr["p"] <= 1  # a bootstrap p is never exactly 0
    # FP32 is the reference, never a tested method: FP32 − ARQ would repeat ARQ − FP32 with the sign flipped
    assert set(tests["vs"]) == {"FP32"} and not (tests["method"] == "fp32").any()
    assert tables["main"].shape[0] == 3

    md = Path(out["table_md"]).read_text()
    assert md.startswith("# Method comparison (profile smoke)") and "## σ = 0.25" in md and "## σ = 0.5" in md
    assert "0.667 (0.223–0.957)" in md and "Paired differences, method − reference" in md and "| 100 s |" in md
    assert "| ARQ | FP32 | -0.333 p=0.500 |" in md  # each row names its reference
    tex = Path(out["table_tex"]).read_text()
    assert tex.count(r"\\") == 4 and r"\toprule" in tex and "ARQ" in tex  # header + three rows
    assert tex.isascii(), "pdfLaTeX stops at a raw Unicode character"
    assert "$0.667^{+0.290}_{-0.444}$" in tex  # the asymmetric Clopper–Pearson interval
    for key in ("certified", "bits", "pareto"):
        png, pdf = out[key]
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(pdf).read_bytes()[:5] == b"%PDF-"
    assert "search" not in out


def test_the_figures_draw_one_panel_per_sigma_with_display_names(comparison, tmp_path, smoke_config, monkeypatch):
    from arq.report import figures

    summaries, tsvs, policies = comparison
    drawn = {}
    for name in ("certified_accuracy", "bits_per_layer", "pareto", "search_curves"):
        real = getattr(figures, name)
        monkeypatch.setattr(figures, name, lambda *a, _real=real, _name=name, **k: drawn.setdefault(
            _name, _real(*a, **k)))
    csv_path = tmp_path / "arq_b1.5_sigma0.25.csv"
    csv_path.write_text("episode,reward,best_reward\n1,-0.2,-0.2\n2,-0.1,-0.1\n3,-0.3,-0.1\n")
    haq_csv = tmp_path / "haq_b1.5_sigma0.25.csv"
    haq_csv.write_text("episode,reward,best_reward\n1,-1.0,-1.0\n2,-0.5,-0.5\n")
    out = report.outputs(tmp_path / "report", tmp_path / "fig", searches=True)
    report.run(smoke_config, summaries, tsvs, policies, [str(csv_path), str(haq_csv)], out, _cache(tmp_path))
    assert drawn["certified_accuracy"] == [("σ = 0.25", ["FP32 (100% BitOps)", "ARQ (1.61% BitOps)"]),
                                           ("σ = 0.5", ["FP32 (100% BitOps)"])]
    assert drawn["bits_per_layer"] == [("σ = 0.25", ["ARQ"])]
    assert drawn["pareto"] == [("σ = 0.25", ["FP32", "ARQ"]), ("σ = 0.5", ["FP32"])]
    assert [labels for _, labels in drawn["search_curves"]] == [["ARQ"], ["HAQ"]]
    for png, pdf in (out[k] for k in ("certified", "bits", "pareto", "search")):
        assert Path(png).stat().st_size > 1000 and Path(pdf).stat().st_size > 1000


def test_report_requires_one_tsv_per_summary_and_a_policy_per_quantized_model(comparison, tmp_path, smoke_config):
    summaries, tsvs, policies = comparison
    out = report.outputs(tmp_path / "r", tmp_path / "f", searches=False)
    with pytest.raises(ValueError, match="same number"):
        report.run(smoke_config, summaries, tsvs[:1], policies, [], out)
    with pytest.raises(ValueError, match="no policy given for arq_b1.5"):
        report.run(smoke_config, summaries, tsvs, [], [], out)


def test_paired_tests_refuse_results_on_different_images(comparison, tmp_path, smoke_config):
    summaries, tsvs, policies = comparison
    rows = [(i + 1, *rest) for i, *rest in ROWS_025_B]
    _write_tsv(Path(tsvs[-1]), rows)
    with pytest.raises(ValueError, match="different images"):
        report.run(smoke_config, summaries, tsvs, policies, [], report.outputs(tmp_path / "r", tmp_path / "f", False),
                   _cache(tmp_path))


def test_a_certified_reward_search_without_its_cache_summary_is_refused(comparison, tmp_path, smoke_config):
    """Its policy time would silently leave out the FP32 IRS cache it was scored against."""
    summaries, tsvs, policies = comparison
    with pytest.raises(ValueError, match=r"arq_b1.5 at σ=0.25 .*--irs-caches"):
        report.run(smoke_config, summaries, tsvs, policies, [], report.outputs(tmp_path / "r", tmp_path / "f", False))


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
    summary = run_certify(cfg, 0.25, "fp32", model_path, data, out, tmp_path / "c" / "fp32_sigma0.25.json",
                          torch.device("cpu"))
    on_disk = json.loads((tmp_path / "c" / "fp32_sigma0.25.json").read_text())
    assert on_disk == summary
    synthetic = json.loads(_write_summary(tmp_path / "s.json", 0.25, ROWS_025).read_text())
    assert set(on_disk) == set(synthetic)  # the report tests use the real format
    assert summary["sigma"] == 0.25 and summary["n"] == 16 and summary["images"] == 5
    assert summary["max_certifiable_radius"] == round(max_radius(0.25, 16, 0.001), 4)
    rows = read_tsv(out)
    assert [int(r["idx"]) for r in rows] == [0, 40, 80, 120, 160]
    tables = report.run(cfg, [str(tmp_path / "c" / "fp32_sigma0.25.json")], [str(out)], [], [],
                        report.outputs(tmp_path / "r", tmp_path / "f", searches=False, quantized=False))
    assert "bits" not in report.outputs(tmp_path / "r", tmp_path / "f", searches=False, quantized=False)
    assert tables["main"]["images"].tolist() == [5]


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
    from arq import certify
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
        certify.run_certify(cfg, 0.25, "fp32", model_path, data, tmp_path / "c.tsv", tmp_path / "c.json",
                            torch.device("cpu"))
    else:
        certify.run_predict(cfg, 0.25, "fp32", model_path, data, tmp_path / "p.tsv", 16, 0.001, torch.device("cpu"))
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
        run_certify(cfg, 0.25, "fp32", model_path, _prepared_like_load_prepared(), tmp_path / "c.tsv",
                    tmp_path / "c.json", torch.device("cpu"))
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


def test_a_long_caption_is_wrapped_within_a_one_panel_figure(comparison, tmp_path):
    from PIL import Image

    from arq.report import figures
    from arq.report.results import load

    summaries, tsvs, policies = comparison
    one_sigma = [load(s, t, policies) for s, t in zip(summaries, tsvs) if "0.25" in s]
    png, pdf = tmp_path / "c.png", tmp_path / "c.pdf"
    caption = "Profile 'cpu': 200 CIFAR-10 test images per model, N = 2,000 noise samples. " * 6
    figures.certified_accuracy(one_sigma, png, pdf, "title", caption)
    width, height = Image.open(png).size
    # 5.4 in at 150 dpi, plus the 0.1 in padding: the caption did not widen the figure, it added lines below it
    assert width <= 5.4 * 150 + 2 * 0.1 * 150 + 2 and height > 4.4 * 150


def test_each_budget_of_a_sweep_has_its_own_style_and_one_budget_keeps_the_family_style():
    from arq.report.figures import style

    sweep = [1.5, 3.0]
    assert style("arq_b1.5", sweep) != style("arq_b3.0", sweep)
    assert style("arq_b1.5", sweep)["color"] == style("arq_b3.0", sweep)["color"]
    assert style("arq_b1.5", [1.5]) == style("arq_b1.5")
    assert style("haq_b1.5")["marker"] != style("arq_b1.5")["marker"]


@pytest.fixture
def seeded(tmp_path, results):
    """FP32 plus ARQ at σ=0.25 with two seeds on the same images: seed 0 certifies ROWS_025_B, seed 1 ROWS_025."""
    summaries, tsvs = results
    d = tmp_path / "certify"
    policies = []
    for seed, (rows, w) in enumerate(((ROWS_025_B, 4), (ROWS_025, 3))):
        name = f"arq_b1.5_s{seed}"
        s = json.loads(_write_summary(d / f"{name}_sigma0.25.json", 0.25, rows).read_text())
        s.update(method=name, bitops_pct=1.4 + 0.1 * seed)
        (d / f"{name}_sigma0.25.json").write_text(json.dumps(s))
        summaries.append(str(d / f"{name}_sigma0.25.json"))
        tsvs.append(str(_write_tsv(d / f"{name}_sigma0.25.tsv", rows)))
        policies.append(str(_policy(tmp_path / f"{name}_sigma0.25.json", name, w, w)))
    return summaries, tsvs, policies


def test_a_method_with_several_seeds_is_their_mean_with_sd_and_per_seed_rows(seeded, tmp_path, smoke_config):
    summaries, tsvs, policies = seeded
    smoke_config["report"].update(radii=RADII, bootstrap=2000, seed=0)
    out = report.outputs(tmp_path / "report", tmp_path / "fig", searches=False)
    tables = report.run(smoke_config, summaries, tsvs, policies, [], out, _cache(tmp_path) + _cache(tmp_path, 0.5))
    main = tables["main"].set_index(["sigma", "method"])
    arq = main.loc[(0.25, "arq_b1.5")]
    # seed 0: 2 of 6 correct, ACR 0.5/6; seed 1: 4 of 6, ACR 0.9/6 (worked out by hand from the rows)
    assert arq["seeds"] == 2 and arq["clean"] == pytest.approx(3 / 6)
    assert arq["clean_sd"] == pytest.approx(np.std([2 / 6, 4 / 6], ddof=1))
    assert arq["ACR"] == pytest.approx(0.7 / 6) and arq["ACR_sd"] == pytest.approx(np.std([0.5 / 6, 0.9 / 6], ddof=1))
    assert arq["bitops_pct"] == pytest.approx(1.45)  # the seeds' policies differ in cost: their mean
    assert arq["clean_lo"] <= arq["clean"] <= arq["clean_hi"] and arq["ACR_lo"] <= arq["ACR"] <= arq["ACR_hi"]
    assert 3 < arq["w_bits"] < 4.2  # the mean of a W4A4 and a W3A3 policy (pinned layers at 8)
    # the CSV keeps each seed's row and the across-seed row (seed empty)
    csv = pd.read_csv(out["table_csv"])
    rows = csv[(csv["method"] == "arq_b1.5") & (csv["sigma"] == 0.25)]
    assert rows["seed"].tolist()[:2] == [0, 1] and np.isnan(rows["seed"].tolist()[2])
    assert rows["clean"].tolist() == pytest.approx([2 / 6, 4 / 6, 3 / 6], rel=1e-5)
    assert rows["seeds"].tolist() == [1, 1, 2]
    # paired against FP32 over both seeds: the hierarchical bootstrap, also for accuracies
    t = tables["tests"].set_index(["method", "vs", "measure"]).loc[("arq_b1.5", "FP32")]
    assert set(t["test"]) == {"paired hierarchical bootstrap"} and (t["seeds"] == 2).all()
    assert t.loc["clean", "diff"] == pytest.approx(((2 - 4) / 6 + 0) / 2)
    assert t.loc["ACR", "diff"] == pytest.approx(((0.5 - 0.9) / 6 + 0) / 2)
    md = Path(out["table_md"]).read_text()
    assert "| method | seeds |" in md and "ACR SD" in md and "hierarchical bootstrap" in md
    assert json.loads(Path(out["metrics"]).read_text())["arq_b1.5_sigma0.25"]["ACR"] == pytest.approx(0.7 / 6, 1e-5)


def test_one_seed_gives_exactly_the_single_model_row(comparison, seeded, tmp_path, smoke_config):
    """A one-seed method (named with its seed) gets the same numbers as before seeds existed."""
    smoke_config["report"].update(radii=RADII, bootstrap=2000, seed=0)
    old = report.run(smoke_config, *comparison, [], report.outputs(tmp_path / "a", tmp_path / "fa", searches=False),
                     _cache(tmp_path) + _cache(tmp_path, 0.5))["main"]
    summaries, tsvs, policies = seeded
    keep = [i for i, s in enumerate(summaries) if "_s1_" not in s]
    new = report.run(smoke_config, [summaries[i] for i in keep], [tsvs[i] for i in keep], policies[:1],
                     [], report.outputs(tmp_path / "b", tmp_path / "fb", searches=False),
                     _cache(tmp_path) + _cache(tmp_path, 0.5))["main"]
    cols = ["clean", "clean_lo", "clean_hi", "r=0.25", "r=0.25_lo", "ACR", "ACR_lo", "ACR_hi", "abstain"]
    assert np.allclose(old[cols].to_numpy(float), new[cols].to_numpy(float))


# ------------------------------------------------------------------------------------- robust base variants

def test_robust_bases_are_reported_beside_their_plain_counterparts_not_in_the_comparison(tmp_path, smoke_config):
    """fp32 and arq_b1.5 from the plain base, their fp32_satnl and arq_b1.5_satnl counterparts: the comparison is
    the plain one exactly; robust.md/csv pair each robust model with its plain counterpart, robust − plain."""
    d = tmp_path / "certify"
    d.mkdir()
    files = {}
    for name, table, bitops in (("fp32", ROWS_025, 100.0), ("fp32_satnl", ROWS_025_B, 100.0),
                                ("arq_b1.5", ROWS_025_B, 1.613), ("arq_b1.5_satnl", ROWS_025, 1.613)):
        s = json.loads(_write_summary(d / f"{name}_sigma0.25.json", 0.25, table).read_text())
        s.update(method=name, bitops_pct=bitops)
        (d / f"{name}_sigma0.25.json").write_text(json.dumps(s))
        files[name] = (str(d / f"{name}_sigma0.25.json"), str(_write_tsv(d / f"{name}_sigma0.25.tsv", table)))
    policies = [str(_policy(tmp_path / f"{m}_sigma0.25.json", m, 4, 4)) for m in ("arq_b1.5", "arq_b1.5_satnl")]
    caches = []
    for base, seconds in (("fp32", 35.0), ("fp32_satnl", 50.0)):
        path = tmp_path / f"cache_{base}.json"
        path.write_text(json.dumps({"base": base, "sigma": 0.25, "wall_seconds": seconds}))
        caches.append(str(path))
    summaries, tsvs = zip(*files.values())
    robust = [report.is_robust(s) for s in summaries]
    assert robust == [False, True, False, True]
    out = report.outputs(tmp_path / "r", tmp_path / "f", False, True, robust=True)
    tables = report.run(smoke_config, list(summaries), list(tsvs), policies, [], out, caches)
    assert tables["main"]["method"].tolist() == ["fp32", "arq_b1.5"]  # the plain comparison only
    plain_only = report.outputs(tmp_path / "p", tmp_path / "pf", False, True)
    report.run(smoke_config, [files[m][0] for m in ("fp32", "arq_b1.5")], [files[m][1] for m in ("fp32", "arq_b1.5")],
               policies[:1], [], plain_only, caches[:1])
    assert (tmp_path / "r" / "table.md").read_text() == (tmp_path / "p" / "table.md").read_text()
    rows = pd.read_csv(out["robust_csv"])
    assert rows["method"].tolist() == ["fp32", "fp32_satnl", "arq_b1.5", "arq_b1.5_satnl"]
    assert rows["base"].tolist() == ["fp32", "fp32_satnl", "fp32", "fp32_satnl"]
    assert rows["name"].tolist() == ["FP32", "FP32 [SatNL]", "ARQ", "ARQ [SatNL]"]
    by = rows.set_index("method")
    # each arq search's policy time includes its own base's IRS cache
    assert by.loc["arq_b1.5_satnl", "policy_seconds"] - by.loc["arq_b1.5", "policy_seconds"] == pytest.approx(15.0)
    tests = pd.read_csv(out["robust_tests_csv"])
    assert set(tests["vs"]) == {"plain base"}
    acr = tests[tests["measure"] == "ACR"].set_index("method")
    assert acr.loc["arq_b1.5_satnl", "reference"] == "arq_b1.5" and acr.loc["fp32_satnl", "reference"] == "fp32"
    assert acr.loc["arq_b1.5_satnl", "diff"] == pytest.approx(EXPECTED[0.25]["acr"] - by.loc["arq_b1.5", "ACR"])
    md = Path(out["robust_md"]).read_text()
    assert md.startswith("# Robust bases (profile smoke)") and "| ARQ [SatNL] |" in md and "plain base" not in md.split("Paired")[0]
