# Shared helpers: validated config, path layout, the CLI entry point, per-stage resources.
import json
import os
import sys
from pathlib import Path

import yaml

from arq import artifacts, estimate, layout
from arq.config import ConfigError, config_hash, search_settings, validate
from arq.data import DataError, source_inputs, verify_source
from arq.io import write_text
from arq.variants import settings as variant_settings

# `config` is one architecture's part of the profile (workflow/rules/profile.smk): the whole profile, or, in a
# profile of several architectures, the module's `config:`.
try:
    layout.check(validate(config))
except ConfigError as exc:
    raise WorkflowError(str(exc))

PROFILE = config["profile"]
RESULTS = layout.results_dir(config)
PREPARED = layout.prepared_dir(config)
FIGURES = layout.figures_dir(config)
LOGS = f"{config['paths']['logs']}/{PROFILE}"
SIGMAS = layout.sigmas(config)
ARQ = f"{sys.executable} -m arq"

# The CLI reads the effective configuration (profile, overlays, --config overrides) from one file per
# configuration hash, named in each job's command. It is written once and never changed, so a later parse
# (a dry run, or an invocation refused by the lock) cannot alter what a running job reads. Rules do not list
# it as an input; each rule's `params.settings` holds the part it depends on, so a changed setting reruns
# exactly the stages it affects (Snakemake's params rerun trigger).
RESOLVED_CONFIG = f"{RESULTS}/config/{config_hash(config)}.yaml"
if not os.path.exists(RESOLVED_CONFIG):
    write_text(RESOLVED_CONFIG, yaml.safe_dump(config, sort_keys=False))



class Unrecorded:
    """A value a shell command takes through ``params`` but that Snakemake's params rerun trigger leaves out (it
    records only plain Python values): the interpreter and the resolved-config file say where a job runs and
    which file holds its settings, not what it computes; each rule's ``settings`` param records that."""

    def __init__(self, text):
        self.text = str(text)

    def __str__(self):
        return self.text

    def __repr__(self):
        return f"Unrecorded({self.text!r})"


# every rule's `params: **RUN`, used as {params.arq} ... --config {params.config}
RUN = {"arq": Unrecorded(ARQ), "config": Unrecorded(RESOLVED_CONFIG)}

# Model names and file layout: arq/layout.py (shared with the report regeneration and the DVC artifact commands).
# A robust base variant's tag (arq.variants): empty for the plain base, so the plain base's files keep their names.
BASETAG = r"(?:_symreg_satnl|_symreg|_satnl)?"
QUANT_METHOD = rf"[a-z]+_[a-z0-9.]+{BASETAG}_s[0-9]+"  # a quantized model: method, base, seed: arq_b1.0_s2
BASE_METHOD = rf"fp32{BASETAG}"  # a base model: fp32, fp32_symreg, ...
SEARCHED = layout.searched(config)  # e.g. arq_b1.0_s0
METHODS = layout.methods(config)
# Incremental (IRS) certificates of each quantized model on the val subset, against the FP32 cache.
IRS_OUTPUTS = [f"{RESULTS}/irs/{m}_sigma{s}.json" for m in METHODS if layout.parse(m).family != "fp32" for s in SIGMAS]

wildcard_constraints:
    sigma=r"[0-9]+\.[0-9]+",
    method=rf"{BASE_METHOD}|{QUANT_METHOD}",
    basetag=BASETAG,
    w=r"[2-8]",
    a=r"[2-8]",
    search=r"arq|haq|random",
    budget=r"[0-9]+\.[0-9]+",
    seed=r"[0-9]+",


def policy_path(wildcards):
    return layout.policy_file(config, wildcards.method, wildcards.sigma)


def base_of(wildcards):
    """The base variant a quantized model is made from (fp32 unless its name carries a robust base's tag)."""
    return layout.parse(wildcards.method).base


def base_model(wildcards):
    return f"{RESULTS}/models/{base_of(wildcards)}_sigma{wildcards.sigma}/model.pt"


def base_cache(wildcards):
    return layout.cache_file(config, base_of(wildcards), wildcards.sigma)


# Every job's output goes to its log (the latest attempt) and is appended to <log>.attempts, so rerunning an
# interrupted job (Snakemake deletes the log first) keeps what the interrupted attempt printed. A failed job
# prints the end of its log on the terminal, where otherwise only Snakemake's "exited with non-zero exit code"
# would appear. Snakemake runs shell commands with pipefail, so the pipe keeps the job's exit status.
LOGGED = (' 2>&1 | {{ echo "=== attempt started $(date -u +%Y-%m-%dT%H:%M:%SZ) ==="; tee {log}; }}'
          ' >> {log}.attempts'
          ' || {{ rc=$?; echo "--- end of {log} ---" >&2; tail -n 20 {log} >&2; exit $rc; }}')


def check_source():
    """Refuse, while the workflow is parsed, a data source that prepare_data would refuse when it runs.

    Snakemake deletes a job's outputs before running it, so a bad source must be caught before prepare_data is
    scheduled, or it costs the good prepared data. (An input function cannot do this: Snakemake takes its
    exception as "no producer" and silently keeps the existing files.) Without prepared data, the source must
    exist; with prepared data made from other data settings, the source's checksums are verified first. With
    prepared data from the same settings the source is not needed at all (e.g. a reviewer after `dvc pull`)."""
    data_file, manifest = Path(layout.prepared_data(config)), Path(PREPARED) / "manifest.json"
    try:
        if not (data_file.exists() and manifest.exists()):
            source_inputs(config["data"])
        elif json.loads(manifest.read_text()).get("settings") != config["data"]:
            verify_source(config["data"])
    except (DataError, ValueError) as exc:
        raise WorkflowError(f"prepare_data: {exc}")


def check_artifacts():
    """A file DVC tracks (it has a committed .dvc record) but that is absent is an error, not a job: recomputing it
    would silently replace the published artifact with a new one, at the cost of the stages that made it."""
    try:
        gone = artifacts.missing(config)
    except artifacts.ArtifactError as exc:
        raise WorkflowError(str(exc))
    if gone:
        profiles = " ".join(os.path.relpath(f) for f in workflow.overwrite_configfiles or ["config/config.yaml"])
        raise WorkflowError(
            f"{len(gone)} file(s) tracked by DVC are missing, e.g. {', '.join(map(str, gone[:3]))}: run "
            f"`arq artifacts pull {profiles}` (or `dvc pull`). To recompute one instead, remove its record first "
            f"(`dvc remove <file>.dvc`).")


# artifacts first: in a clone that has not pulled yet, the missing prepared data is a pull away, not a source problem
check_artifacts()
check_source()


def stage_resources(stage):
    r = config["resources"][stage]
    return {"mem_mb": r["mem_mb"], "gpu": r["gpu"], "runtime": r["runtime"]}


def announce_cost():
    """The profile's cost on this machine, printed once as the workflow is read, so that a dry run (`snakemake -n`,
    where Snakemake runs no onstart handler) shows it before anything is committed to; jobs that re-read the
    workflow on a cluster node stay quiet."""
    if not workflow.is_main_process:
        return
    import torch

    device = "cuda" if config["device"] != "cpu" and torch.cuda.is_available() else "cpu"
    try:
        cores = workflow.cores
    except WorkflowError:  # no --cores: `snakemake --report`, or a dry run without it (priced at one thread)
        cores = None
    print(f"[arq] {estimate.describe(config, device, cores or 1)}", file=sys.stderr)


announce_cost()


# Captions of the items in `snakemake --report` (workflow/report/*.rst, templated with the profile's settings).
CAPTIONS = {"certified": "certified_accuracy", "bits": "bits_per_layer", "pareto": "acr_vs_bitops",
            "search": "search_curves", "table_md": "table", "table_csv": "table", "table_tex": "table",
            "tests_csv": "tests", "curves": "certified_accuracy", "robust_md": "robust", "robust_csv": "robust",
            "robust_tests_csv": "robust", "sweep": "bit_width_sweep"}


def reported(key, path):
    """An output of the report stage as an item of the HTML report: PNG figures and tables (PDFs, metrics.json
    stay plain)."""
    if key not in CAPTIONS or path.endswith(".pdf"):
        return path
    kind = "Figures" if path.endswith(".png") else "Tables"
    return report(path, caption=f"../report/{CAPTIONS[key]}.rst", category=f"Comparison ({PROFILE})",
                  subcategory=kind)
