"""The Snakemake DAG: a full smoke-profile run on the real CIFAR-10 copy (e2e, minutes) and fast dry runs."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from arq import config as arq_config
from arq import models
from conftest import require_real_archive
from documented import repository_copy, link_beside, run_documented

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
    require_real_archive(ARCHIVE)  # the DAG checks the source exists before planning prepare_data
    (tmp_path / "config").mkdir()
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["data"]["path"] = str(ARCHIVE)
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = snakemake(tmp_path, "-n", "--cores", "1", timeout=300)
    assert r.returncode == 0, _tail(r)
    counts = job_counts(r.stdout + r.stderr)
    # FP32 arm per σ, plus W8A8 and W4A4 (one policy each, shared by the σ) finetuned and certified per σ,
    # three searches (arq, haq, random) per σ at the one budget, each finetuned and certified,
    # HAWQ (one Hessian per σ, one allocation per σ and budget), each finetuned and certified,
    # and IRS: one FP32 cache per σ, each quantized model certified incrementally against it
    # plus, at the 1.5% budget, the uniform policies with the most bits that fit it (W4A3 and W3A4)
    assert counts == {"all": 1, "prepare_data": 1, "train_base": 3, "uniform": 4, "search": 9, "hessian": 3,
                      "allocate_hawq": 3, "finetune": 24, "certify": 27, "irs_cache": 3, "certify_incremental": 24,
                      "report": 1, "total": 103}
    out = r.stdout + r.stderr
    for sigma in ("0.25", "0.5", "1.0"):
        for model in ("fp32", "uniform_w8a8_s0", "uniform_w4a4_s0", "uniform_w4a3_s0", "uniform_w3a4_s0",
                      "hawq_b1.5_s0", "arq_b1.5_s0", "haq_b1.5_s0", "random_b1.5_s0"):
            assert f"results/paper/certify/{model}_sigma{sigma}.tsv" in out
    assert "results/paper/policies/uniform_w4a4.json" in out
    # the dry run states the profile's cost before anything runs, the searches and IRS included
    estimate = re.search(r"\[arq\] profile 'paper' on this CPU \(1 threads?\): about .*", out)
    assert estimate and all(stage in estimate.group(0) for stage in ("training", "searches", "HAWQ", "IRS"))
    assert out.count("[arq] profile") == 1


def test_dry_run_of_the_cpu_study_plans_every_seed_and_budget(tmp_path):
    """Seeds are a DAG dimension: three seeds × (three searches at 1.0%, HAWQ-V3, and the uniform W8A8, W4A4 and
    W3A3, the one with the most bits within 1.0%), one seed × (three searches at 0.7%, HAWQ-V3, and W3A2 and W2A3,
    the most bits within 0.7%), each finetuned, certified and certified incrementally once per seed; FP32 once."""
    require_real_archive(ARCHIVE)
    cfg = yaml.safe_load((REPO / "config" / "cpu.yaml").read_text())
    cfg["data"]["path"] = str(ARCHIVE)
    cfg["paths"] = {k: str(tmp_path / k) for k in ("data", "results", "figures", "logs")}
    config = tmp_path / "cpu.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = snakemake(tmp_path, "-n", "--cores", "2", "--configfile", str(config), timeout=300)
    assert r.returncode == 0, _tail(r)
    # issue 24 on the same models: a SymReg+SatNL base with its Hessian, IRS cache and sweep, and W3A3, HAWQ-V3,
    # HAQ and ARQ at 1.0% made from it with seeds 0-2 (4 × 3 more finetuned, certified, certified incrementally)
    assert job_counts(r.stdout + r.stderr) == {
        "all": 1, "prepare_data": 1, "train_base": 2, "uniform": 5, "hessian": 2, "allocate_hawq": 3, "search": 18,
        "irs_cache": 2, "finetune": 39, "certify": 41, "certify_incremental": 39, "sweep": 2, "report": 1,
        "total": 156}
    out = r.stdout + r.stderr
    res = tmp_path / "results" / "cpu"
    for name in ("uniform_w3a3_s2", "uniform_w2a3_s0", "hawq_b0.7_s0", "arq_b1.0_s2", "random_b0.7_s0"):
        assert f"{res}/certify/{name}_sigma0.25.tsv" in out
    for name in ("uniform_w3a2_s1", "hawq_b0.7_s2", "arq_b0.7_s1"):  # 0.7% runs seed 0 only
        assert f"{name}_sigma0.25" not in out
    assert f"{res}/policies/haq_b1.0_s1_sigma0.25.json" in out and f"{res}/policies/hawq_b1.0_sigma0.25.json" in out
    assert "--seed 2" in out or "seed=2" in out
    for name in ("fp32_symreg_satnl", "uniform_w3a3_symreg_satnl_s2", "arq_b1.0_symreg_satnl_s1"):
        assert f"{res}/certify/{name}_sigma0.25.tsv" in out
    assert "arq_b0.7_symreg_satnl" not in out and "random_b1.0_symreg_satnl" not in out  # the arms only
    assert f"{res}/sweep/fp32_symreg_satnl_sigma0.25.csv" in out and f"{res}/sweep/fp32_sigma0.25.csv" in out


def test_lint_finds_nothing_but_the_per_rule_software_environment(tmp_path):
    """Shell commands take the interpreter and the config file through params (left out of the params rerun
    trigger), so Snakemake's linter has nothing to say but that rules name no conda environment or container."""
    require_real_archive(ARCHIVE)
    r = snakemake(tmp_path, "--lint", "--configfile", str(smoke_copy(tmp_path)), timeout=300)
    findings = set(re.findall(r"^\s+\* (.+?):?$", r.stdout + r.stderr, flags=re.M))
    assert findings == {"Specify a conda environment or container for each rule."}, _tail(r)


def test_dry_run_with_a_configfile_where_the_default_one_is_absent(tmp_path):
    assert not (tmp_path / "config" / "config.yaml").exists()
    config = smoke_copy(tmp_path)
    r = snakemake(tmp_path, "-n", "--cores", "2", "--configfile", str(config), timeout=300)
    assert r.returncode == 0, _tail(r)
    counts = job_counts(r.stdout + r.stderr)
    assert counts["train_base"] == 1 and counts["search"] == 3 and counts["finetune"] == 8 and counts["certify"] == 9
    assert counts["hessian"] == 1 and counts["allocate_hawq"] == 1
    assert counts["irs_cache"] == 1 and counts["certify_incremental"] == 8
    assert counts["total"] == 39  # + prepare_data, uniform ×4 (W8A8, W4A4, and W4A3, W3A4 for 1.5%), report, all


def test_invalid_profile_stops_snakemake_naming_the_key(tmp_path):
    config = smoke_copy(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    cfg["certify"]["alpha"] = 0.7
    config.write_text(yaml.safe_dump(cfg))
    r = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(config), timeout=300)
    assert r.returncode != 0
    assert "certify.alpha" in r.stdout + r.stderr


def _overlay(workdir: Path, name: str, settings: dict) -> Path:
    path = workdir / name
    path.write_text(yaml.safe_dump(settings))
    return path


def test_a_profile_missing_a_key_is_refused_not_filled_from_the_default(tmp_path):
    """A profile without train.epochs used to train the default profile's 90 epochs under Snakemake, while
    `arq check-config` refused the same file."""
    require_real_archive(ARCHIVE)
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config" / "config.yaml", tmp_path / "config" / "config.yaml")  # the default is present
    config = smoke_copy(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    del cfg["train"]["epochs"]
    config.write_text(yaml.safe_dump(cfg))
    r = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(config), timeout=300)
    assert r.returncode != 0
    assert "not a complete profile" in r.stdout + r.stderr and "'epochs' is a required property" in r.stdout + r.stderr
    check = subprocess.run([sys.executable, "-m", "arq", "check-config", str(config)], capture_output=True, text=True)
    assert check.returncode == 2 and "'epochs' is a required property" in check.stderr


def test_an_explicit_overlay_after_a_complete_profile_applies(tmp_path):
    require_real_archive(ARCHIVE)
    config = smoke_copy(tmp_path)
    overlay = _overlay(tmp_path, "overlay.yaml", {"train": {"epochs": 3}})
    r = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(config), str(overlay), timeout=300)
    assert r.returncode == 0, _tail(r)
    (resolved,) = (tmp_path / "results" / "smoke" / "config").glob("*.yaml")
    assert yaml.safe_load(resolved.read_text())["train"]["epochs"] == 3
    bad = _overlay(tmp_path, "bad.yaml", {"train": {"epochs": 0}})
    r = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(config), str(bad), timeout=300)
    assert r.returncode != 0 and "train.epochs" in r.stdout + r.stderr


def test_a_parse_never_changes_the_configuration_a_running_job_reads(tmp_path):
    """config.resolved.yaml used to be rewritten at every parse (a -n, or a run refused by the lock), so a
    running workflow's later jobs could read settings it was not started with. Each configuration now has its
    own file, named by its hash in the job's command, written once."""
    require_real_archive(ARCHIVE)
    config = smoke_copy(tmp_path)
    r = snakemake(tmp_path, "-n", "-p", "--cores", "1", "--configfile", str(config), timeout=300)
    assert r.returncode == 0, _tail(r)
    first = arq_config.config_hash(arq_config.load(config))
    path = tmp_path / "results" / "smoke" / "config" / f"{first}.yaml"
    assert f"--config {path}" in r.stdout + r.stderr
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    overlay = _overlay(tmp_path, "n.yaml", {"certify": {"n": 1000}})
    r = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(config), str(overlay), timeout=300)
    assert r.returncode == 0, _tail(r)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert yaml.safe_load(path.read_text())["certify"]["n"] == 500
    assert len(list(path.parent.glob("*.yaml"))) == 2
    assert not (tmp_path / "results" / "smoke" / "config.resolved.yaml").exists()


def test_a_missing_source_is_refused_before_anything_is_scheduled(tmp_path):
    config = smoke_copy(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["path"] = str(tmp_path / "nowhere" / "cifar10-jpeg.tar.gz")
    config.write_text(yaml.safe_dump(cfg))
    r = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(config), timeout=300)
    assert r.returncode != 0
    assert f"CIFAR-10 source not found: {tmp_path / 'nowhere' / 'cifar10-jpeg.tar.gz'}" in r.stdout + r.stderr


# ------------------------------------------------------------------------------------------ the full run

@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """README's main job, verbatim, in a copy of the repository (the install is CI's own)."""
    require_real_archive(ARCHIVE)
    workdir = repository_copy(tmp_path_factory.mktemp("smoke"), "repo")
    config = workdir / "config" / "smoke.yaml"
    result = run_documented("snakemake --cores all --configfile config/smoke.yaml", workdir, timeout=1800)
    return workdir, arq_config.load(config), config, result


def _check_ran(smoke_run):
    workdir, cfg, _, result = smoke_run
    assert result.returncode == 0, _tail(result)
    return workdir, cfg


@pytest.mark.e2e
def test_smoke_pipeline_succeeds(smoke_run):
    workdir, cfg = _check_ran(smoke_run)
    assert not list(workdir.rglob("*.partial")) and not list(workdir.rglob("*.resume.pt"))


@pytest.mark.e2e
def test_smoke_report_and_figures(smoke_run):
    workdir, cfg = _check_ran(smoke_run)
    report = workdir / "results" / "smoke" / "report"
    import pandas as pd

    md = (report / "table.md").read_text()
    assert md.startswith("# Method comparison (profile smoke)") and "Paired differences, method − reference" in md
    main = pd.read_csv(report / "table.csv")
    # references first, then the baselines, the control and ARQ
    assert main["method"].tolist() == ["fp32", "uniform_w8a8", "uniform_w4a4", "uniform_w4a3", "uniform_w3a4",
                                       "hawq_b1.5", "haq_b1.5", "random_b1.5", "arq_b1.5"]
    assert main["name"].tolist() == ["FP32", "Uniform W8A8", "Uniform W4A4", "Uniform W4A3", "Uniform W3A4",
                                     "HAWQ-V3", "HAQ", "Random search", "ARQ"]
    assert main["seed"].tolist()[1:] == [0] * 8 and (main["seeds"] == 1).all()  # one seed: no across-seed rows
    bitops = main["bitops_pct"].tolist()
    assert bitops[0] == 100.0 and bitops[1] == 6.25 and 1.5 < bitops[2] < 1.7
    assert all(b <= 1.5 for b in bitops[3:])  # every searched and allocated policy within the budget
    assert (main["clean_lo"] <= main["clean"]).all() and (main["clean"] <= main["clean_hi"]).all()
    assert (main["ACR_lo"] <= main["ACR"] + 1e-12).all() and (main["ACR"] <= main["ACR_hi"] + 1e-12).all()
    tests = pd.read_csv(report / "tests.csv")
    assert set(tests["vs"]) == {"ARQ", "FP32"} and (tests["p"].between(0, 1)).all()
    assert not (tests["method"] == "fp32").any()  # FP32 is a reference only
    assert set(tests[tests["vs"] == "ARQ"]["method"]) == {"uniform_w8a8", "uniform_w4a4", "uniform_w4a3",
                                                          "uniform_w3a4", "hawq_b1.5", "haq_b1.5", "random_b1.5"}
    tex = (report / "table.tex").read_text()
    assert tex.startswith("\\begin{table}") and tex.isascii()
    policy_seconds = main.set_index("method")["policy_seconds"]
    assert policy_seconds["uniform_w4a4"] == 0 and policy_seconds["hawq_b1.5"] > 0
    # the certified-reward searches also pay for the FP32 IRS cache they score against
    cache = json.loads((workdir / "results" / "smoke" / "irs" / "cache_sigma0.25.json").read_text())
    arq_policy = json.loads((workdir / "results" / "smoke" / "policies" / "arq_b1.5_s0_sigma0.25.json").read_text())
    episodes = sum(arq_policy["seconds_per_episode"].values()) * arq_policy["episodes"]
    assert policy_seconds["arq_b1.5"] == pytest.approx(episodes + cache["wall_seconds"], rel=1e-4)
    for stem in ("certified_accuracy", "bits_per_layer", "acr_vs_bitops", "search_curves"):
        for ext, magic in (("png", b"\x89PNG"), ("pdf", b"%PDF")):
            fig = workdir / "figures" / "smoke" / f"{stem}.{ext}"
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
    model = workdir / "results" / "smoke" / "models" / "fp32_sigma0.25" / "model.pt"
    assert Path(workdir, summary["upstream"]["model"]["source"]).resolve() == model.resolve()
    assert summary["upstream"]["model"]["config_hash"] == summary["config_hash"]  # made by this very config
    train = json.loads((model.parent / "train.json").read_text())
    assert train["upstream"]["data"]["config_hash"] == summary["config_hash"]
    assert summary["n"] == cfg["certify"]["n"] and summary["alpha"] == cfg["certify"]["alpha"]
    assert 0 <= summary["clean_accuracy"] <= 1 and 0 <= summary["abstain_rate"] <= 1
    assert summary["samples_per_s"] > 0 and summary["wall_seconds"] > 0


@pytest.mark.e2e
def test_smoke_second_run_has_nothing_to_do(smoke_run):
    workdir, _ = _check_ran(smoke_run)
    r = run_documented("snakemake -n --configfile config/<p>.yaml", workdir, fill={"<p>": "smoke"}, timeout=300)
    assert r.returncode == 0, _tail(r)
    assert "Nothing to be done" in r.stdout + r.stderr


# ------------------------------------------------------------- the reviewer's flow through a DVC remote

PROFILE_DIRS = ("data/prepared/smoke", "results/smoke", "figures/smoke")


def _sh(cwd: Path, *cmd: str, timeout: int = 600) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, _tail(r)
    return r.stdout + r.stderr


def _publish(root: Path) -> None:
    """What a publisher of the smoke profile does first: stop ignoring its directories (as results/cpu/ is not
    ignored); *.pt and the per-parse resolved configs stay ignored."""
    gitignore = root / ".gitignore"
    lines = gitignore.read_text().splitlines()
    kept = [line for line in lines if line not in ("results/smoke/", "figures/smoke/", "/data/prepared/smoke/")]
    assert len(lines) - len(kept) == 3
    gitignore.write_text("\n".join(kept) + "\n")


@pytest.fixture(scope="module")
def reviewer(smoke_run, tmp_path_factory):
    """A publisher's repository holding the smoke run (text in git, binaries pushed to a local-directory DVC
    remote), and a reviewer's fresh clone of it after ``arq artifacts pull``."""
    workdir, cfg = _check_ran(smoke_run)
    base = tmp_path_factory.mktemp("reviewer")
    origin, clone, remote = repository_copy(base, "origin"), base / "clone", base / "remote"
    _publish(origin)
    _sh(origin, "git", "init", "-q")
    _sh(origin, "git", "config", "user.email", "ci@example.org")
    _sh(origin, "git", "config", "user.name", "ci")
    _sh(origin, sys.executable, "-m", "dvc", "remote", "add", "-d", "ci", str(remote))
    _sh(origin, "git", "add", "-A")
    _sh(origin, "git", "commit", "-qm", "the repository, publishing the smoke profile to a local remote")
    for d in PROFILE_DIRS:  # as the run left them (copy2 keeps the modification times)
        shutil.copytree(workdir / d, origin / d, ignore=shutil.ignore_patterns("config", "fp32_sigma0.5*"))
    r = run_documented("arq artifacts push config/<p>.yaml", origin, fill={"<p>": "smoke"})
    assert r.returncode == 0, _tail(r)
    pushed = r.stdout + r.stderr
    # the publisher runs the git add line push printed, verbatim: it must leave nothing of the run behind
    add = "git add " + pushed.rsplit(": git add ", 1)[1].splitlines()[0]
    _sh(origin, "bash", "-c", add)
    left = (_sh(origin, "git", "ls-files", "--others", "--exclude-standard", "--", *PROFILE_DIRS)  # untracked
            + _sh(origin, "git", "diff", "--name-only", "--", *PROFILE_DIRS))  # changed but not staged
    assert left == "", f"{add!r} left out:\n{left}"
    _sh(origin, "git", "commit", "-qm", "smoke run: text results in git, binaries in DVC")
    _sh(base, "git", "clone", "-q", str(origin), str(clone))
    link_beside(clone)
    r = run_documented("arq artifacts pull config/<p>.yaml", clone, fill={"<p>": "smoke"})
    assert r.returncode == 0, _tail(r)
    return origin, clone, remote, pushed, r.stdout + r.stderr


def _clone_snakemake(clone: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", *args, "--configfile",
                           "config/smoke.yaml"], cwd=clone, capture_output=True, text=True, timeout=timeout)


@pytest.mark.e2e
def test_reviewer_pull_restores_every_artifact_byte_for_byte(reviewer):
    origin, clone, remote, pushed, pulled = reviewer
    from arq.io import file_digest

    binaries = sorted(str(p.relative_to(origin)) for d in PROFILE_DIRS for p in (origin / d).rglob("*.pt"))
    # prepared data, the FP32 model, six quantized models, the IRS cache, three search states
    assert len(binaries) >= 10 and "data/prepared/smoke/cifar10.pt" in binaries
    assert f"dvc add: {len(binaries)} file(s)" in pushed and f"dvc pull: {len(binaries)} file(s)" in pulled
    for rel in binaries:
        assert (clone / f"{rel}.dvc").exists(), rel  # the record is in git ...
        assert not subprocess.run(["git", "ls-files", "--error-unmatch", rel], cwd=clone,
                                  capture_output=True).returncode == 0, rel  # ... the binary is not
        assert file_digest(clone / rel, "md5") == file_digest(origin / rel, "md5"), rel
    assert len(list((remote / "files" / "md5").rglob("*"))) > len(binaries)
    r = run_documented("arq artifacts verify config/<p>.yaml", clone, fill={"<p>": "smoke"})
    assert r.returncode == 0, _tail(r)


@pytest.mark.e2e
def test_reviewer_clone_has_nothing_to_do_and_a_deleted_table_reruns_only_the_report(reviewer):
    origin, clone, *_ = reviewer
    r = run_documented("snakemake -n --configfile config/<p>.yaml", clone, fill={"<p>": "smoke"})
    assert r.returncode == 0 and "Nothing to be done" in r.stdout + r.stderr, _tail(r)
    table = clone / "results" / "smoke" / "report" / "table.md"
    before = table.read_text()
    table.unlink()
    r = _clone_snakemake(clone, "-n")
    assert r.returncode == 0, _tail(r)
    assert job_counts(r.stdout + r.stderr) == {"report": 1, "all": 1, "total": 2}
    r = _clone_snakemake(clone)
    assert r.returncode == 0, _tail(r)
    assert table.read_text() == before
    r = _clone_snakemake(clone, "-n")
    assert "Nothing to be done" in r.stdout + r.stderr, _tail(r)


@pytest.mark.e2e
def test_reviewer_clone_refuses_to_recompute_a_missing_tracked_file(reviewer):
    origin, clone, *_ = reviewer
    model = clone / "results" / "smoke" / "models" / "arq_b1.5_s0_sigma0.25" / "model.pt"
    kept = model.read_bytes()
    model.unlink()
    try:
        r = _clone_snakemake(clone, "-n")
        assert r.returncode != 0
        out = r.stdout + r.stderr
        assert "1 file(s) tracked by DVC are missing, e.g. results/smoke/models/arq_b1.5_s0_sigma0.25/model.pt" in out
        assert "arq artifacts pull config/smoke.yaml" in out
    finally:
        model.write_bytes(kept)
        _sh(clone, sys.executable, "-m", "arq", "artifacts", "pull", "config/smoke.yaml")


@pytest.mark.e2e
def test_reviewer_without_the_dataset_is_told_to_pull_not_that_the_source_is_missing(reviewer):
    """A reviewer who has not pulled yet, on a machine without the CIFAR-10 archive: the prepared data is a pull
    away, so that is what Snakemake says."""
    origin, clone, *_ = reviewer
    profile = yaml.safe_load((clone / "config" / "smoke.yaml").read_text())
    profile["data"]["path"] = str(clone / "absent" / "cifar10-jpeg.tar.gz")
    (clone / "config" / "no-archive.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    data = clone / "data" / "prepared" / "smoke" / "cifar10.pt"
    kept = data.read_bytes()
    data.unlink()
    try:
        r = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "-n", "--configfile",
                            "config/no-archive.yaml"], cwd=clone, capture_output=True, text=True, timeout=300)
        out = r.stdout + r.stderr
        assert r.returncode != 0 and "file(s) tracked by DVC are missing, e.g. data/prepared/smoke/cifar10.pt" in out
        assert "arq artifacts pull config/no-archive.yaml" in out and "prepare_data:" not in out
    finally:
        data.write_bytes(kept)
        (clone / "config" / "no-archive.yaml").unlink()
        _sh(clone, sys.executable, "-m", "arq", "artifacts", "pull", "config/smoke.yaml")


def _unpublish_data(clone: Path) -> tuple[Path, bytes, bytes]:
    """The clone as a profile with ``artifacts.prepared_data: false`` would leave it: no record of the prepared data,
    no data; returns what to put back."""
    data = clone / "data" / "prepared" / "smoke" / "cifar10.pt"
    profile = yaml.safe_load((clone / "config" / "smoke.yaml").read_text())
    profile["artifacts"]["prepared_data"] = False
    (clone / "config" / "unpublished.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    record, kept = Path(f"{data}.dvc").read_bytes(), data.read_bytes()
    Path(f"{data}.dvc").unlink()
    data.unlink()
    return data, record, kept


def _republish_data(clone: Path, data: Path, record: bytes, kept: bytes) -> None:
    data.write_bytes(kept)
    Path(f"{data}.dvc").write_bytes(record)
    (clone / "config" / "unpublished.yaml").unlink()
    _sh(clone, sys.executable, "-m", "arq", "artifacts", "pull", "config/smoke.yaml")


@pytest.mark.e2e
def test_reviewer_pull_rebuilds_unpublished_data_identical_to_the_manifest(reviewer):
    """The in-repository remote leaves the prepared data out: pull rebuilds it from the archive, byte for byte the
    data the models were made from (the committed manifest's sha256), and keeps the manifest as committed."""
    origin, clone, *_ = reviewer
    from arq.io import file_digest

    manifest = clone / "data" / "prepared" / "smoke" / "manifest.json"
    committed = manifest.read_text()
    data, record, kept = _unpublish_data(clone)
    try:
        out = _sh(clone, sys.executable, "-m", "arq", "artifacts", "pull", "config/unpublished.yaml")
        assert "rebuilding data/prepared/smoke/cifar10.pt from" in out
        assert file_digest(data) == json.loads(committed)["file_sha256"]
        assert manifest.read_text() == committed
        r = _clone_snakemake(clone, "-n")
        assert "Nothing to be done" in r.stdout + r.stderr, _tail(r)
        # a rebuild that is not the published data is refused and removed, the manifest kept
        manifest.write_text(committed.replace(json.loads(committed)["file_sha256"], "0" * 64))
        data.unlink()
        r = subprocess.run([sys.executable, "-m", "arq", "artifacts", "pull", "config/unpublished.yaml"], cwd=clone,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode != 0 and "is not the data the published models were made from" in r.stdout + r.stderr
        assert not data.exists() and '"file_sha256": "' + "0" * 64 in manifest.read_text()
    finally:
        manifest.write_text(committed)
        _republish_data(clone, data, record, kept)


@pytest.mark.e2e
def test_reviewer_pull_of_a_run_published_in_pieces_lists_the_jobs_left(reviewer, tmp_path):
    """A piece of a run: one model and its certificates not made yet (as a piece that stopped before them leaves
    the tree). pull refuses an unfinished workflow unless --partial, which restores and stamps what is there and
    lists what is left."""
    origin, clone, *_ = reviewer
    res = clone / "results" / "smoke"
    name = "random_b1.5_s0_sigma0.25"
    absent = [res / "models" / name] + [res / d / f"{name}.{ext}" for d in ("certify", "irs") for ext in ("tsv", "json")]
    for k, path in enumerate(absent):
        shutil.move(path, tmp_path / str(k))
    try:
        r = subprocess.run([sys.executable, "-m", "arq", "artifacts", "pull", "config/smoke.yaml"], cwd=clone,
                           capture_output=True, text=True, timeout=600)
        out = r.stdout + r.stderr
        assert r.returncode != 0 and "still has jobs to run" in out and "--partial" in out, out
        out = _sh(clone, sys.executable, "-m", "arq", "artifacts", "pull", "--partial", "config/smoke.yaml")
        assert "a partial run: these jobs are still to run" in out and "finetune" in out
        r = _clone_snakemake(clone, "-n")
        counts = job_counts(r.stdout + r.stderr)
        assert counts["finetune"] == 1 and counts["certify_incremental"] == 1, counts
        assert "search" not in counts and "train_base" not in counts, counts
        # the piece is published as it is: nothing new to add, the jobs left listed
        r = run_documented("arq artifacts push --partial config/<p>.yaml", clone, fill={"<p>": "smoke"})
        assert r.returncode == 0 and "still to run" in r.stdout + r.stderr and "finetune" in r.stdout, _tail(r)
        status = _sh(clone, "git", "status", "--porcelain", "--", *PROFILE_DIRS).splitlines()
        assert [line for line in status if not line.startswith(" D ")] == [], status  # only what was moved away
    finally:
        for k, path in enumerate(absent):
            shutil.move(tmp_path / str(k), path)
        _sh(clone, sys.executable, "-m", "arq", "artifacts", "pull", "config/smoke.yaml")


@pytest.mark.e2e
def test_reviewer_dvc_metrics_and_plots_show_the_smoke_results(reviewer):
    origin, clone, *_ = reviewer
    r = run_documented("dvc metrics show", clone, timeout=300)
    assert r.returncode == 0 and "results/smoke/report/metrics.json" in r.stdout, _tail(r)
    shown = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], cwd=clone,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, _tail(shown)
    metrics = json.loads(shown.stdout)  # stderr: the profiles not run here (paper) are absent
    smoke = metrics[""]["data"]["results/smoke/report/metrics.json"]["data"]
    assert set(smoke) == {"fp32_sigma0.25", "uniform_w8a8_sigma0.25", "uniform_w4a4_sigma0.25",
                          "uniform_w4a3_sigma0.25", "uniform_w3a4_sigma0.25", "hawq_b1.5_sigma0.25",
                          "haq_b1.5_sigma0.25", "random_b1.5_sigma0.25", "arq_b1.5_sigma0.25"}
    assert smoke["fp32_sigma0.25"]["bitops_pct"] == 100.0 and 0 <= smoke["arq_b1.5_sigma0.25"]["ACR"] <= 1
    assert "results/cpu-v1/report/metrics.json" in metrics[""]["data"]  # the committed comparison is listed too
    r = run_documented("dvc plots show", clone, timeout=300)  # writes dvc_plots/index.html
    assert r.returncode == 0, _tail(r)
    html = (clone / "dvc_plots" / "index.html").read_text()
    assert "certified accuracy (smoke)" in html
    for model in smoke:
        assert f'"model": "{model}"' in html


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def _require_chromium():
    if CHROMIUM:
        return
    if os.environ.get("CI"):
        pytest.fail("chromium not found: .ci/run installs Debian's chromium package for the HTML report test")
    pytest.skip("chromium not installed (apt-get install chromium)")


@pytest.mark.e2e
def test_reviewer_html_report_renders_every_table_and_figure_with_captions(reviewer, tmp_path):
    """One page a reviewer opens: Snakemake's self-contained report, rendered in headless Chromium."""
    _require_chromium()
    from playwright.sync_api import sync_playwright

    origin, clone, *_ = reviewer
    # as ARTIFACT.md gives it (no --cores: a report runs no job)
    r = run_documented("snakemake --report report.html --configfile config/smoke.yaml", clone)
    assert r.returncode == 0 and "Report created" in r.stdout + r.stderr, _tail(r)
    html = (clone / "report.html").read_text()
    for caption in ("one curve per method", "Weight and activation bits of each quantizable layer",
                    "Average certified radius (ACR", "Learning curves of the mixed-precision searches",
                    "Paired tests of every method against ARQ", "clean and certified accuracy per radius",
                    "Learning curve of the arq search (seed 0) at 1.5 % of FP32 BitOps"):
        assert caption in html, caption
    assert "{{" not in html.split("<script", 1)[0]  # every caption template was filled in
    errors, failed = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.on("requestfailed", lambda req: failed.append(req.url))  # self-contained: nothing to fetch
        page.goto((clone / "report.html").as_uri())
        page.get_by_text("Comparison (smoke)").click()
        page.get_by_role("link", name="Figures").click()
        page.wait_for_timeout(500)
        figures = page.inner_text("body")
        page.locator("tr", has_text="certified_accuracy.png").locator("a[iconname=eye]").click()
        page.wait_for_timeout(1000)
        shown = page.locator("img:visible").count()
        page.screenshot(path=tmp_path / "report.png")
        page.get_by_role("link", name="Comparison (smoke)").click()
        page.get_by_role("link", name="Tables").click()
        page.wait_for_timeout(500)
        tables = page.inner_text("body")
        browser.close()
    assert errors == [] and failed == [] and shown >= 1
    for stem in ("certified_accuracy", "bits_per_layer", "acr_vs_bitops", "search_curves"):
        assert f"figures/smoke/{stem}.png" in figures
    for name in ("table.md", "table.csv", "table.tex", "tests.csv", "curves.csv"):
        assert f"results/smoke/report/{name}" in tables
    assert (tmp_path / "report.png").stat().st_size > 20_000


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
        d = results / "models" / f"{method}_s0_sigma0.25"
        model, meta = models.load_checkpoint(d / "model.pt", "resnet20")
        assert meta["policy"]["layers"] == policy["layers"] and meta["method"] == f"{method}_s0"
        assert model.layer2[0].conv1.w_bits == bits and model.layer2[0].conv1.act.calibrated
        assert len((d / "finetune.csv").read_text().splitlines()) == 1 + cfg["finetune"]["epochs"]
        summary = json.loads((results / "certify" / f"{method}_s0_sigma0.25.json").read_text())
        assert summary["method"] == f"{method}_s0" and summary["bitops_pct"] == policy["bitops_pct"]
        assert SUMMARY_KEYS <= set(summary) and summary["images"] == cfg["certify"]["max_images"]
        assert set(summary["upstream"]) == {"model"}
        assert set(json.loads((d / "finetune.json").read_text())["upstream"]) == {"model", "policy"}


@pytest.mark.e2e
def test_smoke_incremental_certification(smoke_run):
    """The FP32 cache on the val subset and IRS certificates of both quantized models against it."""
    workdir, cfg = _check_ran(smoke_run)
    irs_dir = workdir / "results" / "smoke" / "irs"
    ic = cfg["irs"]
    cache = json.loads((irs_dir / "cache_sigma0.25.json").read_text())
    assert cache["images"] == ic["images"] and cache["n"] == ic["n"]
    for method in ("uniform_w8a8_s0", "uniform_w4a4_s0"):
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


@pytest.mark.e2e
def test_smoke_searches(smoke_run):
    """Each method's episode CSV, best policy and learning curve; the policy finetuned and certified like the
    uniform ones."""
    import csv as csv_module

    workdir, cfg = _check_ran(smoke_run)
    results = workdir / "results" / "smoke"
    for method in ("arq", "haq", "random"):
        name = f"{method}_b1.5_s0"
        with open(results / "search" / f"{name}_sigma0.25.csv") as f:
            rows = list(csv_module.DictReader(f))
        assert [int(r["episode"]) for r in rows] == list(range(1, cfg["search"]["episodes"] + 1))
        assert all(float(r["bitops_pct"]) <= 1.5 for r in rows)
        doc = json.loads((results / "policies" / f"{name}_sigma0.25.json").read_text())
        assert doc["produced_by"] == f"search {method}" and doc["bitops_pct"] <= 1.5
        assert doc["reward"] == pytest.approx(max(float(r["reward"]) for r in rows))
        assert doc["profile"] == "smoke" and doc["git_commit"] and doc["wall_seconds"] > 0
        assert (workdir / "figures" / "smoke" / "search" / f"{name}_sigma0.25.png").read_bytes()[:4] == b"\x89PNG"
        summary = json.loads((results / "certify" / f"{name}_sigma0.25.json").read_text())
        assert summary["method"] == name and summary["bitops_pct"] == pytest.approx(doc["bitops_pct"])


@pytest.mark.e2e
def test_smoke_hawq(smoke_run):
    """Hessian traces with their convergence history, the ILP's policy within the budget, finetuned and certified."""
    workdir, cfg = _check_ran(smoke_run)
    results = workdir / "results" / "smoke"
    traces = json.loads((results / "hawq" / "hessian_sigma0.25.json").read_text())
    assert 1 <= traces["iterations"] <= cfg["hawq"]["max_iterations"] and len(traces["history"]) == traces["iterations"]
    assert len(traces["layers"]) == 22 and all(v["params"] > 0 for v in traces["layers"].values())
    doc = json.loads((results / "policies" / "hawq_b1.5_sigma0.25.json").read_text())
    assert doc["produced_by"] == "hawq-v3" and doc["bitops_pct"] <= 1.5 and doc["status"] == "Optimal"
    assert all(v["w_bits"] == v["a_bits"] for v in doc["layers"].values())
    summary = json.loads((results / "certify" / "hawq_b1.5_s0_sigma0.25.json").read_text())
    assert summary["method"] == "hawq_b1.5_s0" and summary["bitops_pct"] == pytest.approx(doc["bitops_pct"])


# ----------------------------------------------------------- after the run: logs, refusals that lose nothing

@pytest.mark.e2e
def test_smoke_job_logs_keep_every_attempt(smoke_run):
    workdir, cfg = _check_ran(smoke_run)
    logs = workdir / "logs" / "smoke"
    attempts = logs / "train_base" / "fp32_sigma0.25.log.attempts"
    text = attempts.read_text()
    assert text.startswith("=== attempt started ") and "epoch 4/4" in text
    assert "epoch 4/4" in (logs / "train_base" / "fp32_sigma0.25.log").read_text()
    assert "verified" in (logs / "prepare_data.log").read_text()


@pytest.mark.e2e
def test_smoke_a_corrupt_source_is_refused_without_touching_the_prepared_data(smoke_run, tmp_path):
    """Snakemake deletes a job's outputs before it runs: a changed data setting pointing at a corrupt archive must
    be refused while the DAG is built, leaving the good prepared data (and its mtime) as it was."""
    workdir, cfg = _check_ran(smoke_run)
    prepared = workdir / "data" / "prepared" / "smoke"
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in prepared.iterdir()}
    bad = tmp_path / "copy" / ARCHIVE.name
    bad.parent.mkdir()
    blob = bytearray(ARCHIVE.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    bad.write_bytes(bytes(blob))
    shutil.copy(ARCHIVE.parent / "SHA256SUMS", bad.parent / "SHA256SUMS")
    config = workdir / "corrupt.yaml"
    corrupt = yaml.safe_load(smoke_run[2].read_text())
    corrupt["data"]["path"] = str(bad)
    config.write_text(yaml.safe_dump(corrupt))
    r = snakemake(workdir, "--cores", "1", "--configfile", str(config), timeout=300)
    assert r.returncode != 0
    assert f"checksum mismatch for {bad}" in r.stdout + r.stderr
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in prepared.iterdir()} == before
    r = snakemake(workdir, "-n", "--cores", "1", "--configfile", str(smoke_run[2]), timeout=300)
    assert r.returncode == 0 and "Nothing to be done" in r.stdout + r.stderr, _tail(r)


@pytest.mark.e2e
def test_smoke_a_failed_job_shows_its_error_on_the_terminal(smoke_run):
    """A σ=0.25 model placed where the σ=0.5 model belongs: certify refuses it (the checkpoint's σ is not what
    the output claims), and the terminal shows arq's message, not only Snakemake's non-zero exit code."""
    workdir, cfg = _check_ran(smoke_run)
    models_dir = workdir / "results" / "smoke" / "models"
    shutil.copytree(models_dir / "fp32_sigma0.25", models_dir / "fp32_sigma0.5")
    target = workdir / "results" / "smoke" / "certify" / "fp32_sigma0.5.tsv"
    # the target as the profile names it: its paths are relative to the working directory
    r = snakemake(workdir, "results/smoke/certify/fp32_sigma0.5.tsv", "--cores", "1", "--configfile", str(smoke_run[2]),
                  timeout=600)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "arq certify: error:" in out and "trained at σ=0.25, but this stage is for σ=0.5" in out
    assert not target.exists()
    history = (workdir / "logs" / "smoke" / "certify" / "fp32_sigma0.5.log.attempts").read_text()
    assert "=== attempt started" in history and "trained at σ=0.25" in history


# ------------------------------------------------- robust base variants and the bit-width sweep, on the smoke run

ROBUST_OVERLAY = {"robust_base": {"bases": ["fp32", "fp32_symreg_satnl"], "arms": ["uniform_w4a4"]},
                  "sweep": {"enabled": True, "ptq": [4], "weight_only": [], "qat": [], "images": 10, "n0": 20,
                            "n": 100}}


@pytest.mark.e2e
def test_smoke_robust_base_arm_and_sweep_reuse_the_plain_run(smoke_run):
    """The smoke run plus a SymReg+SatNL base, W4A4 finetuned from it and a one-point sweep of both bases (an overlay):
    nothing of the plain run is redone, the robust base is an ordinary checkpoint that records its variant, and the
    plain comparison table is byte for byte what it was."""
    workdir, cfg = _check_ran(smoke_run)
    overlay = workdir / "robust-overlay.yaml"
    overlay.write_text(yaml.safe_dump(ROBUST_OVERLAY))
    table = workdir / "results" / "smoke" / "report" / "table.md"
    before = table.read_text()
    args = ("--cores", "2", "--configfile", str(smoke_run[2]), str(overlay))
    r = snakemake(workdir, "-n", *args, timeout=300)
    assert r.returncode == 0, _tail(r)
    assert job_counts(r.stdout + r.stderr) == {"train_base": 1, "certify": 2, "irs_cache": 1, "finetune": 1,
                                               "certify_incremental": 1, "sweep": 2, "report": 1, "all": 1,
                                               "total": 10}
    r = snakemake(workdir, *args, timeout=1200)
    assert r.returncode == 0, _tail(r)
    res = workdir / "results" / "smoke"
    model, meta = models.load_checkpoint(res / "models" / "fp32_symreg_satnl_sigma0.25" / "model.pt", "resnet20")
    assert meta["method"] == "fp32_symreg_satnl" and not any("parametrizations" in k for k in model.state_dict())
    trained = json.loads((res / "models" / "fp32_symreg_satnl_sigma0.25" / "train.json").read_text())
    assert trained["base"] == "fp32_symreg_satnl" and trained["satnl_bounds"] and trained["asymmetry"]
    finetuned = json.loads((res / "models" / "uniform_w4a4_symreg_satnl_s0_sigma0.25" / "finetune.json").read_text())
    assert finetuned["upstream"]["model"]["source"].endswith("models/fp32_symreg_satnl_sigma0.25/model.pt")
    assert table.read_text() == before
    robust = (res / "report" / "robust.md").read_text()
    assert "| Uniform W4A4 [SymReg+SatNL] |" in robust and "| FP32 [SymReg+SatNL] |" in robust
    for base in ("fp32", "fp32_symreg_satnl"):
        with open(res / "sweep" / f"{base}_sigma0.25.csv") as f:
            (point,) = list(csv.DictReader(f))
        assert point["point"] == "W4A4" and point["mode"] == "ptq" and int(point["images"]) == 10
    figure = workdir / "figures" / "smoke" / "bit_width_sweep.png"
    assert figure.read_bytes()[:4] == b"\x89PNG"
    r = snakemake(workdir, "-n", *args, timeout=300)
    assert "Nothing to be done" in r.stdout + r.stderr, _tail(r)
