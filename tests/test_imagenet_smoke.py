"""The imagenet-smoke profile (issue 25), run as README gives it in a copy of the repository: the generated tree,
then the whole DAG for ResNet-50 and MobileNetV2 from the one profile; then the imported-base stages (a Cohen
checkpoint for ResNet-50, a torchvision one noise-finetuned for MobileNetV2) on the same tree."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from torch import nn

from arq import config as arq_config
from arq import models
from documented import environment, repository_copy, run_documented
from test_pretrained import CohenNormalize

LAYERS = {"resnet50": 54, "mobilenet_v2": 53}  # quantizable layers, depthwise included (DESIGN §5)
ROWS = ("FP32", "Uniform W8A8", "HAWQ-V3", "HAQ", "Random search", "ARQ")


def _tail(r: subprocess.CompletedProcess) -> str:
    return (r.stdout + r.stderr)[-4000:]


def _run(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=workdir, capture_output=True, text=True,
                          timeout=timeout, env=environment())


@pytest.fixture(scope="module")
def imagenet_run(tmp_path_factory):
    workdir = repository_copy(tmp_path_factory.mktemp("imagenet"), "repo")
    tree = run_documented("arq sample-tree data/imagenet-smoke/tree", workdir)
    assert tree.returncode == 0, _tail(tree)
    result = run_documented("snakemake --cores all --configfile config/imagenet-smoke.yaml", workdir, timeout=1800)
    return workdir, result


@pytest.mark.e2e
def test_one_profile_runs_every_stage_for_both_architectures(imagenet_run):
    workdir, result = imagenet_run
    assert result.returncode == 0, _tail(result)
    profile = arq_config.load(workdir / "config" / "imagenet-smoke.yaml")
    budget = profile["search"]["budgets"][0]
    for arch, layers in LAYERS.items():
        res = workdir / "results" / "imagenet-smoke" / arch
        table = (res / "report" / "table.md").read_text()
        assert table.startswith(f"# Method comparison (profile imagenet-smoke/{arch})")
        assert all(f"| {row} |" in table for row in ROWS), table
        for method in ("arq", "haq", "random"):
            policy = json.loads((res / "policies" / f"{method}_b{budget}_s0_sigma0.5.json").read_text())
            assert policy["architecture"] == arch and policy["profile"] == f"imagenet-smoke/{arch}"
            assert len(policy["layers"]) == layers and policy["bitops_pct"] <= budget
        hawq = json.loads((res / "policies" / f"hawq_b{budget}_sigma0.5.json").read_text())
        assert len(hawq["layers"]) == layers and hawq["bitops_pct"] <= budget
        model, meta = models.load_checkpoint(res / "models" / f"arq_b{budget}_s0_sigma0.5" / "model.pt", arch)
        assert meta["profile"] == f"imagenet-smoke/{arch}" and models.num_classes(model) == 5
        for tsv in (res / "certify").glob("*.tsv"):  # every certification complete, its rows finite
            rows = list(csv.DictReader(tsv.open(), delimiter="\t"))
            assert len(rows) == profile["certify"]["max_images"], tsv
        assert len(list((res / "irs").glob("*_s0_sigma0.5.json"))) == 5  # IRS of each quantized model
    # the per-architecture setting reached its part only
    mnv2 = json.loads((workdir / "results" / "imagenet-smoke" / "mobilenet_v2" / "models" / "fp32_sigma0.5" /
                       "train.json").read_text())
    assert mnv2["profile"] == "imagenet-smoke/mobilenet_v2"


@pytest.mark.e2e
def test_the_finished_profile_has_nothing_to_do_and_regenerates_both_reports(imagenet_run):
    workdir, result = imagenet_run
    assert result.returncode == 0, _tail(result)
    dry = _run(workdir, "snakemake", "-n", "--configfile", "config/imagenet-smoke.yaml")
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr, _tail(dry)
    check = _run(workdir, "arq", "regenerate", "--config", "config/imagenet-smoke.yaml", "--check")
    assert check.returncode == 0, _tail(check)
    for arch in LAYERS:
        assert f"profile 'imagenet-smoke/{arch}': every table regenerates byte for byte" in check.stdout


FINETUNE = {"epochs": 1, "batch_size": 16, "lr": 0.001, "momentum": 0.9, "weight_decay": 4.0e-5,
            "lr_milestones": [2], "lr_gamma": 0.1, "seed": 0, "train_images": None, "val_images": None}


@pytest.mark.e2e
def test_imported_bases_replace_training_cohen_as_is_torchvision_noise_finetuned(imagenet_run):
    """import_base and finetune_base on the generated tree: a Cohen-format ResNet-50 becomes the base unchanged
    (identical logits), a torchvision MobileNetV2 becomes it after a noise finetune; no train_base job is left."""
    workdir, result = imagenet_run
    assert result.returncode == 0, _tail(result)
    published = workdir / "published"
    published.mkdir()
    torch.manual_seed(0)
    cohen = nn.Sequential(CohenNormalize(models.IMAGENET_MEAN, models.IMAGENET_STD),
                          nn.DataParallel(torchvision.models.resnet50(weights=None, num_classes=5))).eval()
    torch.save({"epoch": 90, "arch": "resnet50", "state_dict": cohen.state_dict(), "optimizer": {}},
               published / "noise_0.50.pth.tar")
    torch.save(torchvision.models.mobilenet_v2(weights=None, num_classes=5).state_dict(), published / "mnv2.pth")
    overlay = {"paths": {"data": "data", "results": "imported/results", "figures": "imported/figures",
                         "logs": "imported/logs"},
               "per_arch": {"resnet50": {"pretrained": {"format": "cohen", "finetune": None,
                                                        "checkpoints": {"0.5": "published/noise_0.50.pth.tar"}}},
                            "mobilenet_v2": {"pretrained": {"format": "torchvision", "finetune": FINETUNE,
                                                            "checkpoints": {"0.5": "published/mnv2.pth"}}}}}
    (workdir / "imported.yaml").write_text(yaml.safe_dump(overlay))
    configs = ["--configfile", "config/imagenet-smoke.yaml", "imported.yaml"]
    res = Path("imported/results/imagenet-smoke")
    bases = [str(res / arch / "models" / "fp32_sigma0.5" / "model.pt") for arch in LAYERS]
    run = _run(workdir, "snakemake", "--cores", "2", *bases, *configs)  # targets first: --configfile takes the rest
    assert run.returncode == 0, _tail(run)
    out = run.stdout + run.stderr
    assert "resnet50_import_base" in out and "mobilenet_v2_import_base" in out and "mobilenet_v2_finetune_base" in out
    assert "train_base" not in out and "resnet50_finetune_base" not in out
    ours, meta = models.load_checkpoint(workdir / bases[0], "resnet50")
    assert meta["imported"]["format"] == "cohen" and meta["profile"] == "imagenet-smoke/resnet50"
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), cohen(x))
    tuned, meta = models.load_checkpoint(workdir / bases[1], "mobilenet_v2")
    assert meta["imported"]["format"] == "torchvision" and not meta["imported"]["noise_trained"]
    summary = json.loads((workdir / res / "mobilenet_v2" / "models" / "fp32_sigma0.5" / "train.json").read_text())
    assert summary["epochs"] == 1 and summary["noise_finetune_of"]["imported"]["sha256"] == meta["imported"]["sha256"]
    start, _ = models.load_checkpoint(workdir / res / "mobilenet_v2" / "models" / "imported_sigma0.5" / "model.pt")
    assert any(not torch.equal(a, b) for a, b in zip(start.state_dict().values(), tuned.state_dict().values()))
    # the rest of the DAG starts from these bases: no job trains one
    plan = _run(workdir, "snakemake", "-n", *configs)
    assert plan.returncode == 0 and "train_base" not in plan.stdout and "resnet50_search" in plan.stdout, _tail(plan)
