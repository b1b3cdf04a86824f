"""workflow/profiles/slurm without a cluster: the executor plugin's own partition choice and GPU request for every
stage of the profiles, and the profile read by Snakemake (a dry run). The DAG on a running cluster is
tests/test_slurm.py (`bash .ci/slurm`)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from snakemake_executor_plugin_slurm.partitions import get_best_partition, read_partition_file
from snakemake_executor_plugin_slurm.utils import set_gres_string

from arq import config as arq_config
from documented import repository_copy, run_documented

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "workflow" / "profiles" / "slurm"


class StageJob:
    """What the plugin reads of a Snakemake job: its name, threads and resources (a rule's, from a stage's
    `resources` entry, as `stage_resources` in workflow/rules/common.smk passes them)."""

    def __init__(self, name: str, request: dict):
        self.name = name
        self.threads = request["threads"]
        self.resources = _Resources(mem_mb=request["mem_mb"], runtime=request["runtime"], gpu=request["gpu"])


class _Resources(dict):
    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _parts(profile: str) -> list[dict]:
    cfg = arq_config.load(REPO / "config" / profile)
    return arq_config.split(cfg) if isinstance(cfg["model"]["arch"], list) else [cfg]


@pytest.mark.parametrize("profile", ["config.yaml", "imagenet.yaml", "smoke.yaml", "cpu.yaml"])
def test_gpu_stages_ask_the_gpu_partition_for_gpus_and_the_rest_go_to_the_cpu_partition(profile):
    partitions = read_partition_file(PROFILE / "partitions.yaml")
    log = logging.getLogger("slurm-profile-test")
    for part in _parts(profile):
        for stage, request in part["resources"].items():
            job = StageJob(stage, request)
            expected = ("gpu", f"--gpus={request['gpu']}") if request["gpu"] else ("cpu", "")
            assert (get_best_partition(partitions, job, log), set_gres_string(job).strip()) == expected, (
                part["profile"], stage)


def test_the_paper_profile_sends_its_gpu_stages_to_the_gpu_partition_and_its_cpu_ones_elsewhere():
    """The paper profile has both kinds: preparing the data and the report need no GPU."""
    stages = _parts("config.yaml")[0]["resources"]
    assert {s for s, r in stages.items() if r["gpu"] == 0} == {"prepare", "report"}
    assert all(r["gpu"] == 1 for s, r in stages.items() if s not in ("prepare", "report"))


def test_the_profile_names_no_partition_of_its_own_and_reads_the_partition_file():
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert profile["slurm-status-command"] == "squeue"  # sacct's "CANCELLED by <uid>" would leave a run waiting
    assert (PROFILE / profile["slurm-partition-config"]).is_file()
    assert "slurm_partition" not in str(profile.get("default-resources", ""))


def test_snakemake_reads_the_slurm_profile(tmp_path):
    """README's Slurm command as a dry run: the profile and the plugin's settings are accepted and the DAG planned
    (no job is submitted, so it needs no cluster)."""
    workdir = repository_copy(tmp_path, "repo")
    r = run_documented("snakemake --workflow-profile workflow/profiles/slurm --configfile config/smoke.yaml",
                       workdir, dry_run=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Job stats:" in r.stdout + r.stderr
