"""Shared fixtures: repository paths, profile configs, tiny synthetic CIFAR-like sources, real-data access."""
from __future__ import annotations

import copy
import hashlib
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arq import config as arq_config
from arq.data import CLASSES

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_ARCHIVE = (REPO_ROOT / ".." / "shared" / "datasets" / "cifar10-jpeg.tar.gz").resolve()

# File names chosen so that creation order, numeric order and string order all differ:
# the canonical order is the *string* order of (class name, file name).
TRAIN_NAMES = ("9.png", "10.png")
TEST_NAMES = ("b.png",)


def require_real_archive(path: Path) -> None:
    """Skip real-data tests on a developer machine without the offline copy; under CI its absence is a failure,
    so CI can never pass without having run the pipeline on real CIFAR-10."""
    if path.exists():
        return
    message = f"offline CIFAR-10 copy not found at {path} (expected ../shared/datasets/ beside the repository)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def real_archive() -> Path:
    require_real_archive(REAL_ARCHIVE)
    return REAL_ARCHIVE


@pytest.fixture(scope="session")
def real_cifar(real_archive):
    """The real offline CIFAR-10 copy decoded once per session (about 25 s on two cores)."""
    from arq.data import read_folder_source

    return read_folder_source(real_archive, None, threads=2)


@pytest.fixture
def paper_config() -> dict:
    return arq_config.load(REPO_ROOT / "config" / "config.yaml")


@pytest.fixture
def smoke_config() -> dict:
    return copy.deepcopy(arq_config.load(REPO_ROOT / "config" / "smoke.yaml"))


@pytest.fixture
def single_thread():
    """Run torch on one thread (bitwise reproducible CPU kernels), restoring the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class TinySource:
    """A class-folder tree ``<root>/{train,test}/<class>/<file>`` of random 32×32 PNG images.

    ``expected[split]`` lists (class, file, HxWx3 uint8 array) in canonical order (class name, file name).
    """

    def __init__(self, root: Path, train_names=TRAIN_NAMES, test_names=TEST_NAMES, seed: int = 0):
        self.root = Path(root)
        rng = np.random.default_rng(seed)
        self.expected: dict[str, list] = {}
        for split, names in (("train", train_names), ("test", test_names)):
            items = []
            # create classes in reverse order and files in the given order, so the file system's
            # creation order is not the canonical one
            for cls in reversed(CLASSES):
                folder = self.root / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                for name in names:
                    arr = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                    Image.fromarray(arr).save(folder / name)
                    items.append((cls, name, arr))
            self.expected[split] = sorted(items, key=lambda t: (t[0], t[1]))

    @property
    def sizes(self) -> tuple[int, int]:
        return len(self.expected["train"]), len(self.expected["test"])

    def x(self, split: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([a for _, _, a in self.expected[split]])).permute(0, 3, 1, 2)

    def y(self, split: str) -> torch.Tensor:
        return torch.tensor([CLASSES.index(c) for c, _, _ in self.expected[split]], dtype=torch.int64)

    def archive(self, path: Path, top: str = "cifar10-tiny", sums: bool = False) -> Path:
        """Pack the tree as ``path`` (.tar.gz) under a top folder; optionally write SHA256SUMS beside it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w:gz") as tar:
            for split in ("train", "test"):
                tar.add(self.root / split, arcname=f"{top}/{split}")
        if sums:
            (path.parent / "SHA256SUMS").write_text(f"{sha256_of(path)}  {path.name}\n")
        return path


@pytest.fixture
def tiny_source(tmp_path, monkeypatch) -> TinySource:
    """A 20-train / 10-test class-folder tree; arq.data's expected split sizes shrunk to match."""
    src = TinySource(tmp_path / "tree")
    n_train, n_test = src.sizes
    monkeypatch.setattr("arq.data.TRAIN_SIZE", n_train)
    monkeypatch.setattr("arq.data.TEST_SIZE", n_test)
    return src


@pytest.fixture
def tiny_data():
    """A random uint8 'CIFAR' of 64 train / 32 val images, for training and finetune loops that must be fast."""
    from arq.data import Prepared, Split

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (96,), generator=g)
    return Prepared(train=Split(x[:64], y[:64]), val=Split(x[64:], y[64:]), cert=Split(x[:4], y[:4]),
                    cert_idx=torch.arange(4), manifest={"file_sha256": "ab" * 32})
