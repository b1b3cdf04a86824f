"""CIFAR-10 from either real source into one verified uint8 tensor file plus a manifest.

Two sources (DESIGN §4): torchvision's ``cifar-10-batches-py`` (md5 of every file checked against
torchvision's published sums) and a class-folder tree of images, as a directory or ``.tar.gz`` (sha256
checked), which is how the offline JPEG copy ships. Every later stage reads the prepared file, and only
after checking it against the manifest's sha256.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from arq.io import provenance, sha256_file, torch_save, write_json

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_SIZE, TEST_SIZE = 50_000, 10_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class DataError(RuntimeError):
    """A missing, partial or corrupt dataset; the message names the file and where it should be."""


@dataclass(frozen=True)
class Split:
    """Images (uint8, N×3×32×32) and labels (int64) of one part of the data."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Prepared:
    train: Split
    val: Split
    cert: Split
    cert_idx: torch.Tensor  # positions of the certification images in the canonical test order
    manifest: dict


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → [0,1] floats: noise is added in this space, as in training (Cohen et al.)."""
    return x.float().div(255) if x.dtype == torch.uint8 else x


# ----------------------------------------------------------------------------------------------- sources

UNVERIFIED = ("unverified: no data.sha256 and no SHA256SUMS list in the folder, so the images were not checked "
              "against any reference")


def archive_sums(archive: Path) -> Path:
    return archive.parent / "SHA256SUMS"


def _check_file_sums(sums_file: Path, actual: dict[str, str]) -> None:
    """Every image of the tree must be listed in a sha256sum-style file with the same sum, and vice versa."""
    listed = {}
    for n, line in enumerate(sums_file.read_text().splitlines(), 1):
        parts = line.split(maxsplit=1)
        if not line.strip():
            continue
        if len(parts) != 2 or len(parts[0]) != 64:
            raise DataError(f"{sums_file}:{n}: not a '<sha256>  <relative path>' line: {line!r}")
        listed[parts[1].strip().lstrip("*").removeprefix("./")] = parts[0].lower()
    listed = {name: h for name, h in listed.items() if name.lower().endswith(IMAGE_SUFFIXES)}
    for name, h in actual.items():
        if name not in listed:
            raise DataError(f"{sums_file.parent / name} is not listed in {sums_file} (an added or renamed image?)")
        if listed[name] != h:
            raise DataError(f"checksum mismatch for {sums_file.parent / name}: sha256 {h}, {sums_file} lists "
                            f"{listed[name]} (an altered image)")
    missing = sorted(set(listed) - set(actual))
    if missing:
        raise DataError(f"{sums_file.parent / missing[0]} is listed in {sums_file} but missing"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def _expected_archive_sha256(archive: Path, configured: str | None) -> str:
    if configured:
        return configured
    sums = archive_sums(archive)
    if not sums.exists():
        raise DataError(f"no reference checksum for {archive}: set data.sha256 in the config or place a "
                        f"SHA256SUMS file beside the archive")
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == archive.name:
            return parts[0].lower()
    raise DataError(f"{sums} has no entry for {archive.name}; set data.sha256 in the config")


def _decode(blob: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(blob)) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as exc:  # PIL raises many types for broken files
        raise DataError(f"cannot decode image {name}: {exc}") from exc
    if arr.shape != (32, 32, 3):
        raise DataError(f"image {name} has shape {arr.shape}, expected 32×32 RGB")
    return arr


def _assemble(entries: dict[tuple[str, str, str], bytes], origin: str, threads: int) -> dict[str, Split]:
    """Decode {(split, class, file): bytes} in canonical order (class name, then file name)."""
    out = {}
    for split, expected in (("train", TRAIN_SIZE), ("test", TEST_SIZE)):
        keys = sorted(k for k in entries if k[0] == split)
        classes = sorted({k[1] for k in keys})
        if classes != sorted(CLASSES):
            raise DataError(f"{origin}: {split}/ must hold exactly the CIFAR-10 class folders {sorted(CLASSES)}, "
                            f"found {classes}")
        if len(keys) != expected:
            raise DataError(f"{origin}: {split}/ holds {len(keys)} images, expected {expected} (partial copy?)")
        with ThreadPoolExecutor(max_workers=threads) as pool:
            arrays = list(pool.map(lambda k: _decode(entries[k], f"{origin}:{'/'.join(k)}"), keys, chunksize=512))
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        y = torch.tensor([CLASSES.index(k[1]) for k in keys], dtype=torch.int64)
        out[split] = Split(x, y)
    return out


def _missing_source(path: Path) -> DataError:
    return DataError(f"CIFAR-10 source not found: {path} (config data.path). Expected the class-folder copy, "
                     f"e.g. ../shared/datasets/cifar10-jpeg.tar.gz, or set data.source: torchvision")


def _verify_archive(path: Path, expected_sha256: str | None) -> dict:
    expected = _expected_archive_sha256(path, expected_sha256)
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(f"checksum mismatch for {path}: sha256 {actual}, expected {expected} "
                        f"(corrupt or partial download; fetch the file again)")
    how = "data.sha256" if expected_sha256 else f"{archive_sums(path)}"
    return {"kind": "folder-archive", "path": str(path), "sha256": actual, "verified": True,
            "verification": f"sha256 of the archive matches {how}"}


def _tree_files(path: Path):
    """(split, class, file name, path) of every image of a class-folder tree, in canonical order."""
    for split in ("train", "test"):
        for file in sorted((path / split).glob("*/*")):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                yield split, file.parent.name, file.name, file


def _verify_tree(path: Path, file_sums: dict[str, str], expected_sha256: str | None) -> dict:
    """Check a tree's per-image sums against data.sha256 (one hash over the tree) or a SHA256SUMS list in it."""
    digest = hashlib.sha256()
    for name, h in file_sums.items():  # canonical order
        digest.update(f"{name}\0".encode())
        digest.update(bytes.fromhex(h))
    tree = digest.hexdigest()
    record = {"kind": "folder-tree", "path": str(path), "tree_sha256": tree}
    if expected_sha256:
        if tree != expected_sha256:
            raise DataError(f"checksum mismatch for folder {path}: tree sha256 {tree}, expected {expected_sha256}")
        return {**record, "verified": True, "verification": "tree sha256 matches data.sha256"}
    if (path / "SHA256SUMS").exists():
        _check_file_sums(path / "SHA256SUMS", file_sums)
        return {**record, "verified": True,
                "verification": f"sha256 of each of the {len(file_sums)} images matches {path / 'SHA256SUMS'}"}
    return {**record, "verified": False, "verification": UNVERIFIED}


def read_folder_source(path: str | Path, expected_sha256: str | None = None, threads: int = 2):
    """Read a class-folder tree ``{train,test}/<class>/<image>`` from a directory or a ``.tar.gz``.

    Returns the train and test splits and a provenance record saying what was verified against what.
    """
    path = Path(path)
    if not path.exists():
        raise _missing_source(path)
    entries: dict[tuple[str, str, str], bytes] = {}
    if path.is_file():
        record = _verify_archive(path, expected_sha256)
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    parts = Path(member.name).parts
                    if member.isfile() and len(parts) >= 3 and parts[-3] in ("train", "test") \
                            and parts[-1].lower().endswith(IMAGE_SUFFIXES):
                        entries[(parts[-3], parts[-2], parts[-1])] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(f"cannot read archive {path}: {exc}") from exc
    else:
        file_sums = {}
        for split, cls, name, file in _tree_files(path):
            entries[(split, cls, name)] = blob = file.read_bytes()
            file_sums[f"{split}/{cls}/{name}"] = hashlib.sha256(blob).hexdigest()
        record = _verify_tree(path, file_sums, expected_sha256)
    splits = _assemble(entries, str(path), threads)
    record["canonical_order"] = "class name (torchvision class order for labels), then file name"
    return splits, record


def source_inputs(d: dict) -> list[str]:
    """The files a prepare run will read, so that Snakemake can refuse a missing source before it schedules the
    job (and deletes the job's previous outputs). Empty for a torchvision source that may download."""
    path = Path(d["path"])
    if d["source"] == "imagefolder":
        if not (path / "train").is_dir() or not (path / "val").is_dir():
            raise DataError(f"ImageFolder tree not found: {path} must hold train/<class>/ and val/<class>/ (config "
                            f"data.path); ImageNet is never downloaded")
        return [str(path)]
    if d["source"] == "torchvision":
        if d["download"]:
            return []
        from torchvision.datasets import CIFAR10

        files = [path / CIFAR10.base_folder / name for name in torchvision_files()]
        missing = [f for f in files if not f.exists()]
        if missing:
            raise DataError(f"CIFAR-10 file missing: {missing[0]} (config data.path = {path}). Set data.download: "
                            "true to fetch it with torchvision")
        return [str(f) for f in files]
    if not path.exists():
        raise _missing_source(path)
    if path.is_file():
        _expected_archive_sha256(path, d["sha256"])  # a reference checksum must exist
        if not d["sha256"]:
            return [str(path), str(archive_sums(path))]
    return [str(path)]


def verify_source(d: dict) -> dict:
    """Verify a source's checksums without decoding it (seconds): what prepare would refuse, refused first."""
    path = Path(d["path"])
    if d["source"] == "imagefolder":
        source_inputs(d)
        return {"verified": False, "verification": "listed (sizes, and sha256 if data.content_sha256) by the prepare "
                                                   "job"}
    if d["source"] == "torchvision":
        if d["download"]:
            return {"verified": False, "verification": "downloaded (and md5-checked) by the prepare job"}
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import check_integrity

        for name, md5 in torchvision_files().items():
            file = path / CIFAR10.base_folder / name
            if not file.exists():
                raise DataError(f"CIFAR-10 file missing: {file} (config data.path = {path})")
            if not check_integrity(str(file), md5):
                raise DataError(f"checksum mismatch for {file}: md5 differs from torchvision's {md5}")
        return {"verified": True, "verification": "md5 of every file matches torchvision's published sums"}
    if not path.exists():
        raise _missing_source(path)
    if path.is_file():
        return _verify_archive(path, d["sha256"])
    return _verify_tree(path, {f"{split}/{cls}/{name}": sha256_file(file)
                               for split, cls, name, file in _tree_files(path)}, d["sha256"])


def torchvision_files() -> dict[str, str]:
    """File name → md5 of torchvision's CIFAR-10 python batches (its published sums)."""
    from torchvision.datasets import CIFAR10

    return {name: md5 for name, md5 in CIFAR10.train_list + CIFAR10.test_list}


def read_torchvision_source(root: str | Path, download: bool = False, md5s: dict[str, str] | None = None):
    """Read torchvision's ``cifar-10-batches-py`` under ``root``, every file md5-checked."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    root = Path(root)
    folder = root / CIFAR10.base_folder
    md5s = md5s or torchvision_files()
    if download and not all(check_integrity(str(folder / f), m) for f, m in md5s.items()):
        CIFAR10(str(root), train=True, download=True)
    checked = {}
    for name, md5 in md5s.items():
        file = folder / name
        if not file.exists():
            raise DataError(f"CIFAR-10 file missing: {file} (config data.path = {root}; it should hold "
                            f"{CIFAR10.base_folder}/). Set data.download: true to fetch it with torchvision")
        if not check_integrity(str(file), md5):
            raise DataError(f"checksum mismatch for {file}: md5 differs from torchvision's {md5} (corrupt or partial)")
        checked[name] = md5
    splits = {}
    for split, names in (("train", [n for n in md5s if n.startswith("data_batch")]),
                         ("test", [n for n in md5s if n.startswith("test_batch")])):
        xs, ys = [], []
        for name in sorted(names):
            with open(folder / name, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch["labels"], dtype=np.int64))
        splits[split] = Split(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))
    record = {"kind": "torchvision", "path": str(folder), "md5": checked, "verified": True,
              "verification": "md5 of every file matches torchvision's published sums",
              "canonical_order": "order of the batch files (data_batch_1..5, test_batch)"}
    return splits, record


# ----------------------------------------------------------------------------------------------- prepare

def split_indices(n_train: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic train/val split: a seeded permutation; val is kept sorted, train in permuted order
    (so ``train.train_images = k`` takes a random, class-balanced-in-expectation subset)."""
    if not 0 < val_size < n_train:
        raise ValueError(f"val_size {val_size} must be between 1 and {n_train - 1}")
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].clone(), perm[:val_size].sort().values


def balanced_positions(labels: torch.Tensor, k: int | None, skip: int = 0) -> torch.Tensor:
    """Positions (sorted) of ``k`` images of ``labels`` with every class equally represented: each class gives its
    images in index order, after skipping its first ``skip``; when k is not a multiple of the class count the
    lowest class ids give one more. ``skip`` takes a second subset disjoint from the first ``skip`` per class
    (e.g. the fidelity study's outcome images beside the reward's). ``k=None`` gives every position.

    The val split is kept sorted, and for the class-folder source the canonical order is class order, so the
    first k val images would be one or two classes; within a class the order is the seeded split's, i.e. random."""
    if k is None:
        return torch.arange(len(labels))
    classes = torch.unique(labels).tolist()
    per, extra = divmod(k, len(classes))
    picked = []
    for rank, c in enumerate(classes):
        want = per + (rank < extra)
        members = torch.nonzero(labels == c).flatten()[skip:]
        if len(members) < want:
            raise ValueError(f"a class-balanced subset of {k} images needs {want} of class {c} after skipping "
                             f"{skip}, but the split has only {len(members)}")
        picked.append(members[:want])
    return torch.cat(picked).sort().values


def balanced(split: Split, k: int | None, skip: int = 0) -> Split:
    """The class-balanced subset of ``balanced_positions`` as a Split."""
    if k is None:
        return split
    pos = balanced_positions(split.y, k, skip)
    return split.subset(pos.tolist()) if streamed(split) else Split(split.x[pos], split.y[pos])


def streamed(split) -> bool:
    """Whether a split is read from disk as it goes (arq.imagefolder) rather than held as one tensor."""
    return getattr(split, "streamed", False)


def in_memory(split) -> Split:
    """A split as tensors: a streamed one (arq.imagefolder) decoded through its evaluation transform, an in-memory
    one as it is. For the few hundred or thousand images a search or a calibration holds on the device."""
    return Split(split.x[:], split.y) if streamed(split) else split


def cert_indices(n_test: int, skip: int) -> torch.Tensor:
    """Cohen's protocol: every ``skip``-th test image of the canonical order."""
    return torch.arange(0, n_test, skip)


def prepare(config: dict, out_file: str | Path, manifest_file: str | Path, threads: int = 2, log=print) -> dict:
    start = time.perf_counter()
    d = config["data"]
    if d["source"] == "folder":
        splits, source = read_folder_source(d["path"], d["sha256"], threads)
    else:
        splits, source = read_torchvision_source(d["path"], d["download"])
    if source["verified"]:
        log(f"verified {source['path']}: {source['verification']}")
    else:
        log(f"WARNING: {source['path']} is {source['verification']}. Set data.sha256 (the tree sha256 recorded in "
            f"the manifest) or put a SHA256SUMS list in the folder to verify it.")
    train_idx, val_idx = split_indices(len(splits["train"]), d["val_size"], d["split_seed"])
    cidx = cert_indices(len(splits["test"]), d["cert_skip"])
    payload = {
        "train_x": splits["train"].x, "train_y": splits["train"].y,
        "test_x": splits["test"].x, "test_y": splits["test"].y,
        "train_idx": train_idx, "val_idx": val_idx, "cert_idx": cidx,
        "classes": list(CLASSES),
    }
    torch_save(payload, out_file)
    manifest = {
        "dataset": "CIFAR-10",
        "settings": d,
        "verified": source["verified"],
        "source": source,
        "classes": list(CLASSES),
        "sizes": {"train": len(train_idx), "val": len(val_idx), "test": len(splits["test"]), "cert": len(cidx)},
        "split_rule": f"seeded permutation of the {len(splits['train'])} training images (torch.randperm, "
                      f"seed {d['split_seed']}); first {d['val_size']} → val, rest → train",
        "split_seed": d["split_seed"],
        "cert_rule": f"every {d['cert_skip']}-th test image of the canonical order",
        "file": Path(out_file).name,
        "file_sha256": sha256_file(out_file),
    }
    if source["kind"] != "torchvision":
        manifest["note"] = ("images are the JPEG re-encoding of CIFAR-10 (quality 75); accuracies can sit slightly "
                            "below numbers published on the original files")
    manifest.update(provenance(config, torch.device("cpu"), time.perf_counter() - start))
    write_json(manifest_file, manifest)
    return manifest


def read_manifest(data_file: str | Path, manifest_file: str | Path) -> dict:
    """The manifest of prepared data, after checking that both files exist and that the data file (the tensors,
    or a streamed tree's listing) is the one it describes."""
    data_file, manifest_file = Path(data_file), Path(manifest_file)
    for f in (data_file, manifest_file):
        if not f.exists():
            raise DataError(f"prepared data missing: {f}; run `arq prepare` (the prepare_data rule) first")
    try:
        manifest = json.loads(manifest_file.read_text())
        expected = manifest["file_sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{manifest_file} is not a readable manifest ({exc}); delete it and {data_file} and run "
                        "prepare again") from exc
    if sha256_file(data_file) != expected:
        raise DataError(f"{data_file} does not match its manifest {manifest_file} (corrupt or replaced); "
                        f"delete both and run prepare again")
    return manifest


def load_prepared(data_file: str | Path, manifest_file: str | Path) -> Prepared:
    """Load the prepared tensors after checking them against the manifest (or stream a listed tree)."""
    manifest = read_manifest(data_file, manifest_file)
    if manifest.get("source", {}).get("kind") == "imagefolder":  # a listing of a streamed tree, not tensors
        from arq import imagefolder

        return imagefolder.load(data_file, manifest_file)
    p = torch.load(data_file, weights_only=True)
    tx, ty = p["train_x"], p["train_y"]
    return Prepared(
        train=Split(tx[p["train_idx"]], ty[p["train_idx"]]),
        val=Split(tx[p["val_idx"]], ty[p["val_idx"]]),
        cert=Split(p["test_x"][p["cert_idx"]], p["test_y"][p["cert_idx"]]),
        cert_idx=p["cert_idx"],
        manifest=manifest,
    )
