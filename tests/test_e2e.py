"""The Snakemake DAG: a full smoke-profile run on the real CIFAR-10 copy (e2e, minutes) and fast dry runs."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from arq import config as arq_config
from conftest import require_real_archive

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
ARCHIVE = (REPO / ".." / "shared" / "datasets" / "cifar10-jpeg.tar.gz").resolve()
SUMMARY_KEYS = {"clean_accuracy", "certified_accuracy", "acr", "abstain_rate", "samples_per_s", "device",
                "wall_seconds", "config_hash", "git_commit", "profile"}


def snakemake(workdir: Path, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory",
                           str(workdir), *args], cwd=workdir, capture_output=True, text=True, timeout=timeout)


def job_counts(output: str) -> dict[str, int]:
    """Parse Snakemake's 'Job stats' table."""
    counts = {}
    block = output.split("Job stats:", 1)[1]
    for line in block.splitlines()[3:]:
        m = re.fullmatch(r"\s*(\w+)\s+(\d+)\s*", line)
        if not m:
            break
        counts[m.group(1)] = int(m.group(2))
    return counts


def smoke_copy(workdir: Path) -> Path:
    """config/smoke.yaml with the data path made absolute and every output path inside ``workdir``."""
    cfg = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    cfg["data"]["path"] = str(ARCHIVE)
    cfg["paths"] = {k: str(workdir / k) for k in ("data", "results", "figures", "logs")}
    path = workdir / "smoke.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _tail(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\n--- stdout ---\n{r.stdout[-4000:]}\n--- stderr ---\n{r.stderr[-6000:]}"


# ------------------------------------------------------------------------------------------ fast dry runs

def test_dry_run_of_the_default_profile_plans_three_sigmas(tmp_path):
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config" / "config.yaml", tmp_path / "config" / "config.yaml")
    r = snakemake(tmp_path, "-n", "--cores", "1", timeout=300)
    assert r.returncode == 0, _tail(r)
    counts = job_counts(r.stdout + r.stderr)
    # FP32 arm per σ, plus W8A8 and W4A4 (one policy each, shared by the σ) finetuned and certified per σ
    # and IRS: one FP32 cache per σ, each quantized model certified incrementally against it
    assert counts == {"all": 1, "prepare_data": 1, "train_base": 3, "uniform": 2, "finetune": 6, "certify": 9,
                      "irs_cache": 3, "certify_incremental": 6, "report": 1, "total": 32}
    out = r.stdout + r.stderr
    for sigma in ("0.25", "0.5", "1.0"):
        for method in ("fp32", "uniform_w8a8", "uniform_w4a4"):
            assert f"results/paper/certify/{method}_sigma{sigma}.tsv" in out
    assert "results/paper/policies/uniform_w4a4.json" in out


def test_dry_run_with_a_configfile_where_the_default_one_is_absent(tmp_path):
    assert not (tmp_path / "config" / "config.yaml").exists()
    config = smoke_copy(tmp_path)
    r = snakemake(tmp_path, "-n", "--cores", "2", "--configfile", str(config), timeout=300)
    assert r.returncode == 0, _tail(r)
    counts = job_counts(r.stdout + r.stderr)
    assert counts["train_base"] == 1 and counts["finetune"] == 2 and counts["certify"] == 3
    assert counts["irs_cache"] == 1 and counts["certify_incremental"] == 2
    assert counts["total"] == 14  # + prepare_data, uniform ×2, report, all


def test_invalid_profile_stops_snakemake_naming_the_key(tmp_path):
    config = smoke_copy(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    cfg["certify"]["alpha"] = 0.7
    config.write_text(yaml.safe_dump(cfg))
    r = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(config), timeout=300)
    assert r.returncode != 0
    assert "certify.alpha" in r.stdout + r.stderr


# ------------------------------------------------------------------------------------------ the full run

@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    require_real_archive(ARCHIVE)
    workdir = tmp_path_factory.mktemp("smoke")
    config = smoke_copy(workdir)
    result = snakemake(workdir, "--cores", "2", "--configfile", str(config))
    return workdir, arq_config.load(config), config, result


def _check_ran(smoke_run):
    workdir, cfg, _, result = smoke_run
    assert result.returncode == 0, _tail(result)
    return workdir, cfg


@pytest.mark.e2e
def test_smoke_pipeline_succeeds(smoke_run):
    workdir, cfg = _check_ran(smoke_run)
    assert not (workdir / "config" / "config.yaml").exists()  # the default configfile was absent
    assert not list(workdir.rglob("*.partial")) and not list(workdir.rglob("*.resume.pt"))


@pytest.mark.e2e
def test_smoke_report_and_figures(smoke_run):
    workdir, cfg = _check_ran(smoke_run)
    report = workdir / "results" / "smoke" / "report"
    md, csv = report / "table.md", report / "table.csv"
    assert md.read_text().startswith("# Certification results (profile smoke)")
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("method,sigma,")
    assert len(lines) == 4
    assert [l.split(",")[0] for l in lines[1:]] == ["fp32", "uniform_w8a8", "uniform_w4a4"]  # by BitOps, FP32 first
    header = lines[0].split(",")
    bitops = [float(l.split(",")[header.index("bitops_pct")]) for l in lines[1:]]
    assert bitops[0] == 100.0 and bitops[1] == 6.25 and 1.5 < bitops[2] < 1.7
    for name, magic in (("certified_accuracy.png", b"\x89PNG"), ("certified_accuracy.pdf", b"%PDF")):
        fig = workdir / "figures" / "smoke" / name
        assert fig.stat().st_size > 1000 and fig.read_bytes().startswith(magic)


@pytest.mark.e2e
def test_smoke_training_outputs(smoke_run):
    workdir, cfg = _check_ran(smoke_run)
    models = workdir / "results" / "smoke" / "models" / "fp32_sigma0.25"
    history = (models / "train.csv").read_text().splitlines()
    assert len(history) == 1 + cfg["train"]["epochs"]
    metrics = json.loads((models / "train.json").read_text())
    assert metrics["train_images"] == cfg["train"]["train_images"] and metrics["sigma"] == 0.25
    manifest = json.loads((workdir / "data" / "prepared" / "smoke" / "manifest.json").read_text())
    assert manifest["sizes"] == {"train": 45_000, "val": 5_000, "test": 10_000, "cert": 500}


@pytest.mark.e2e
def test_smoke_summary_json(smoke_run):
    workdir, cfg = _check_ran(smoke_run)
    summary = json.loads((workdir / "results" / "smoke" / "certify" / "fp32_sigma0.25.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["profile"] == "smoke"
    assert summary["config_hash"] == arq_config.config_hash(cfg)
    assert summary["n"] == cfg["certify"]["n"] and summary["alpha"] == cfg["certify"]["alpha"]
    assert 0 <= summary["clean_accuracy"] <= 1 and 0 <= summary["abstain_rate"] <= 1
    assert summary["samples_per_s"] > 0 and summary["wall_seconds"] > 0


@pytest.mark.e2e
def test_smoke_second_run_has_nothing_to_do(smoke_run):
    workdir, _ = _check_ran(smoke_run)
    config = smoke_run[2]
    r = snakemake(workdir, "-n", "--cores", "2", "--configfile", str(config), timeout=300)
    assert r.returncode == 0, _tail(r)
    assert "Nothing to be done" in r.stdout + r.stderr


@pytest.mark.e2e
def test_smoke_certification_tsv(smoke_run):
    workdir, cfg = _check_ran(smoke_run)
    tsv = workdir / "results" / "smoke" / "certify" / "fp32_sigma0.25.tsv"
    lines = tsv.read_text().splitlines()
    assert lines[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time"]
    rows = [l.split("\t") for l in lines[1:]]
    assert all(len(r) == 6 for r in rows)
    idx = [int(r[0]) for r in rows]
    assert idx == sorted(idx) and all(i % cfg["data"]["cert_skip"] == 0 for i in idx)
    assert len({int(r[1]) for r in rows}) == 10  # spread over every class
    assert len(rows) == cfg["certify"]["max_images"]


@pytest.mark.e2e
def test_smoke_certificates_are_not_saturated(smoke_run):
    """Every image certified at exactly the largest radius n samples allow means the base classifier voted
    unanimously for every image, i.e. it saw inputs that drown out the noise (e.g. 0..255 pixels)."""
    workdir, cfg = _check_ran(smoke_run)
    summary = json.loads((workdir / "results" / "smoke" / "certify" / "fp32_sigma0.25.json").read_text())
    tsv = workdir / "results" / "smoke" / "certify" / "fp32_sigma0.25.tsv"
    radii = [float(l.split("\t")[3]) for l in tsv.read_text().splitlines()[1:]]
    at_max = sum(abs(r - summary["max_certifiable_radius"]) < 1e-3 for r in radii)
    assert at_max < len(radii), "every image was certified at the maximum radius with unanimous votes"


@pytest.mark.e2e
def test_smoke_uniform_arm(smoke_run):
    """Policies, quantized checkpoints that carry them, finetune logs, and quantized certification."""
    from arq import models

    workdir, cfg = _check_ran(smoke_run)
    results = workdir / "results" / "smoke"
    for method, bits in (("uniform_w8a8", 8), ("uniform_w4a4", 4)):
        policy = json.loads((results / "policies" / f"{method}.json").read_text())
        assert policy["architecture"] == "resnet20" and policy["produced_by"] == f"uniform W{bits}A{bits}"
        assert policy["layers"]["layer2.0.conv1"] == {"w_bits": bits, "a_bits": bits}
        assert policy["layers"]["conv1"] == {"w_bits": 8, "a_bits": 8}  # pinned
        d = results / "models" / f"{method}_sigma0.25"
        model, meta = models.load_checkpoint(d / "model.pt", "resnet20")
        assert meta["policy"]["layers"] == policy["layers"] and meta["method"] == method
        assert model.layer2[0].conv1.w_bits == bits and model.layer2[0].conv1.act.calibrated
        assert len((d / "finetune.csv").read_text().splitlines()) == 1 + cfg["finetune"]["epochs"]
        summary = json.loads((results / "certify" / f"{method}_sigma0.25.json").read_text())
        assert summary["method"] == method and summary["bitops_pct"] == policy["bitops_pct"]
        assert SUMMARY_KEYS <= set(summary) and summary["images"] == cfg["certify"]["max_images"]


@pytest.mark.e2e
def test_smoke_incremental_certification(smoke_run):
    """The FP32 cache on the val subset and IRS certificates of both quantized models against it."""
    workdir, cfg = _check_ran(smoke_run)
    irs_dir = workdir / "results" / "smoke" / "irs"
    ic = cfg["irs"]
    cache = json.loads((irs_dir / "cache_sigma0.25.json").read_text())
    assert cache["images"] == ic["images"] and cache["n"] == ic["n"]
    for method in ("uniform_w8a8", "uniform_w4a4"):
        s = json.loads((irs_dir / f"{method}_sigma0.25.json").read_text())
        assert s["method"] == method and s["images"] == ic["images"]
        assert s["confidence"] == pytest.approx(1 - (ic["alpha"] + ic["alpha_zeta"]))
        assert sum(s["branches"].values()) == ic["images"]
        assert s["fp32_acr"] == pytest.approx(cache["acr"])
        assert s["zeta_counts"] == ic["zeta_counts"]
        if s["branches"]["irs"]:  # top-class losses are a subset of the disagreements
            assert 0 <= s["top_class_loss_rate"] <= s["disagreement_rate"] <= 1
        lines = (irs_dir / f"{method}_sigma0.25.tsv").read_text().splitlines()
        assert lines[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "zeta", "branch", "time"]
        assert len(lines) == 1 + ic["images"]
