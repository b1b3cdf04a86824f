"""Atomic outputs: byte-reproducible checkpoints, the user's umask, and corrupt resume files set aside."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from arq import models
from arq.io import set_aside, sha256_file, torch_save, write_text


def test_identical_content_saves_to_identical_bytes(tmp_path):
    """torch.save to a (temporary) path records that path's name in the archive: every model_sha256 fingerprint
    and every DVC object would differ between two saves of the same weights."""
    torch.manual_seed(0)
    model = models.build("resnet20")
    a, b = tmp_path / "a" / "model.pt", tmp_path / "elsewhere" / "other-name.pt"
    models.save_checkpoint(a, model, "resnet20", sigma=0.25)
    models.save_checkpoint(b, model, "resnet20", sigma=0.25)
    assert sha256_file(a) == sha256_file(b)
    torch_save({"x": torch.arange(3)}, a)
    torch_save({"x": torch.arange(3)}, b)
    assert a.read_bytes() == b.read_bytes()
    assert torch.equal(torch.load(a, weights_only=True)["x"], torch.arange(3))


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_get_the_users_umask_not_0600(tmp_path, umask):
    before = os.umask(umask)
    try:
        write_text(tmp_path / "t.txt", "x")
        torch_save({"x": 1}, tmp_path / "c.pt")
    finally:
        os.umask(before)
    for name in ("t.txt", "c.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path):
    class Boom(Exception):
        pass

    class Unpicklable:
        def __reduce__(self):
            raise Boom

    with pytest.raises(Boom):
        torch_save({"x": Unpicklable()}, tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []


def test_set_aside_keeps_the_corrupt_files_and_says_why(tmp_path):
    p, q = tmp_path / "run.tsv.partial", tmp_path / "run.tsv.partial.json"
    p.write_text("torn")
    q.write_text("{")
    said = []
    set_aside([p, q], "row 2 is for image 40", said.append)
    assert not p.exists() and not q.exists()
    assert (tmp_path / "run.tsv.partial.corrupt").read_text() == "torn"
    assert (tmp_path / "run.tsv.partial.json.corrupt").read_text() == "{"
    assert "row 2 is for image 40" in said[0] and str(p) in said[0]
