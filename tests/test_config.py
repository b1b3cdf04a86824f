"""Profile configuration: schema validation naming the key, the paper protocol, hashing, CLI (arq/config.py)."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from arq import config as cfg
from arq.config import ConfigError, config_hash, sigma_tag, validate


def test_both_profiles_validate(repo_root):
    for name in ("config.yaml", "smoke.yaml"):
        loaded = cfg.load(repo_root / "config" / name)
        assert validate(loaded) is loaded


def test_paper_protocol(paper_config):
    c = paper_config
    assert c["profile"] == "paper"
    assert c["sigmas"] == [0.25, 0.5, 1.0]
    assert c["model"]["arch"] == "resnet20"
    assert c["train"]["epochs"] == 90
    assert c["train"]["train_images"] is None and c["train"]["val_images"] is None
    assert (c["certify"]["n0"], c["certify"]["n"], c["certify"]["alpha"]) == (100, 100_000, 0.001)
    assert c["certify"]["max_images"] is None
    assert c["data"]["cert_skip"] == 20 and -(-10_000 // c["data"]["cert_skip"]) == 500


def test_paper_quantization_protocol(paper_config):
    """DESIGN §5: bits 2..8, first/last pinned at 8, W8A8 and W4A4 baselines, the shared QAT finetune."""
    q, f = paper_config["quant"], paper_config["finetune"]
    assert (q["min_bits"], q["max_bits"], q["pin_first_last"], q["pinned_bits"]) == (2, 8, True, 8)
    assert q["uniform"] == ["W8A8", "W4A4"]
    assert (f["epochs"], f["lr"], f["weight_decay"], f["batch_size"]) == (30, 0.01, 4e-5, 256)
    assert f["train_images"] is None


def test_every_profile_validates(repo_root):
    for path in sorted((repo_root / "config").glob("*.yaml")):
        cfg.load(path)


@pytest.mark.parametrize("path,value,key", [
    ("quant.min_bits", 1, "quant.min_bits"),
    ("quant.max_bits", 9, "quant.max_bits"),
    ("quant.act_clip", "fixed", "quant.act_clip"),
    ("quant.calibration.method", "kl", "quant.calibration.method"),
    ("quant.uniform", ["W4"], "quant.uniform.0"),
    ("quant.uniform", ["W8A8", "W8A8"], "quant.uniform"),
    ("finetune.epochs", -1, "finetune.epochs"),
    ("finetune.lr", 0, "finetune.lr"),
])
def test_quant_and_finetune_schema_errors_name_the_key(smoke_config, path, value, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(_mutated(smoke_config, path, value))


def test_quant_cross_checks(smoke_config):
    """Relations between keys the schema cannot express: min ≤ max, pinned and uniform bits inside the range."""
    c = _mutated(smoke_config, "quant.min_bits", 6)
    with pytest.raises(ConfigError, match=r"quant\.min_bits"):
        validate(_mutated(c, "quant.max_bits", 4))
    with pytest.raises(ConfigError, match=r"quant\.pinned_bits"):
        validate(_mutated(_mutated(smoke_config, "quant.max_bits", 6), "quant.uniform", []))
    with pytest.raises(ConfigError, match=r"quant\.uniform\.1: W2A2"):
        validate(_mutated(_mutated(smoke_config, "quant.min_bits", 3), "quant.uniform", ["W8A8", "W2A2"]))
    # an unpinned policy may use any pinned_bits value
    validate(_mutated(_mutated(_mutated(smoke_config, "quant.max_bits", 6), "quant.uniform", []),
                      "quant.pin_first_last", False))
    validate(_mutated(smoke_config, "finetune.epochs", 0))  # post-training quantization


def test_smoke_profile_is_the_same_dag_scaled_down(paper_config, smoke_config):
    assert smoke_config["profile"] == "smoke" and smoke_config["device"] == "cpu"
    assert smoke_config["data"] == paper_config["data"]  # same real data and subsets
    assert smoke_config["model"] == paper_config["model"]
    assert smoke_config["certify"]["alpha"] == paper_config["certify"]["alpha"]
    assert smoke_config["quant"]["uniform"] == paper_config["quant"]["uniform"]  # the uniform arm runs in smoke too


def _mutated(base, path, value=None, delete=False):
    c = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = c
    for p in parents:
        node = node[p]
    if delete:
        del node[last]
    else:
        node[last] = value
    return c


@pytest.mark.parametrize("path,value,expect", [
    ("train.epochs", 0, ["train.epochs"]),
    ("train.epochs", 2.5, ["train.epochs"]),
    ("certify.alpha", 0.7, ["certify.alpha"]),
    ("certify.alpha", 0, ["certify.alpha"]),
    ("certify.n", "many", ["certify.n"]),
    ("sigmas", [], ["sigmas"]),
    ("sigmas", [0.25, 0.25], ["sigmas"]),
    ("sigmas", [0.25, -1.0], ["sigmas.1"]),
    ("device", "tpu", ["device"]),
    ("profile", "has space", ["profile"]),
    ("data.source", "internet", ["data.source"]),
    ("data.sha256", "xyz", ["data.sha256"]),
    ("model.arch", "resnet56", ["model.arch"]),
    ("resources.train.threads", 0, ["resources.train.threads"]),
    ("train.foo", 1, ["train", "'foo'"]),
    ("irs.zeta_counts", "some", ["irs.zeta_counts"]),
    ("foo", 1, ["<top level>", "'foo'"]),
])
def test_invalid_values_name_the_key(smoke_config, path, value, expect):
    with pytest.raises(ConfigError) as exc:
        validate(_mutated(smoke_config, path, value))
    for text in expect:
        assert text in str(exc.value)


@pytest.mark.parametrize("path,key", [("certify.n", "'n'"), ("train.seed", "'seed'"), ("report", "'report'"),
                                      ("irs.zeta_counts", "'zeta_counts'")])
def test_missing_keys_are_named(smoke_config, path, key):
    with pytest.raises(ConfigError) as exc:
        validate(_mutated(smoke_config, path, delete=True))
    assert key in str(exc.value)
    parent = path.rsplit(".", 1)[0] if "." in path else "<top level>"
    assert parent in str(exc.value)


def test_load_reports_the_key_from_a_file(tmp_path, repo_root):
    text = (repo_root / "config" / "smoke.yaml").read_text().replace("epochs: 4", "epochs: 0")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        cfg.load(bad)


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        cfg.load(tmp_path / "absent.yaml")
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        cfg.load(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        cfg.load(tmp_path / "list.yaml")


def test_decreasing_lr_milestones_are_rejected(smoke_config):
    with pytest.raises(ConfigError, match=r"train\.lr_milestones"):
        validate(_mutated(smoke_config, "train.lr_milestones", [60, 30]))
    validate(_mutated(smoke_config, "train.lr_milestones", [30, 60]))
    validate(_mutated(smoke_config, "train.lr_milestones", []))


def test_seeds_by_budget_names_a_budget_and_a_subset_of_the_seeds(smoke_config):
    cfg = _mutated(smoke_config, "search.seeds", [0, 1, 2])
    cfg["search"]["budgets"] = [1.0, 0.7]
    validate(_mutated(cfg, "search.seeds_by_budget", {"0.7": [0]}))
    validate(_mutated(cfg, "search.seeds_by_budget", {"0.70": [1, 2], "1.0": [0]}))
    with pytest.raises(ConfigError, match=r"search\.seeds_by_budget\.0\.5: not one of search\.budgets"):
        validate(_mutated(cfg, "search.seeds_by_budget", {"0.5": [0]}))
    with pytest.raises(ConfigError, match=r"search\.seeds_by_budget\.low: not one of"):
        validate(_mutated(cfg, "search.seeds_by_budget", {"low": [0]}))
    with pytest.raises(ConfigError, match=r"seeds \[3\] are not in search\.seeds"):
        validate(_mutated(cfg, "search.seeds_by_budget", {"0.7": [0, 3]}))
    with pytest.raises(ConfigError, match=r"search\.seeds_by_budget\.0\.7"):
        validate(_mutated(cfg, "search.seeds_by_budget", {"0.7": []}))


def test_repeated_lr_milestones_are_rejected(smoke_config):
    """The check says 'must be increasing'; a repeated milestone multiplies the lr by gamma twice."""
    with pytest.raises(ConfigError, match=r"train\.lr_milestones"):
        validate(_mutated(smoke_config, "train.lr_milestones", [30, 30]))


def test_config_hash(smoke_config, paper_config):
    h = config_hash(smoke_config)
    assert len(h) == 16 and int(h, 16) >= 0
    reordered = {k: smoke_config[k] for k in reversed(list(smoke_config))}
    reordered["train"] = {k: smoke_config["train"][k] for k in sorted(smoke_config["train"], reverse=True)}
    assert list(reordered) != list(smoke_config)
    assert config_hash(reordered) == h
    assert config_hash(_mutated(smoke_config, "certify.n", 501)) != h
    assert config_hash(_mutated(smoke_config, "train.lr", 0.1000001)) != h
    assert config_hash(paper_config) != h
    # a YAML round trip (what the Snakefile writes as config.resolved.yaml) keeps the hash
    assert config_hash(yaml.safe_load(yaml.safe_dump(smoke_config, sort_keys=True))) == h


def test_sigma_tag():
    assert [sigma_tag(s) for s in (0.25, 0.5, 1, 1.0, "0.5")] == ["0.25", "0.5", "1.0", "1.0", "0.5"]


def test_cli_check_config(tmp_path, repo_root):
    text = (repo_root / "config" / "smoke.yaml").read_text().replace("alpha: 0.001", "alpha: 0.7")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    r = subprocess.run([sys.executable, "-m", "arq", "check-config", str(bad)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "certify.alpha" in r.stderr
    assert r.stdout == ""
    good = subprocess.run([sys.executable, "-m", "arq", "check-config", str(repo_root / "config" / "smoke.yaml")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert good.returncode == 0, good.stderr
    assert "valid" in good.stdout and "smoke" in good.stdout
