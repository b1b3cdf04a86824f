"""ImageNet (or any ImageFolder tree the user brings), streamed from disk, never packed into one tensor file.

The tree is ``<root>/train/<class>/<image>`` and ``<root>/val/<class>/<image>``, classes named alike in both
(e.g. WordNet ids). The canonical order of a split is class name, then file name. From it:

- the *search split* (what searches, the IRS cache and per-epoch validation score on; the ``val`` of a
  ``Prepared``): ``search_per_class`` training images per class, drawn by a seeded permutation within each class;
  the remaining training images are the training split, kept in a seeded random order (like CIFAR-10's) so
  that its first k images are a random subset. The val folder is never seen by a search;
- the *certification subset*: every ``cert_skip``-th val image in canonical order (Cohen et al.'s ImageNet
  protocol: skip 100 → 500 of the 50,000 val images).

Preparing such a tree writes a listing (split, class, path, size and, optionally, sha256 of every file) and a
manifest whose ``file_sha256`` is the listing's; stages check the listing against the manifest and each image's
size when they read it, so a replaced or truncated file is an error that names it. Full content hashes read the
whole tree once (about 150 GB for ImageNet: tens of minutes on a fast disk), so they are optional
(``data.content_sha256``).

Images come out as uint8 tensors (3×S×S) in [0, 255], like the CIFAR-10 tensors: noise is added in [0,1] pixel
space by the stages, before the model's own normalization layer. Training images get the standard augmentation
(random-resized crop to S, horizontal flip) in DataLoader workers; evaluation images are resized to S·256/224 on
their short side and centre-cropped to S.
"""
from __future__ import annotations

import csv
import gzip
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from arq.data import DataError, Prepared, read_manifest
from arq.io import provenance, sha256_file, write_json, write_text

SUFFIXES = (".jpeg", ".jpg", ".png")
SPLITS = ("train", "val")
LISTING_COLUMNS = ("split", "class", "path", "size", "sha256")


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the tree's root, with forward slashes
    label: int
    size: int
    sha256: str = ""


@dataclass(frozen=True)
class Tree:
    root: Path
    classes: tuple[str, ...]
    files: dict[str, tuple[Entry, ...]]  # split → entries in canonical order


# ------------------------------------------------------------------------------------------------ scanning

def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir())


def scan(root: str | Path, content_sha256: bool = False, log: Callable = print) -> Tree:
    """Every image of the tree in canonical order, with sizes (and sha256 when asked). A missing split folder, a
    class present in one split only or a class without images is an error naming the folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"ImageFolder root not found: {root} (data.path must name a folder holding train/ and val/)")
    for split in SPLITS:
        if not (root / split).is_dir():
            raise DataError(f"{root / split} is missing: an ImageFolder tree needs train/<class>/ and val/<class>/")
    classes = {split: _class_dirs(root / split) for split in SPLITS}
    for split, other in (("train", "val"), ("val", "train")):
        missing = sorted(set(classes[other]) - set(classes[split]))
        if missing:
            raise DataError(f"class folder {root / split / missing[0]} is missing ({len(missing)} class(es) of "
                            f"{other}/ have no folder in {split}/)")
    names = tuple(classes["train"])
    if not names:
        raise DataError(f"{root / 'train'} holds no class folders")
    files, start = {}, time.perf_counter()
    for split in SPLITS:
        entries = []
        for label, name in enumerate(names):
            folder = root / split / name
            images = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())
            if not images:
                raise DataError(f"{folder} holds no images ({', '.join(SUFFIXES)})")
            for image in images:
                path = folder / image
                digest = sha256_file(path) if content_sha256 else ""
                entries.append(Entry(f"{split}/{name}/{image}", label, path.stat().st_size, digest))
        files[split] = tuple(entries)
    if content_sha256:
        log(f"hashed {sum(map(len, files.values()))} images in {time.perf_counter() - start:.1f} s")
    return Tree(root, names, files)


def search_positions(labels: Sequence[int], per_class: int, seed: int) -> torch.Tensor:
    """Sorted positions of ``per_class`` training images of every class, drawn by a seeded permutation within
    the class (the generator is seeded once; classes are visited in order)."""
    labels = torch.as_tensor(labels)
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(int(labels.max()) + 1 if len(labels) else 0):
        members = torch.nonzero(labels == c).flatten()
        if len(members) <= per_class:
            raise DataError(f"class {c} has {len(members)} training images; the search split takes {per_class} "
                            f"per class and must leave some to train on")
        picked.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    return torch.cat(picked).sort().values


def cert_positions(n_val: int, skip: int) -> torch.Tensor:
    """Cohen's protocol: every ``skip``-th val image of the canonical order."""
    return torch.arange(0, n_val, skip)


# ------------------------------------------------------------------------------------------------- listing

def write_listing(path: str | Path, tree: Tree) -> None:
    """The tree's files as gzip'd TSV (deterministic bytes: no timestamp in the gzip header)."""
    text = io.StringIO()
    w = csv.writer(text, delimiter="\t", lineterminator="\n")
    w.writerow(LISTING_COLUMNS)
    for split in SPLITS:
        for e in tree.files[split]:
            w.writerow((split, tree.classes[e.label], e.path, e.size, e.sha256))
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        gz.write(text.getvalue().encode())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def read_listing(path: str | Path, classes: Sequence[str]) -> dict[str, tuple[Entry, ...]]:
    index = {name: i for i, name in enumerate(classes)}
    files: dict[str, list[Entry]] = {split: [] for split in SPLITS}
    with gzip.open(path, "rt") as f:
        rows = csv.reader(f, delimiter="\t")
        if tuple(next(rows, ())) != LISTING_COLUMNS:
            raise DataError(f"{path} is not an ImageFolder listing (header {LISTING_COLUMNS})")
        for split, name, rel, size, digest in rows:
            files[split].append(Entry(rel, index[name], int(size), digest))
    return {split: tuple(v) for split, v in files.items()}


def prepare(config: dict, listing_file: str | Path, manifest_file: str | Path, log: Callable = print) -> dict:
    """Scan the tree named by ``data.path``; write its listing and the manifest (splits, rules, checksums)."""
    start = time.perf_counter()
    d = config["data"]
    tree = scan(d["path"], d["content_sha256"], log)
    labels = [e.label for e in tree.files["train"]]
    search = search_positions(labels, d["search_per_class"], d["split_seed"])
    cert = cert_positions(len(tree.files["val"]), d["cert_skip"])
    write_listing(listing_file, tree)
    manifest = {
        "dataset": "ImageFolder",
        "settings": d,
        "source": {"kind": "imagefolder", "path": str(d["path"]), "content_sha256": d["content_sha256"]},
        "verified": d["content_sha256"],
        "classes": list(tree.classes),
        "sizes": {"train": len(labels) - len(search), "val": len(search), "test": len(tree.files["val"]),
                  "cert": len(cert)},
        "split_rule": f"{d['search_per_class']} training images per class (seeded permutation within each class, "
                      f"seed {d['split_seed']}) → the search split (val); the rest → train; the val folder is the "
                      f"test set",
        "split_seed": d["split_seed"],
        "search_idx": search.tolist(),
        "cert_rule": f"every {d['cert_skip']}-th val image of the canonical order (class name, then file name)",
        "transforms": {"train": f"random-resized crop {d['image_size']}, horizontal flip",
                       "eval": f"resize {eval_resize(d['image_size'])} (short side), centre crop {d['image_size']}"},
        "file": Path(listing_file).name,
        "file_sha256": sha256_file(listing_file),
    }
    manifest.update(provenance(config, torch.device("cpu"), time.perf_counter() - start))
    write_json(manifest_file, manifest)
    log(f"listed {sum(len(v) for v in tree.files.values())} images of {len(tree.classes)} classes under {d['path']}")
    return manifest


# --------------------------------------------------------------------------------------- reading images

def eval_resize(size: int) -> int:
    """The short side an evaluation image is resized to before the centre crop (256 for 224)."""
    return round(size * 256 / 224)


def transform(size: int, train: bool):
    from torchvision.transforms import v2

    if train:
        steps = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(eval_resize(size), antialias=True), v2.CenterCrop(size)]
    return v2.Compose([v2.PILToTensor(), *steps])


def decode(root: Path, entry: Entry) -> Image.Image:
    """One image as RGB; a file that is missing, resized since the listing or not an image is an error naming it."""
    path = root / entry.path
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path} is missing (listed when the tree was prepared)") from None
    if size != entry.size:
        raise DataError(f"{path} has {size} bytes, but {entry.size} when the tree was prepared: the file changed; "
                        f"prepare the data again")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{path} is not a readable image ({exc})") from exc


class Images(Dataset):
    """(uint8 image, label) pairs of some entries of a tree, through the train or the evaluation transform."""

    def __init__(self, root: Path, entries: Sequence[Entry], size: int, train: bool):
        self.root, self.entries, self.size, self.train = root, list(entries), size, train
        self.transform = transform(size, train)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        e = self.entries[i]
        return self.transform(decode(self.root, e)), e.label


class Decoded:
    """``split.x`` of a streamed split: indexing decodes the images (evaluation transform) into a uint8 tensor,
    so code written for the in-memory CIFAR-10 tensors (``x[i]``, ``x[positions]``, ``x[:k]``) reads a few
    images of a streamed split the same way. Bulk passes use ``FolderSplit.loader`` instead."""

    def __init__(self, split: "FolderSplit"):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index) -> torch.Tensor:
        ds = self.split.dataset(train=False)
        if isinstance(index, int) or (torch.is_tensor(index) and index.dim() == 0):
            return ds[int(index)][0]
        positions = range(len(ds))[index] if isinstance(index, slice) else torch.as_tensor(index).flatten().tolist()
        if not len(positions):
            return torch.empty(0, 3, self.split.size, self.split.size, dtype=torch.uint8)
        return torch.stack([ds[int(i)][0] for i in positions])


@dataclass(frozen=True)
class FolderSplit:
    """One part of an ImageFolder tree: labels in memory, images read from disk when asked for."""

    root: Path
    entries: tuple[Entry, ...]
    size: int
    workers: int = 0
    y: torch.Tensor = field(init=False, repr=False, compare=False)
    streamed = True  # a class attribute: what arq.train and arq.data ask before indexing ``x`` in bulk

    def __post_init__(self):
        object.__setattr__(self, "y", torch.tensor([e.label for e in self.entries], dtype=torch.int64))

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def x(self) -> Decoded:
        return Decoded(self)

    def subset(self, positions) -> "FolderSplit":
        return FolderSplit(self.root, tuple(self.entries[int(i)] for i in positions), self.size, self.workers)

    def dataset(self, train: bool) -> Images:
        return Images(self.root, self.entries, self.size, train)

    def loader(self, batch_size: int, train: bool, seed: int | None = None, drop_last: bool = False) -> DataLoader:
        """Batches of (uint8 images, labels) decoded by ``workers`` processes. Training order and augmentation
        come from ``seed``: the sampler's generator and, through the per-worker seeds DataLoader derives from it
        (torch's and python's generators, which the transforms draw from), the augmentation, so a run with the
        same seed and worker count sees the same batches."""
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return DataLoader(self.dataset(train), batch_size=batch_size, shuffle=train, generator=gen,
                          num_workers=self.workers, drop_last=drop_last, pin_memory=torch.cuda.is_available(),
                          persistent_workers=False)


def load(listing_file: str | Path, manifest_file: str | Path, workers: int | None = None) -> Prepared:
    """The prepared tree: the listing checked against its manifest, the splits as ``FolderSplit``s."""
    manifest = read_manifest(listing_file, manifest_file)
    d = manifest["settings"]
    files = read_listing(listing_file, manifest["classes"])
    root, size = Path(d["path"]), d["image_size"]
    train = FolderSplit(root, files["train"], size, d["workers"] if workers is None else workers)
    search = set(manifest["search_idx"])
    cert_idx = cert_positions(len(files["val"]), d["cert_skip"])
    val_split = FolderSplit(root, files["val"], size, train.workers)
    # the train split in a seeded random order (like CIFAR-10's), so its first k images are a random subset
    rest = torch.tensor([i for i in range(len(train)) if i not in search], dtype=torch.int64)
    order = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(d["split_seed"]))]
    return Prepared(train=train.subset(order.tolist()),
                    val=train.subset(sorted(search)), cert=val_split.subset(cert_idx.tolist()), cert_idx=cert_idx,
                    manifest=manifest)


def write_tree(root: str | Path, classes: Sequence[str], per_class: dict[str, int], size: int = 16,
               seed: int = 0) -> Path:
    """A small ImageFolder of random-noise JPEGs (``per_class`` images per class in each split): for tests and the
    imagenet-smoke profile, which users without ImageNet can run."""
    import numpy as np

    root = Path(root)
    rs = np.random.RandomState(seed)
    for split, k in per_class.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(k):
                # a class-dependent mean colour so a network can learn something from the tiny tree
                base = (np.array([(c * 97) % 256, (c * 57) % 256, (c * 17) % 256]) * 0.7).astype(np.uint8)
                pixels = np.clip(base + rs.randint(0, 80, (size + (i % 3) * 4, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{split}_{i:04d}.JPEG", quality=90)
    write_text(root / "README", "generated by arq.imagefolder.write_tree: random images, not ImageNet\n")
    return root
