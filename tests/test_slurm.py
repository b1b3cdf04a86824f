"""The DAG on a real Slurm cluster: the smoke profile through snakemake-executor-plugin-slurm and
workflow/profiles/slurm, against the single-node cluster that workflow/profiles/slurm/cluster.sh brings up.

Marked ``slurm`` and left out of the default run (pyproject's addopts): they need root, Debian's Slurm packages and
about 25 minutes on two cores (a local smoke run to compare with, and the same DAG as Slurm jobs). ``bash .ci/slurm``
runs them on a fresh machine."""
from __future__ import annotations

import csv
import json
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from documented import REPO, documented_commands, environment, filled, repository_copy, run_documented
from test_e2e import _check_ran, _tail, smoke_run  # noqa: F401  (smoke_run: the local run compared with)

pytestmark = pytest.mark.slurm

SLURM_RUN = "snakemake --workflow-profile workflow/profiles/slurm --configfile config/smoke.yaml"
# what differs between two runs of the same job: durations, speeds, where it ran (and the hash of the Hessian
# summary, which records its own wall time)
VARYING = re.compile(r"seconds|per_s|device|host|hessian_sha256")


@pytest.fixture(scope="module")
def cluster():
    r = run_documented("bash workflow/profiles/slurm/cluster.sh up", REPO, timeout=900)
    assert r.returncode == 0, _tail(r)
    return r


def test_the_cluster_accepts_sbatch(cluster, tmp_path):
    out = tmp_path / "job.out"
    r = subprocess.run(["sbatch", "--parsable", "--wait", "-p", "cpu", "-t", "1", "-c", "1", "-o", str(out),
                        "--wrap", "echo ran as job $SLURM_JOB_ID on $SLURM_JOB_PARTITION"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, _tail(r)
    job = r.stdout.strip().split(";")[0]
    assert out.read_text().strip() == f"ran as job {job} on cpu"
    state = _sacct(job, "State")
    assert state == [{"JobID": job, "State": "COMPLETED"}]


def test_the_cluster_script_is_idempotent_and_comes_back_after_down(cluster):
    root = REPO
    again = run_documented("bash workflow/profiles/slurm/cluster.sh up", root, timeout=300)
    assert again.returncode == 0 and "wrote" not in again.stdout and "stopped" not in again.stdout, _tail(again)
    down = run_documented("bash workflow/profiles/slurm/cluster.sh down", root, timeout=300)
    assert down.returncode == 0, _tail(down)
    status = run_documented("bash workflow/profiles/slurm/cluster.sh status", root, timeout=60)
    assert status.stdout.count("not running") == 5, status.stdout
    with socket.socket() as taken:  # slurmctld's port in use: its start fails, and the message says so
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("0.0.0.0", 6817))
        taken.listen()
        failed = run_documented("bash workflow/profiles/slurm/cluster.sh up", root, timeout=300,
                                env={"ARQ_SLURM_WAIT_S": "10"})
    assert failed.returncode != 0
    assert "slurmctld did not start within 10 s" in failed.stderr and "Address already in use" in failed.stderr
    up = run_documented("bash workflow/profiles/slurm/cluster.sh up", root, timeout=300)
    assert up.returncode == 0 and "a test job" in up.stdout, _tail(up)
    status = run_documented("bash workflow/profiles/slurm/cluster.sh status", root, timeout=60)
    assert "not running" not in status.stdout and re.search(r"^cpu\* up 1 ", status.stdout, flags=re.M), status.stdout


def _sacct(jobs: str, *fields: str) -> list[dict]:
    r = subprocess.run(["sacct", "-X", "-n", "-P", "-j", jobs, "-o", ",".join(("JobID",) + fields)],
                       capture_output=True, text=True, timeout=60, check=True)
    return [dict(zip(("JobID",) + fields, line.split("|"))) for line in r.stdout.splitlines() if line]


@pytest.fixture(scope="module")
def cancelled(cluster, tmp_path_factory):
    """README's Slurm command on the smoke profile, with the base model's training job cancelled by `scancel` once
    its first epoch's resume checkpoint is on disk."""
    workdir = repository_copy(tmp_path_factory.mktemp("slurm"), "repo")
    assert SLURM_RUN in documented_commands()
    console = workdir / "snakemake.out"  # a file, not a pipe: a pipe nobody reads while polling fills and blocks
    with console.open("w") as sink:
        proc = subprocess.Popen(["bash", "-c", filled(SLURM_RUN, None)], cwd=workdir, stdout=sink,
                                stderr=subprocess.STDOUT, text=True, env=environment())
        resume = workdir / "results" / "smoke" / "models" / "fp32_sigma0.25"
        deadline = time.monotonic() + 1200
        try:
            while not list(resume.glob("*.resume.pt")):
                assert proc.poll() is None, console.read_text()[-4000:]
                assert time.monotonic() < deadline, "no resume checkpoint of train_base after 20 min"
                time.sleep(1)
            running = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i %k"], capture_output=True,
                                     text=True, check=True).stdout.splitlines()
            train = [line.split()[0] for line in running if "rule_train_base" in line]
            assert len(train) == 1, running
            subprocess.run(["scancel", train[0]], check=True)
            proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
    out = console.read_text()
    return workdir, train[0], proc.returncode, out


def test_a_cancelled_job_fails_with_its_log_and_leaves_nothing_that_looks_done(cancelled):
    workdir, job, code, out = cancelled
    assert code != 0, out[-4000:]
    assert f"SLURM-job '{job}' failed, SLURM status is: 'CANCELLED'" in out, out[-4000:]
    slurm_log = next(Path(p) for p in re.findall(rf"(\S+/{job}\.log)", out))
    assert slurm_log.exists() and "CANCELLED" in slurm_log.read_text()
    assert "logs/smoke/train_base/fp32_sigma0.25.log" in out  # the rule's own log, named with the failure
    models = workdir / "results" / "smoke" / "models" / "fp32_sigma0.25"
    assert not (models / "model.pt").exists()
    assert list(models.glob("*.resume.pt"))
    assert _sacct(job, "State")[0]["State"].startswith("CANCELLED")


@pytest.fixture(scope="module")
def slurm_run(cancelled):
    workdir = cancelled[0]
    r = run_documented("snakemake --workflow-profile workflow/profiles/slurm --configfile config/smoke.yaml",
                       workdir, timeout=3600)
    return workdir, r


def test_the_rerun_resumes_the_cancelled_job_and_finishes_the_dag(slurm_run):
    workdir, r = slurm_run
    assert r.returncode == 0, _tail(r)
    attempts = (workdir / "logs" / "smoke" / "train_base" / "fp32_sigma0.25.log.attempts").read_text()
    assert attempts.count("=== attempt started") == 2
    assert re.search(r"resuming from \S+ after epoch [1-9]", attempts), attempts[-3000:]
    assert not list(workdir.rglob("*.resume.pt")) and not list(workdir.rglob("*.partial"))


def test_every_job_was_a_slurm_job_with_the_profiles_request(slurm_run):
    workdir, r = slurm_run
    assert r.returncode == 0, _tail(r)
    out = r.stdout + r.stderr
    jobs = {job: rule for job, rule in
            re.findall(r"has been submitted with SLURM jobid (\d+) \(log: \S*/rule_(\w+?)/", out)}
    rules = re.findall(r"^rule (\w+):", out, flags=re.M)
    assert len(jobs) == len(rules) >= 30 and sorted(jobs.values()) == sorted(rules)
    assert re.findall(r"^localrule (\w+):", out, flags=re.M) == ["all"]  # nothing but the target ran locally
    cfg = yaml.safe_load((workdir / "config" / "smoke.yaml").read_text())["resources"]
    stage = {"prepare_data": "prepare", "train_base": "train", "finetune": "finetune", "certify": "certify",
             "irs_cache": "irs", "certify_incremental": "irs", "search": "search", "hessian": "hawq",
             "allocate_hawq": "report", "uniform": "report", "report": "report"}
    for row in _sacct(",".join(jobs), "Partition", "ReqCPUS", "ReqMem", "Timelimit", "State"):
        rule = jobs[row["JobID"]]
        want = cfg[stage[rule]]
        assert row["State"] == "COMPLETED" and row["Partition"] == "cpu", (rule, row)
        assert int(row["ReqCPUS"]) == want["threads"] and row["ReqMem"] == f"{want['mem_mb']}M", (rule, row)
        assert row["Timelimit"] == time.strftime("%H:%M:%S", time.gmtime(60 * want["runtime"])), (rule, row)


def _rows(path: Path) -> list[list[str]]:
    """A certification TSV without its `time` column (seconds per image)."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    keep = [i for i, name in enumerate(rows[0]) if name != "time"]
    assert len(keep) == len(rows[0]) - 1, rows[0]
    return [[row[i] for i in keep] for row in rows]


def _steady(value):
    """A summary without what differs between two runs of the same job (durations, speeds, where it ran)."""
    if isinstance(value, dict):
        return {k: _steady(v) for k, v in value.items() if not VARYING.search(k)}
    if isinstance(value, list):
        return [_steady(v) for v in value]
    return value


def test_the_slurm_run_gives_the_local_runs_rows_and_summaries(slurm_run, smoke_run):  # noqa: F811
    workdir, r = slurm_run
    assert r.returncode == 0, _tail(r)
    local, _ = _check_ran(smoke_run)
    ours, theirs = workdir / "results" / "smoke", local / "results" / "smoke"
    tables = sorted(p.relative_to(theirs) for p in theirs.rglob("*.tsv"))
    summaries = sorted(p.relative_to(theirs) for p in theirs.rglob("*.json"))
    assert len(tables) >= 17 and len(summaries) >= 17  # 9 certifications and 8 incremental ones, at least
    assert sorted(p.relative_to(ours) for p in ours.rglob("*.tsv")) == tables
    assert sorted(p.relative_to(ours) for p in ours.rglob("*.json")) == summaries
    for rel in tables:
        assert _rows(ours / rel) == _rows(theirs / rel), rel
    for rel in summaries:
        assert _steady(json.loads((ours / rel).read_text())) == _steady(json.loads((theirs / rel).read_text())), rel
