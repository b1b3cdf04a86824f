"""CIFAR-10 sources, checksums, canonical order, splits and the prepared file (arq/data.py)."""
from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arq import data
from arq.data import CLASSES, DataError, cert_indices, load_prepared, prepare, read_folder_source, \
    read_torchvision_source, split_indices

from conftest import sha256_of


# ------------------------------------------------------------------------------------------ folder source

def test_folder_tree_decodes_in_canonical_order(tiny_source):
    splits, record = read_folder_source(tiny_source.root)
    for split in ("train", "test"):
        assert splits[split].x.dtype == torch.uint8
        assert splits[split].x.shape == (len(tiny_source.expected[split]), 3, 32, 32)
        assert torch.equal(splits[split].x, tiny_source.x(split))
        assert torch.equal(splits[split].y, tiny_source.y(split))
    assert record["kind"] == "folder-tree"
    # string order of file names within a class: "10.png" before "9.png"; labels follow torchvision's order
    assert [name for _, name, _ in tiny_source.expected["train"][:2]] == ["10.png", "9.png"]
    assert splits["train"].y.tolist() == [c for c in range(10) for _ in range(2)]
    assert splits["test"].y.tolist() == list(range(10))


def test_folder_tree_checksum_is_checked_when_given(tiny_source):
    _, record = read_folder_source(tiny_source.root)
    read_folder_source(tiny_source.root, record["tree_sha256"])  # the right tree hash is accepted
    with pytest.raises(DataError, match="checksum mismatch"):
        read_folder_source(tiny_source.root, "0" * 64)


def test_folder_tree_without_any_reference_is_marked_unverified(tiny_source):
    """With data.sha256 null and no SHA256SUMS list, nothing can be checked: the record says so."""
    _, record = read_folder_source(tiny_source.root)
    assert record["verified"] is False and record["verification"].startswith("unverified")


def _write_tree_sums(src) -> Path:
    lines = [f"{sha256_of(p)}  {p.relative_to(src.root).as_posix()}" for p in sorted(src.root.rglob("*.png"))]
    (src.root / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return src.root / "SHA256SUMS"


def test_folder_tree_is_verified_file_by_file_against_its_sha256sums(tiny_source):
    _write_tree_sums(tiny_source)
    _, record = read_folder_source(tiny_source.root)
    assert record["verified"] is True and "each of the 30 images" in record["verification"]


def test_an_altered_image_in_a_listed_tree_is_refused(tiny_source):
    """An altered test JPEG (a certification image) used to prepare with rc=0 when data.sha256 was null."""
    _write_tree_sums(tiny_source)
    victim = tiny_source.root / "test" / "cat" / "b.png"
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(DataError, match="checksum mismatch for .*test/cat/b.png"):
        read_folder_source(tiny_source.root)


def test_an_unlisted_or_missing_image_in_a_listed_tree_is_refused(tiny_source):
    _write_tree_sums(tiny_source)
    cat = tiny_source.root / "test" / "cat"
    (cat / "b.png").rename(cat / "c.png")
    with pytest.raises(DataError, match="c.png is not listed"):
        read_folder_source(tiny_source.root)
    (cat / "c.png").unlink()
    with pytest.raises(DataError, match="b.png is listed in .* but missing"):
        read_folder_source(tiny_source.root)


def test_prepare_warns_about_an_unverified_source_and_records_it(tiny_source, tmp_path, smoke_config):
    cfg = smoke_config
    cfg["data"].update(path=str(tiny_source.root), val_size=4, cert_skip=1)
    said = []
    manifest = prepare(cfg, tmp_path / "d.pt", tmp_path / "m.json", log=said.append)
    assert manifest["verified"] is False and manifest["source"]["verification"].startswith("unverified")
    assert any(s.startswith("WARNING") and "unverified" in s for s in said)


def test_archive_decodes_like_the_tree_and_records_its_sha256(tiny_source, tmp_path):
    archive = tiny_source.archive(tmp_path / "dl" / "tiny.tar.gz")
    sha = sha256_of(archive)
    splits, record = read_folder_source(archive, sha)
    assert torch.equal(splits["train"].x, tiny_source.x("train"))
    assert torch.equal(splits["test"].y, tiny_source.y("test"))
    assert record == {"kind": "folder-archive", "path": str(archive), "sha256": sha, "verified": True,
                      "verification": "sha256 of the archive matches data.sha256",
                      "canonical_order": record["canonical_order"]}


def test_archive_with_jpeg_images(tmp_path, monkeypatch):
    root = tmp_path / "jpeg"
    rng = np.random.default_rng(3)
    for split in ("train", "test"):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True)
            # smooth images survive JPEG almost unchanged
            arr = np.full((32, 32, 3), rng.integers(30, 220, size=3), dtype=np.uint8)
            Image.fromarray(arr).save(root / split / cls / "0001.jpg", quality=95)
    monkeypatch.setattr(data, "TRAIN_SIZE", 10)
    monkeypatch.setattr(data, "TEST_SIZE", 10)
    splits, _ = read_folder_source(root)
    x = splits["train"].x.float()
    assert x.shape == (10, 3, 32, 32)
    # each decoded image is (nearly) constant per channel
    assert (x.amax(dim=(2, 3)) - x.amin(dim=(2, 3))).max() <= 4


def test_archive_sha256_mismatch_names_the_path(tiny_source, tmp_path):
    archive = tiny_source.archive(tmp_path / "tiny.tar.gz")
    with pytest.raises(DataError, match="checksum mismatch") as exc:
        read_folder_source(archive, "f" * 64)
    assert str(archive) in str(exc.value)


def test_archive_uses_sha256sums_beside_it(tiny_source, tmp_path):
    archive = tiny_source.archive(tmp_path / "dl" / "tiny.tar.gz", sums=True)
    splits, record = read_folder_source(archive, None)
    assert record["sha256"] == sha256_of(archive)
    assert len(splits["train"]) == 20
    # a "*name" (binary mode) entry among other entries is understood too
    (archive.parent / "SHA256SUMS").write_text(f"{'0' * 64}  other.tar.gz\n{sha256_of(archive)} *tiny.tar.gz\n")
    read_folder_source(archive, None)
    # a wrong entry is a mismatch
    (archive.parent / "SHA256SUMS").write_text(f"{'0' * 64}  tiny.tar.gz\n")
    with pytest.raises(DataError, match="checksum mismatch"):
        read_folder_source(archive, None)


def test_archive_without_reference_checksum(tiny_source, tmp_path):
    archive = tiny_source.archive(tmp_path / "dl" / "tiny.tar.gz")
    with pytest.raises(DataError, match="SHA256SUMS") as exc:
        read_folder_source(archive, None)
    assert str(archive) in str(exc.value)
    (archive.parent / "SHA256SUMS").write_text(f"{'0' * 64}  something-else.tar.gz\n")
    with pytest.raises(DataError, match="no entry for tiny.tar.gz"):
        read_folder_source(archive, None)


def test_missing_source_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "cifar10-jpeg.tar.gz"
    with pytest.raises(DataError) as exc:
        read_folder_source(missing)
    assert str(missing) in str(exc.value)
    assert "data.path" in str(exc.value)


def test_truncated_archive_is_refused(tiny_source, tmp_path):
    archive = tiny_source.archive(tmp_path / "tiny.tar.gz")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    # the checksum of the truncated file itself is "right", so only reading it can reveal the damage
    with pytest.raises(DataError, match="cannot read archive") as exc:
        read_folder_source(cut, sha256_of(cut))
    assert str(cut) in str(exc.value)


def test_wrong_class_folders_are_refused(tiny_source):
    (tiny_source.root / "train" / "cat").rename(tiny_source.root / "train" / "kitten")
    with pytest.raises(DataError, match="class folders") as exc:
        read_folder_source(tiny_source.root)
    assert "kitten" in str(exc.value)


def test_wrong_image_count_is_refused(tiny_source):
    (tiny_source.root / "train" / "dog" / "9.png").unlink()
    (tiny_source.root / "train" / "dog" / "readme.txt").write_text("not an image")  # ignored, not counted
    with pytest.raises(DataError, match="holds 19 images, expected 20"):
        read_folder_source(tiny_source.root)
    shutil.copy(tiny_source.root / "train" / "dog" / "10.png", tiny_source.root / "train" / "dog" / "9.png")
    shutil.copy(tiny_source.root / "train" / "dog" / "10.png", tiny_source.root / "train" / "dog" / "11.png")
    with pytest.raises(DataError, match="holds 21 images, expected 20"):
        read_folder_source(tiny_source.root)


def test_image_of_wrong_size_names_the_file(tiny_source, tmp_path):
    Image.fromarray(np.zeros((31, 32, 3), dtype=np.uint8)).save(tiny_source.root / "train" / "frog" / "9.png")
    with pytest.raises(DataError, match="32") as exc:
        read_folder_source(tiny_source.root)
    assert "train/frog/9.png" in str(exc.value)
    archive = tiny_source.archive(tmp_path / "bad.tar.gz")
    with pytest.raises(DataError) as exc:
        read_folder_source(archive, sha256_of(archive))
    assert "train/frog/9.png" in str(exc.value)


def test_undecodable_image_names_the_file(tiny_source):
    (tiny_source.root / "test" / "ship" / "b.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="cannot decode") as exc:
        read_folder_source(tiny_source.root)
    assert "test/ship/b.png" in str(exc.value)


def test_grayscale_images_are_converted_to_rgb(tiny_source):
    gray = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    Image.fromarray(gray).save(tiny_source.root / "test" / "airplane" / "b.png")
    splits, _ = read_folder_source(tiny_source.root)
    first = splits["test"].x[0]  # airplane/b.png is the first test image
    assert torch.equal(first, torch.from_numpy(gray).expand(3, 32, 32))


# ------------------------------------------------------------------------------------- torchvision source

def _write_batches(root, seed=0):
    """Fake cifar-10-batches-py: 5 train batches of 4 images, a test batch of 6; returns (md5s, x, y)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    md5s, xs, ys = {}, {"train": [], "test": []}, {"train": [], "test": []}
    for name, count, split in [(f"data_batch_{i}", 4, "train") for i in range(1, 6)] + [("test_batch", 6, "test")]:
        x = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, size=count).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": x, "labels": y, "batch_label": name.encode()}, f)
        md5s[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
        xs[split].append(x)
        ys[split] += y
    return md5s, {s: np.concatenate(v).reshape(-1, 3, 32, 32) for s, v in xs.items()}, ys


def test_torchvision_source_loads_md5_checked_batches(tmp_path):
    md5s, xs, ys = _write_batches(tmp_path)
    splits, record = read_torchvision_source(tmp_path, md5s=md5s)
    assert torch.equal(splits["train"].x, torch.from_numpy(xs["train"]))
    assert splits["train"].y.tolist() == ys["train"] and splits["train"].y.dtype == torch.int64
    assert torch.equal(splits["test"].x, torch.from_numpy(xs["test"]))
    assert splits["test"].y.tolist() == ys["test"]
    assert record["kind"] == "torchvision" and record["md5"] == md5s


def test_torchvision_md5_mismatch(tmp_path):
    md5s, _, _ = _write_batches(tmp_path)
    file = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    blob = bytearray(file.read_bytes())
    blob[-10] ^= 0xFF
    file.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="checksum mismatch") as exc:
        read_torchvision_source(tmp_path, md5s=md5s)
    assert str(file) in str(exc.value)


def test_torchvision_missing_file_names_it(tmp_path):
    md5s, _, _ = _write_batches(tmp_path)
    file = tmp_path / "cifar-10-batches-py" / "test_batch"
    file.unlink()
    with pytest.raises(DataError, match="missing") as exc:
        read_torchvision_source(tmp_path, md5s=md5s)
    assert str(file) in str(exc.value)


def test_torchvision_default_md5s_are_torchvisions_published_sums():
    sums = data.torchvision_files()
    assert sorted(sums) == [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    assert sums["data_batch_1"] == "c99cafc152244af753f735de768cd75f"
    assert sums["test_batch"] == "40351d587109b95175f43aff81a1287e"


def test_prepare_from_torchvision_source(tmp_path, smoke_config, monkeypatch):
    md5s, xs, ys = _write_batches(tmp_path / "tv")
    monkeypatch.setattr(data, "torchvision_files", lambda: md5s)
    cfg = smoke_config
    cfg["data"].update(source="torchvision", path=str(tmp_path / "tv"), val_size=5, cert_skip=3)
    manifest = prepare(cfg, tmp_path / "p" / "d.pt", tmp_path / "p" / "m.json")
    assert manifest["source"]["kind"] == "torchvision"
    assert "note" not in manifest  # the JPEG note is only for the re-encoded copy
    loaded = load_prepared(tmp_path / "p" / "d.pt", tmp_path / "p" / "m.json")
    assert len(loaded.train) == 15 and len(loaded.val) == 5
    assert loaded.cert_idx.tolist() == [0, 3]
    assert torch.equal(loaded.cert.x, torch.from_numpy(xs["test"][[0, 3]]))


# ------------------------------------------------------------------------------------------------- splits

def test_split_indices_partition_the_training_set():
    train, val = split_indices(1000, 100, seed=0)
    assert len(train) == 900 and len(val) == 100
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(1000))
    assert val.tolist() == sorted(val.tolist())
    assert train.tolist() != sorted(train.tolist())  # train stays in permuted order


def test_split_indices_depend_only_on_the_seed():
    a, b = split_indices(500, 50, 7), split_indices(500, 50, 7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = split_indices(500, 50, 8)
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("val_size", [0, 500, 600])
def test_split_indices_reject_bad_sizes(val_size):
    with pytest.raises(ValueError):
        split_indices(500, val_size, 0)


def test_cert_indices_follow_cohens_protocol():
    idx = cert_indices(10_000, 20)
    assert len(idx) == 500
    assert idx.tolist() == list(range(0, 10_000, 20))
    assert idx[0] == 0 and idx[-1] == 9980


# -------------------------------------------------------------------------------------- prepared file

@pytest.fixture
def prepared(tiny_source, tmp_path, smoke_config):
    archive = tiny_source.archive(tmp_path / "dl" / "tiny.tar.gz", sums=True)
    cfg = smoke_config
    cfg["data"].update(path=str(archive), val_size=4, cert_skip=3, split_seed=5)
    out, man = tmp_path / "prep" / "cifar10.pt", tmp_path / "prep" / "manifest.json"
    manifest = prepare(cfg, out, man)
    return tiny_source, archive, out, man, manifest


def test_prepare_then_load_round_trip(prepared):
    src, archive, out, man, manifest = prepared
    assert json.loads(man.read_text()) == manifest
    assert manifest["sizes"] == {"train": 16, "val": 4, "test": 10, "cert": 4}
    assert manifest["file_sha256"] == sha256_of(out)
    assert manifest["source"]["sha256"] == sha256_of(archive)
    assert manifest["classes"] == list(CLASSES)
    assert manifest["git_commit"] and manifest["config_hash"] and manifest["torch"] and manifest["wall_seconds"] > 0
    assert "JPEG" in manifest["note"]
    loaded = load_prepared(out, man)
    train_idx, val_idx = split_indices(20, 4, 5)
    assert torch.equal(loaded.train.x, src.x("train")[train_idx])
    assert torch.equal(loaded.train.y, src.y("train")[train_idx])
    assert torch.equal(loaded.val.x, src.x("train")[val_idx])
    assert torch.equal(loaded.val.y, src.y("train")[val_idx])
    assert loaded.cert_idx.tolist() == [0, 3, 6, 9]
    assert torch.equal(loaded.cert.x, src.x("test")[[0, 3, 6, 9]])
    assert loaded.cert.y.tolist() == [0, 3, 6, 9]  # one test image per class, in class order
    assert loaded.manifest == manifest


def test_load_prepared_refuses_a_changed_data_file(prepared):
    _, _, out, man, _ = prepared
    payload = torch.load(out, weights_only=True)
    payload["train_y"][0] = (payload["train_y"][0] + 1) % 10  # a plausible, silent corruption
    torch.save(payload, out)
    with pytest.raises(DataError, match="does not match its manifest") as exc:
        load_prepared(out, man)
    assert str(out) in str(exc.value)


@pytest.mark.parametrize("which", [0, 1])
def test_load_prepared_missing_files(prepared, which):
    _, _, out, man, _ = prepared
    missing = (out, man)[which]
    missing.unlink()
    with pytest.raises(DataError, match="prepared data missing") as exc:
        load_prepared(out, man)
    assert str(missing) in str(exc.value)


def test_prepare_is_deterministic(prepared, tmp_path, smoke_config):
    _, archive, out, _, manifest = prepared
    cfg = smoke_config
    cfg["data"].update(path=str(archive), val_size=4, cert_skip=3, split_seed=5)
    again = prepare(cfg, tmp_path / "again" / "cifar10.pt", tmp_path / "again" / "manifest.json")
    a, b = torch.load(out, weights_only=True), torch.load(tmp_path / "again" / "cifar10.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        if k == "classes":
            assert a[k] == b[k]
        else:
            assert torch.equal(a[k], b[k]), k
    assert again["sizes"] == manifest["sizes"]


# ----------------------------------------------------------------------------------------- the real copy

def test_real_offline_copy(real_cifar):
    splits, record = real_cifar
    train, test = splits["train"], splits["test"]
    assert train.x.shape == (50_000, 3, 32, 32) and test.x.shape == (10_000, 3, 32, 32)
    assert train.x.dtype == torch.uint8
    assert torch.bincount(train.y, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(test.y, minlength=10).tolist() == [1000] * 10
    # canonical order: grouped by class in torchvision's class order
    assert test.y.tolist() == [c for c in range(10) for _ in range(1000)]
    mean = test.x.double().mean(dim=(0, 2, 3)) / 255
    assert mean.tolist() == pytest.approx([0.488, 0.481, 0.448], abs=0.01)
    assert record["kind"] == "folder-archive"
    sums = (Path(record["path"]).parent / "SHA256SUMS").read_text()
    assert record["sha256"] in sums


# ------------------------------------------------------------------------------------------ class-balanced subsets

def _class_sorted_labels(per_class=(500, 480, 520, 500, 490, 510, 505, 495, 500, 500)):
    """Labels in class order with unequal class sizes, as the val split of the folder source is kept."""
    return torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])


@pytest.mark.parametrize("k", [10, 50, 103, 1000])
def test_a_balanced_subset_takes_every_class_equally(k):
    y = _class_sorted_labels()
    pos = data.balanced_positions(y, k)
    counts = torch.bincount(y[pos], minlength=10)
    assert len(pos) == k and counts.max() - counts.min() <= 1
    assert torch.equal(pos, pos.sort().values) and len(set(pos.tolist())) == k
    assert data.balanced_positions(y, k).tolist() == pos.tolist()  # deterministic
    # the head of the split, what used to be taken, is one or two classes
    assert len(torch.unique(y[:k])) <= 3


def test_a_second_balanced_subset_after_a_skip_is_disjoint_from_the_first():
    y = _class_sorted_labels()
    first = set(data.balanced_positions(y, 100).tolist())
    second = data.balanced_positions(y, 100, skip=10)
    assert not first & set(second.tolist())
    assert torch.bincount(y[second], minlength=10).tolist() == [10] * 10


def test_a_balanced_subset_larger_than_a_class_allows_is_an_error_naming_the_class():
    y = _class_sorted_labels((5, 50))
    with pytest.raises(ValueError, match="needs 10 of class 0 .* only 5"):
        data.balanced_positions(y, 20)
    assert data.balanced_positions(y, None).tolist() == list(range(55))


def test_the_irs_cache_takes_a_class_balanced_val_subset():
    """The IRS cache (the ARQ reward's images) takes its val images class-balanced; the finetune log's, HAQ's
    reward set and the search's are tested in test_finetune.py and test_search.py."""
    from arq import irs

    split = data.Split(torch.zeros(5000, 3, 32, 32, dtype=torch.uint8), _class_sorted_labels())
    prepared = data.Prepared(split, split, split, torch.arange(5000), {"classes": CLASSES})
    pos, _, y = irs._val_subset(prepared, 50)
    assert torch.bincount(y, minlength=10).tolist() == [5] * 10
