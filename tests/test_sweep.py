"""The bit-width sweep (arq/sweep.py): its points, a point equal to a single run of its settings, resuming, and the
figure and tables the report makes from it."""
from __future__ import annotations

import copy
import csv
import json

import pytest
import torch

from arq import models
from arq.certify import run_certify
from arq.data import CLASSES, Prepared, Split
from arq.sweep import Point, point_config, point_model, points, run_sweep
from arq.train import finetune


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (80, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(80) % 10
    return Prepared(train=Split(x[:48], y[:48]), val=Split(x[48:], y[48:]), cert=Split(x[:10], y[:10]),
                    cert_idx=torch.arange(0, 200, 20),
                    manifest={"classes": list(CLASSES), "file_sha256": "ab" * 32, "cert_rule": "every 20-th",
                              "note": "synthetic"})


@pytest.fixture
def cfg(smoke_config):
    c = copy.deepcopy(smoke_config)
    c["finetune"].update(epochs=1, train_images=32, val_images=16, batch_size=16)
    c["quant"]["calibration"]["images"] = 16
    c["certify"].update(batch_size=20)
    c["sweep"].update(enabled=True, ptq=[8, 3], weight_only=[8, 2], qat=[4], images=4, n0=4, n=24)
    c["robust_base"]["bases"] = ["fp32", "fp32_satnl"]
    return c


def _base(path, method="fp32"):
    torch.manual_seed(0)
    models.save_checkpoint(path, models.build("resnet20"), "resnet20", sigma=0.25, method=method, profile="smoke")
    return path


def test_points_are_ptq_weight_only_and_qat_each_once(cfg):
    assert points(cfg) == [Point("ptq", 8, 8), Point("ptq", 3, 3), Point("ptq", 2, 8), Point("qat", 4, 4)]
    assert [p.name for p in points(cfg)] == ["ptq_w8a8", "ptq_w3a3", "ptq_w2a8", "qat_w4a4"]
    ptq = point_config(cfg, Point("ptq", 3, 3))
    assert ptq["finetune"]["epochs"] == 0 and point_config(cfg, Point("qat", 4, 4))["finetune"]["epochs"] == 1
    assert (ptq["certify"]["n0"], ptq["certify"]["n"], ptq["certify"]["max_images"]) == (4, 24, 4)
    assert point_model(Point("ptq", 2, 8), "fp32_satnl") == "uniform_w2a8_satnl_s0"
    assert cfg["certify"]["n"] != 24  # the profile itself is left as it was


@pytest.mark.parametrize("point", [Point("ptq", 3, 3), Point("qat", 4, 4)])
def test_a_sweep_point_is_exactly_a_single_run_of_its_settings(tmp_path, cfg, data, point):
    from arq import policy

    base = _base(tmp_path / "base.pt")
    cfg["sweep"].update(ptq=[3] if point.mode == "ptq" else [], weight_only=[], qat=[4] if point.mode == "qat" else [])
    rows = run_sweep(cfg, 0.25, "fp32", base, data, tmp_path / "s.csv", tmp_path / "s.json", tmp_path / "points",
                     torch.device("cpu"), log=lambda *_: None)
    # the same settings, run as the pipeline's own stages
    single = point_config(cfg, point)
    method = point_model(point, "fp32")
    ft = finetune(single, 0.25, base, policy.uniform_policy(single, point.tag), data, tmp_path / "m.pt",
                  tmp_path / "r.pt", tmp_path / "f.csv", tmp_path / "f.json", torch.device("cpu"), method,
                  log=lambda *_: None)
    cert = run_certify(single, 0.25, method, tmp_path / "m.pt", data, tmp_path / "c.tsv", tmp_path / "c.json",
                       torch.device("cpu"), log=lambda *_: None)
    assert len(rows) == 1
    row = rows[0]
    assert row["noisy_val_acc"] == ft["final_noisy_val_acc"]
    assert (row["clean_accuracy"], row["acr"], row["images"], row["n"]) == (cert["clean_accuracy"], cert["acr"], 4, 24)
    def rows_without_time(path):
        return [line.split("\t")[:-1] for line in path.read_text().splitlines()]

    assert rows_without_time(tmp_path / "points" / point.name / "certify.tsv") == rows_without_time(tmp_path / "c.tsv")
    assert not (tmp_path / "points" / point.name / "model.pt").exists()  # certified: the model is not kept
    with open(tmp_path / "s.csv") as f:
        on_disk = list(csv.DictReader(f))
    assert on_disk[0]["point"] == point.tag and float(on_disk[0]["acr"]) == pytest.approx(cert["acr"])


def test_a_resumed_sweep_reads_certified_points_back_and_redoes_changed_ones(tmp_path, cfg, data):
    base = _base(tmp_path / "base.pt")
    cfg["sweep"].update(ptq=[8, 3], weight_only=[], qat=[])
    said = []
    first = run_sweep(cfg, 0.25, "fp32", base, data, tmp_path / "s.csv", tmp_path / "s.json", tmp_path / "p",
                      torch.device("cpu"), log=said.append)
    said.clear()
    again = run_sweep(cfg, 0.25, "fp32", base, data, tmp_path / "s.csv", tmp_path / "s.json", tmp_path / "p",
                      torch.device("cpu"), log=said.append)
    assert [r["acr"] for r in again] == [r["acr"] for r in first]
    assert sum("read back" in s for s in said) == 2
    said.clear()
    cfg["sweep"]["n"] = 32  # other settings: every point is certified again
    run_sweep(cfg, 0.25, "fp32", base, data, tmp_path / "s.csv", tmp_path / "s.json", tmp_path / "p",
              torch.device("cpu"), log=said.append)
    assert not any("read back" in s for s in said)
    assert json.loads((tmp_path / "p" / "ptq_w8a8" / "certify.json").read_text())["n"] == 32


def test_a_sweep_refuses_a_base_of_another_variant(tmp_path, cfg, data):
    base = _base(tmp_path / "base.pt", method="fp32")
    with pytest.raises(models.CheckpointError, match="but this stage is for 'fp32_satnl'"):
        run_sweep(cfg, 0.25, "fp32_satnl", base, data, tmp_path / "s.csv", tmp_path / "s.json", tmp_path / "p",
                  torch.device("cpu"), log=lambda *_: None)
    assert not (tmp_path / "p").exists()


def test_the_sweep_figure_draws_one_curve_per_base_in_each_panel(tmp_path):
    from arq.report import figures

    rows = [{"base": base, "sigma": "0.25", "mode": mode, "w_bits": str(w), "a_bits": str(a),
             "noisy_val_acc": "0.5", "clean_accuracy": "0.6", "acr": str(0.1 * w)}
            for base in ("fp32", "fp32_symreg_satnl")
            for mode, w, a in (("ptq", 8, 8), ("ptq", 4, 4), ("ptq", 4, 8), ("qat", 4, 4), ("qat", 2, 2))]
    drawn = figures.sweep(rows, tmp_path / "s.png", tmp_path / "s.pdf", "t", "c")
    assert len(drawn) == 9  # 3 measures × 3 kinds of point, one σ
    assert all(labels == ["FP32 (plain)", "FP32 [SymReg+SatNL]"] for _, labels in drawn)
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "s.pdf").read_bytes()[:4] == b"%PDF"
