"""DVC as the artifact store (arq/artifacts.py, arq/layout.py) and the report rebuilt from committed text results.

The remote round trip and the reviewer's flow on a real smoke run are in test_e2e.py; these tests use a small DVC
repository of their own, with real ``dvc`` and ``git`` commands."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from arq import artifacts, layout, report
from arq import config as arq_config

REPO = Path(__file__).resolve().parents[1]


def _sh(cwd: Path, *cmd: str) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def _git_dvc_repo(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    _sh(root, "git", "init", "-q")
    _sh(root, "git", "config", "user.email", "ci@example.org")
    _sh(root, "git", "config", "user.name", "ci")
    _sh(root, sys.executable, "-m", "dvc", "init", "-q")
    _sh(root, sys.executable, "-m", "dvc", "config", "core.analytics", "false")


@pytest.fixture
def profile(tmp_path, smoke_config):
    """A DVC repository holding a profile's binary outputs (a checkpoint and the prepared data), tracked."""
    root = tmp_path / "repo"
    _git_dvc_repo(root)
    cfg = copy.deepcopy(smoke_config)
    for rel, size in (("data/prepared/smoke/cifar10.pt", 3000), ("results/smoke/models/fp32_sigma0.25/model.pt",
                                                                  2000)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(bytes(range(256)) * (size // 256))
    files = [str(p) for p in layout.binary_outputs(cfg, root)]
    _sh(root, sys.executable, "-m", "dvc", "add", "-q", *files)
    return root, cfg


def test_binary_outputs_are_what_the_dag_writes_not_leftovers(tmp_path, smoke_config):
    for rel in ("data/prepared/smoke/cifar10.pt", "results/smoke/models/fp32_sigma0.25/model.pt",
                "results/smoke/models/fp32_sigma0.25/model.resume.pt", "results/smoke/irs/cache_sigma0.25.pt",
                "results/smoke/irs/cache_sigma0.25.pt.partial", "results/smoke/search/arq_b1.5_s0_sigma0.25.state.pt",
                "results/smoke/models/fp32_sigma0.5/model.pt",  # a σ the profile no longer lists
                "results/smoke/certify/fp32_sigma0.25.json", "results/cpu/models/fp32_sigma0.25/model.pt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert [str(p) for p in layout.binary_outputs(smoke_config, tmp_path)] == [
        "data/prepared/smoke/cifar10.pt", "results/smoke/models/fp32_sigma0.25/model.pt",
        "results/smoke/irs/cache_sigma0.25.pt", "results/smoke/search/arq_b1.5_s0_sigma0.25.state.pt"]


def test_a_profile_that_does_not_publish_its_data_leaves_it_out(tmp_path, smoke_config):
    for rel in ("data/prepared/smoke/cifar10.pt", "results/smoke/models/fp32_sigma0.25/model.pt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert len(artifacts.published(smoke_config, tmp_path)) == 2
    cfg = copy.deepcopy(smoke_config)
    cfg["artifacts"]["prepared_data"] = False
    assert [str(p) for p in artifacts.published(cfg, tmp_path)] == ["results/smoke/models/fp32_sigma0.25/model.pt"]


def test_unpublished_data_on_disk_must_be_the_manifest_s(tmp_path, smoke_config):
    from arq.io import file_digest

    data = tmp_path / "data" / "prepared" / "smoke" / "cifar10.pt"
    data.parent.mkdir(parents=True)
    data.write_bytes(b"tensors")
    manifest = data.parent / "manifest.json"
    manifest.write_text(json.dumps({"file_sha256": file_digest(data)}))
    artifacts._check_data(smoke_config, tmp_path)
    data.write_bytes(b"other tensors")
    with pytest.raises(artifacts.ArtifactError, match="is not the data the published models were made from"):
        artifacts._check_data(smoke_config, tmp_path)
    manifest.unlink()
    with pytest.raises(artifacts.ArtifactError, match="manifest.json: cannot read the sha256"):
        artifacts._check_data(smoke_config, tmp_path)


def test_paths_outside_the_repository_are_a_clear_error(tmp_path, smoke_config):
    cfg = copy.deepcopy(smoke_config)
    cfg["paths"]["results"] = str(tmp_path / "elsewhere")
    model = tmp_path / "elsewhere" / "smoke" / "models" / "fp32_sigma0.25" / "model.pt"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"x")
    Path(f"{model}.dvc").write_text("outs: []\n")
    (tmp_path / "repo").mkdir()
    with pytest.raises(artifacts.ArtifactError, match="lies outside the repository .*repo: DVC can track only"):
        artifacts.tracked(cfg, tmp_path / "repo")
    with pytest.raises(artifacts.ArtifactError, match="lies outside the repository"):
        artifacts.add(cfg, ["unused.yaml"], tmp_path / "repo", log=lambda s: None)


def test_records_git_would_ignore_are_refused_before_anything_is_added(profile):
    """DVC stops half-way on an ignored record; the smoke profile is git-ignored so that CI runs leave no trace."""
    root, cfg = profile
    (root / ".gitignore").write_text("*.pt\nresults/smoke/\n")
    with pytest.raises(artifacts.ArtifactError, match=r"\.gitignore:2:results/smoke/.*Drop those lines"):
        artifacts.add(cfg, ["unused.yaml"], root, log=lambda s: None)


def test_verify_with_nothing_tracked_is_an_error(tmp_path, smoke_config):
    with pytest.raises(artifacts.ArtifactError, match="no DVC records .*nothing to verify"):
        artifacts.verify(smoke_config, tmp_path)


def test_tracked_files_verify_against_their_records(profile):
    root, cfg = profile
    assert [str(p) for p in artifacts.tracked(cfg, root)] == [
        "data/prepared/smoke/cifar10.pt", "results/smoke/models/fp32_sigma0.25/model.pt"]
    assert artifacts.missing(cfg, root) == []
    assert len(artifacts.verify(cfg, root)) == 2


def test_a_corrupted_cache_object_is_detected_naming_the_file(profile):
    """``dvc checkout`` restores a corrupt cache object silently (exit 0); verify names the file and the object."""
    root, cfg = profile
    model = root / "results/smoke/models/fp32_sigma0.25/model.pt"
    rec = artifacts.record(Path(f"{model}.dvc"))
    obj = root / ".dvc" / "cache" / "files" / "md5" / rec["md5"][:2] / rec["md5"][2:]
    obj.chmod(0o644)
    blob = bytearray(obj.read_bytes())
    blob[100] ^= 0xFF
    obj.write_bytes(bytes(blob))
    model.unlink()
    _sh(root, sys.executable, "-m", "dvc", "checkout", "-q")
    assert model.exists()  # DVC did not refuse it
    with pytest.raises(artifacts.ArtifactError) as err:
        artifacts.verify(cfg, root)
    msg = str(err.value)
    assert "results/smoke/models/fp32_sigma0.25/model.pt: content differs" in msg
    assert f".dvc/cache/files/md5/{rec['md5'][:2]}/{rec['md5'][2:]} is corrupt" in msg
    assert "cifar10.pt" not in msg


def test_a_missing_tracked_file_is_reported(profile):
    root, cfg = profile
    (root / "data/prepared/smoke/cifar10.pt").unlink()
    assert [str(p) for p in artifacts.missing(cfg, root)] == ["data/prepared/smoke/cifar10.pt"]
    with pytest.raises(artifacts.ArtifactError, match=r"cifar10.pt: missing \(tracked by .*cifar10.pt.dvc\)"):
        artifacts.verify(cfg, root)


def test_an_unreadable_record_is_an_error_naming_it(profile):
    root, cfg = profile
    rec = root / "results/smoke/models/fp32_sigma0.25/model.pt.dvc"
    rec.write_text("outs: []\n")
    with pytest.raises(artifacts.ArtifactError, match="model.pt.dvc: not a readable DVC file"):
        artifacts.verify(cfg, root)


def test_a_corrupted_remote_object_stops_the_pull_naming_the_file(profile, tmp_path):
    root, cfg = profile
    remote = tmp_path / "remote"
    _sh(root, sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(remote))
    _sh(root, "git", "add", "-A")  # the .dvc records; DVC's .gitignore entries keep the .pt files out
    _sh(root, "git", "commit", "-qm", "artifacts")
    _sh(root, sys.executable, "-m", "dvc", "push", "-q")
    rec = artifacts.record(root / "results/smoke/models/fp32_sigma0.25/model.pt.dvc")
    obj = remote / "files" / "md5" / rec["md5"][:2] / rec["md5"][2:]
    obj.chmod(0o644)
    obj.write_bytes(b"not the checkpoint")
    clone = tmp_path / "clone"
    _sh(tmp_path, "git", "clone", "-q", str(root), str(clone))
    with pytest.raises(artifacts.ArtifactError) as err:
        artifacts.pull(cfg, ["unused.yaml"], root=clone, log=lambda s: None)
    assert "dvc pull failed" in str(err.value) and "results/smoke/models/fp32_sigma0.25/model.pt" in str(err.value)
    assert not (clone / "results/smoke/models/fp32_sigma0.25/model.pt").exists()


def test_identical_content_gives_identical_objects(tmp_path, smoke_config):
    """Two repositories adding the same bytes get the same record, so a rerun whose checkpoints come out identical
    (that they do is tested in test_io.py) adds no new object to the cache or the remote."""
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        _git_dvc_repo(root)
        path = root / "results/smoke/models/fp32_sigma0.25/model.pt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"same bytes" * 100)
        _sh(root, sys.executable, "-m", "dvc", "add", "-q", str(path.relative_to(root)))
    rec = "results/smoke/models/fp32_sigma0.25/model.pt.dvc"
    assert (a / rec).read_text() == (b / rec).read_text()


# -------------------------------------------------------------------- the report from committed text results

def test_the_committed_cpu_tables_regenerate_byte_for_byte(tmp_path, monkeypatch):
    """What CI checks: every table of the committed cpu comparison (the first one, cpu-v1) comes back identical from
    its text results."""
    monkeypatch.chdir(REPO)
    cfg = arq_config.load(REPO / "config" / "cpu-v1.yaml")
    assert report.check(cfg, tmp_path) == []
    for name in ("certified_accuracy", "bits_per_layer", "acr_vs_bitops", "search_curves"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 10_000


def test_a_table_that_differs_from_its_text_results_fails_the_check(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(REPO / "results" / "cpu-v1", tmp_path / "results" / "cpu-v1")
    cfg = arq_config.load(REPO / "config" / "cpu-v1.yaml")
    table = tmp_path / "results" / "cpu-v1" / "report" / "table.md"
    table.write_text(table.read_text().replace("0.307", "0.407", 1))
    diffs = report.check(cfg, tmp_path / "scratch")
    assert len(diffs) == 1 and "0.407" in diffs[0] and "0.307" in diffs[0]
    from arq.cli import main

    assert main(["regenerate", "--config", str(REPO / "config" / "cpu-v1.yaml"), "--check"]) == 1


def test_regenerating_without_the_text_results_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = arq_config.load(REPO / "config" / "cpu-v1.yaml")
    with pytest.raises(FileNotFoundError, match=r"profile 'cpu-v1' lacks 24 text result\(s\) the report reads, e.g. .*certify/fp32_sigma0.25.json"):
        report.regenerate(cfg)


def _tamper_tsv(path: Path, line: int, **fields) -> None:
    lines = path.read_text().splitlines()
    head = lines[0].split("\t")
    cells = lines[line - 1].split("\t")
    for k, v in fields.items():
        cells[head.index(k)] = str(v)
    lines[line - 1] = "\t".join(cells)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("what", ["correct flag", "abstention with a radius", "summary", "row count"])
def test_the_check_names_an_inconsistent_input_file(tmp_path, monkeypatch, what):
    """--check checks its inputs before the tables: a TSV row that contradicts itself, or a TSV that disagrees with
    its summary JSON, fails naming that file (a table regenerated from a tampered TSV would otherwise just
    'differ')."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(REPO / "results" / "cpu-v1", tmp_path / "results" / "cpu-v1")
    cfg = arq_config.load(REPO / "config" / "cpu-v1.yaml")
    tsv = tmp_path / "results" / "cpu-v1" / "certify" / "hawq_b1.5_s0_sigma0.25.tsv"
    summary = tsv.with_suffix(".json")
    rows = tsv.read_text().splitlines()
    correct_line = next(k for k, r in enumerate(rows[1:], start=2) if r.split("\t")[4] == "1")
    if what == "correct flag":
        _tamper_tsv(tsv, correct_line, correct=0)
        expected = f"{tsv.relative_to(tmp_path)}: line {correct_line}"
    elif what == "abstention with a radius":
        _tamper_tsv(tsv, correct_line, predict=-1, correct=0)
        expected = "an abstention with radius"
    elif what == "summary":
        s = json.loads(summary.read_text())
        s["acr"] += 0.01
        summary.write_text(json.dumps(s))
        expected = f"{summary.relative_to(tmp_path)}: acr = "
    else:
        tsv.write_text("\n".join(rows[:-1]) + "\n")
        expected = "summarises 200 images but"
    problems = report.check(cfg, tmp_path / "scratch")
    assert problems and all("hawq_b1.5_s0_sigma0.25" in p for p in problems)
    assert any(expected in p for p in problems), problems
    from arq.cli import main

    assert main(["regenerate", "--config", str(REPO / "config" / "cpu-v1.yaml"), "--check"]) == 1


def test_push_names_a_remote_inside_the_repository_for_git(profile, tmp_path):
    """An in-repository remote's objects are committed with the records, so push's git add line names its folder."""
    root, _ = profile
    _sh(root, sys.executable, "-m", "dvc", "remote", "add", "-d", "inside", "artifacts/dvc")
    _sh(root, sys.executable, "-m", "dvc", "remote", "add", "outside", str(tmp_path / "elsewhere"))
    assert artifacts._remote_inside(root, None) == ["artifacts/dvc"]
    assert artifacts._remote_inside(root, "outside") == []
