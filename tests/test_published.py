"""The cpu study as this repository publishes it: a fresh clone restores every finished piece from the in-repository
DVC remote, and the commands README.md and ARTIFACT.md give for the published profiles run there as given (the
hours-long ones as dry runs)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import require_real_archive
from documented import REPO, environment, link_beside, run_documented
from test_e2e import ARCHIVE, _tail, job_counts

pytestmark = pytest.mark.e2e
CPU = ("data/prepared/cpu", "results/cpu", "figures/cpu")


def _git(clone: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=clone, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A fresh clone of this repository's last commit after README's first command of the piece loop."""
    require_real_archive(ARCHIVE)
    if not (REPO / ".git").exists():
        message = f"{REPO} is not a git repository: the published study is read from its last commit"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    clone = tmp_path_factory.mktemp("published") / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    link_beside(clone)
    pulled = run_documented("arq artifacts pull --partial config/cpu.yaml", clone, timeout=900)
    assert pulled.returncode == 0, _tail(pulled)
    complete = (clone / "results" / "cpu" / "report" / "table.csv").exists()
    return clone, pulled.stdout + pulled.stderr, complete


def test_a_fresh_clone_pulls_every_published_binary_and_rebuilds_the_data(published):
    from arq.io import file_digest

    clone, out, _ = published
    records = sorted(clone.glob("results/cpu/**/*.pt.dvc"))
    assert len(records) >= 9  # the FP32 base, the IRS cache and the first piece's models at least
    assert f"verified {len(records)} file(s) against their records" in out, out
    assert "rebuilding data/prepared/cpu/cifar10.pt from" in out  # not published: rebuilt from the archive
    manifest = json.loads((clone / "data" / "prepared" / "cpu" / "manifest.json").read_text())
    assert file_digest(clone / "data" / "prepared" / "cpu" / "cifar10.pt") == manifest["file_sha256"]
    assert _git(clone, "status", "--porcelain") == ""  # pulling changes nothing git tracks


def test_the_study_goes_on_from_the_pulled_base_never_retraining_it(published):
    """The plain FP32 base, its IRS cache and its Hessian were published by the first piece: what is left never
    includes them (a robust base of issue 24 is trained in a later piece, from scratch: it is a model of its own)."""
    clone, out, complete = published
    r = run_documented("snakemake -n --configfile config/<p>.yaml", clone, fill={"<p>": "cpu"}, timeout=300)
    assert r.returncode == 0, _tail(r)
    if complete:
        assert "the workflow is complete" in out and "Nothing to be done" in r.stdout + r.stderr, _tail(r)
        r = run_documented("arq artifacts pull config/<p>.yaml", clone, fill={"<p>": "cpu"}, timeout=900)
        assert r.returncode == 0, _tail(r)
        r = subprocess.run(["arq", "regenerate", "--config", "config/cpu.yaml", "--check"], cwd=clone,
                           capture_output=True, text=True, timeout=600, env=environment())
        assert r.returncode == 0, _tail(r)
        return
    counts = job_counts(r.stdout + r.stderr)
    assert "a partial run: these jobs are still to run" in out
    assert "prepare_data" not in counts, counts  # rebuilt by the pull, byte for byte the manifest's
    for made in ("models/fp32_sigma0.25/model.pt", "irs/cache_sigma0.25.pt", "hawq/hessian_sigma0.25.json"):
        assert f"output: results/cpu/{made}" not in r.stdout + r.stderr, made  # the plain base's: pulled, kept
    # each piece of README's loop is then the same call: as a dry run here (a piece runs up to two hours)
    for command in ("timeout 2h snakemake --cores 2 --rerun-incomplete --configfile config/cpu.yaml",
                    "snakemake --cores 2 --configfile config/cpu.yaml",
                    "snakemake --cores all --configfile config/cpu.yaml"):
        r = run_documented(command, clone, dry_run=True, timeout=300)
        assert r.returncode == 0 and job_counts(r.stdout + r.stderr) == counts, (command, _tail(r))
    r = run_documented("snakemake --cores 2 results/cpu/models/fp32_sigma0.25/model.pt --configfile config/cpu.yaml",
                       clone, dry_run=True, timeout=300)
    assert r.returncode == 0 and "Nothing to be done" in r.stdout + r.stderr, _tail(r)


def test_publishing_the_pulled_study_again_adds_nothing(published):
    clone, *_ = published
    r = run_documented("arq artifacts push --partial config/cpu.yaml", clone, timeout=900)
    assert r.returncode == 0, _tail(r)
    assert "artifacts/dvc" in r.stdout.rsplit(": git add ", 1)[1]  # the in-repository remote's folder is named
    assert _git(clone, "status", "--porcelain") == ""  # identical content: identical records and objects
    r = run_documented("arq artifacts verify config/<p>.yaml", clone, fill={"<p>": "cpu"}, timeout=600)
    assert r.returncode == 0, _tail(r)


def test_the_frozen_comparison_regenerates_byte_for_byte(published):
    clone, *_ = published
    r = run_documented("arq regenerate --config config/cpu-v1.yaml", clone, timeout=600)
    assert r.returncode == 0, _tail(r)
    assert _git(clone, "status", "--porcelain", "--", "results/cpu-v1") == ""
    r = run_documented("arq regenerate --config config/cpu-v1.yaml --check", clone, timeout=600)
    assert r.returncode == 0, _tail(r)
    r = run_documented("arq cost resnet20 --policy results/cpu-v1/policies/hawq_b1.5_sigma0.25.json", clone)
    assert r.returncode == 0 and "% of FP32" in r.stdout, _tail(r)


def test_the_paper_profile_commands_plan_their_runs(published):
    """The paper protocol takes GPU hours: its documented calls are checked as dry runs in the clone."""
    clone, *_ = published
    r = run_documented("snakemake -n", clone, timeout=300)
    assert r.returncode == 0 and "[arq] profile 'paper'" in r.stdout + r.stderr, _tail(r)
    total = job_counts(r.stdout + r.stderr)["total"]
    for command in ("snakemake --cores all", ".venv/bin/snakemake --cores all"):
        r = run_documented(command, clone, dry_run=True, timeout=300)
        assert r.returncode == 0 and job_counts(r.stdout + r.stderr)["total"] == total, (command, _tail(r))
    r = run_documented("snakemake --cores all results/paper/models/fp32_sigma0.25/model.pt", clone, dry_run=True,
                       timeout=300)
    assert r.returncode == 0, _tail(r)
    assert job_counts(r.stdout + r.stderr) == {"prepare_data": 1, "train_base": 1, "total": 2}, _tail(r)
    # README's data overlay: torchvision's files, downloaded when missing
    (clone / "my-data.yaml").write_text("data: {source: torchvision, path: data/raw, download: true}\n")
    r = run_documented("snakemake --cores all --configfile config/config.yaml my-data.yaml", clone, dry_run=True,
                       timeout=300)
    assert r.returncode == 0 and job_counts(r.stdout + r.stderr)["total"] == total, _tail(r)
    (clone / "my-data.yaml").unlink()
    r = run_documented("snakemake --cores 2 --configfile config/cpu-short.yaml", clone, dry_run=True, timeout=300)
    assert r.returncode == 0 and "[arq] profile 'cpu-short'" in r.stdout + r.stderr, _tail(r)
    r = run_documented("snakemake --unlock", clone, timeout=300)
    assert r.returncode == 0, _tail(r)
