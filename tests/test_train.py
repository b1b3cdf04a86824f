"""Noise-augmented training: augmentation and exact resumption after an interruption (arq/train.py)."""
from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from arq import models
from arq.data import Split
from arq.io import torch_save
from arq.train import augment, noisy_accuracy, train

DEVICE = torch.device("cpu")


# ------------------------------------------------------------------------------------------- augmentation

def _images(b=8, seed=0):
    return torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_augment_shape_dtype_range():
    x = _images()
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert x.dtype == torch.uint8  # the input is not modified in place


def test_augment_is_deterministic_for_a_generator():
    x = _images()
    a = augment(x, torch.Generator().manual_seed(1))
    b = augment(x, torch.Generator().manual_seed(1))
    c = augment(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_augment_is_a_padded_crop_with_optional_flip():
    x = _images(16, seed=3)
    out = augment(x, torch.Generator().manual_seed(4), pad=4)
    padded = F.pad(x, (4, 4, 4, 4)).float() / 255
    flips = 0
    for i in range(len(x)):
        matches = []
        for oy in range(9):
            for ox in range(9):
                window = padded[i, :, oy:oy + 32, ox:ox + 32]
                for flip in (False, True):
                    if torch.equal(out[i], window.flip(-1) if flip else window):
                        matches.append((oy, ox, flip))
        assert matches, f"image {i} is not a crop of the padded input"
        flips += matches[0][2]
    assert 0 < flips < len(x)  # both flipped and unflipped images occur


def test_noisy_accuracy_of_a_constant_model():
    class Const(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([0.0, 1.0, 0.0]).expand(len(x), 3)

    split = Split(_images(10), torch.tensor([1, 1, 1, 0, 2, 1, 1, 0, 1, 1]))
    model = Const().train()
    assert noisy_accuracy(model, split, 0.5, 3, torch.Generator().manual_seed(0)) == pytest.approx(0.7)
    assert model.training  # the previous mode is restored


# ----------------------------------------------------------------------------------------------- resumption

@pytest.fixture
def tiny_config(smoke_config):
    cfg = smoke_config
    cfg["train"].update(epochs=2, train_images=None, val_images=None, batch_size=16, lr_milestones=[1])
    return cfg


class Interrupt(Exception):
    pass


def _run(cfg, data, out, sigma=0.25, log=None):
    out.mkdir(parents=True, exist_ok=True)
    lines = []

    def record(msg):
        lines.append(msg)
        if log is not None:
            log(msg)

    summary = train(cfg, sigma, data, out / "model.pt", out / "resume.pt", out / "train.csv", out / "train.json",
                    DEVICE, log=record)
    return summary, lines


def _history(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _assert_same_weights(a, b):
    sa, sb = torch.load(a, weights_only=True)["state_dict"], torch.load(b, weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


def test_interrupted_training_resumes_to_identical_weights(tiny_config, tiny_data, tmp_path, single_thread):
    straight, straight_log = _run(tiny_config, tiny_data, tmp_path / "straight")
    assert [l.split()[1] for l in straight_log if l.startswith("epoch")] == ["1/2", "2/2"]

    def crash_on_epoch_2(msg):
        if msg.startswith("epoch 2/2"):
            raise Interrupt

    out = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        _run(tiny_config, tiny_data, out, log=crash_on_epoch_2)
    resume = torch.load(out / "resume.pt", weights_only=True)
    assert resume["epoch"] == 1
    assert len(_history(out / "train.csv")) == 1
    assert not (out / "model.pt").exists()

    summary, lines = _run(tiny_config, tiny_data, out)
    assert any(l.startswith("resuming from") and "after epoch 1" in l for l in lines)
    assert not any(l.startswith("epoch 1/2") for l in lines)  # epoch 1 is not repeated
    _assert_same_weights(out / "model.pt", tmp_path / "straight" / "model.pt")
    assert not (out / "resume.pt").exists()
    hist, ref = _history(out / "train.csv"), _history(tmp_path / "straight" / "train.csv")
    assert [r["epoch"] for r in hist] == ["1", "2"]
    for r, s in zip(hist, ref):
        for col in ("epoch", "lr", "loss", "train_acc", "noisy_val_acc"):
            assert r[col] == s[col], col
    assert [float(r["lr"]) for r in hist] == [0.1, pytest.approx(0.01)]  # MultiStepLR state was restored
    assert summary["final_noisy_val_acc"] == straight["final_noisy_val_acc"]
    assert json.loads((out / "train.json").read_text())["epochs"] == 2


def test_checkpoint_metadata(tiny_config, tiny_data, tmp_path, single_thread):
    tiny_config["train"]["epochs"] = 1
    summary, _ = _run(tiny_config, tiny_data, tmp_path / "one", sigma=0.5)
    model, meta = models.load_checkpoint(tmp_path / "one" / "model.pt", "resnet20")
    assert meta["sigma"] == 0.5 and meta["epoch"] == 1
    assert meta["data_sha256"] == "ab" * 32
    assert summary["train_images"] == 64 and summary["epochs"] == 1
    for key in ("config_hash", "git_commit", "device", "wall_seconds", "profile"):
        assert key in summary


def test_resume_file_with_another_fingerprint_is_ignored(tiny_config, tiny_data, tmp_path, single_thread):
    straight, _ = _run(tiny_config, tiny_data, tmp_path / "straight")

    # a resume checkpoint written by a run at another σ (same recipe, same data): must not be used
    def crash_on_epoch_2(msg):
        if msg.startswith("epoch 2/2"):
            raise Interrupt

    out = tmp_path / "other"
    with pytest.raises(Interrupt):
        _run(tiny_config, tiny_data, out, sigma=1.0, log=crash_on_epoch_2)
    assert torch.load(out / "resume.pt", weights_only=True)["epoch"] == 1

    _, lines = _run(tiny_config, tiny_data, out, sigma=0.25)
    assert any(l.startswith("ignoring") and "starting afresh" in l for l in lines)
    assert any(l.startswith("epoch 1/2") for l in lines)
    _assert_same_weights(out / "model.pt", tmp_path / "straight" / "model.pt")
    assert len(_history(out / "train.csv")) == 2


def test_resume_file_from_another_recipe_is_ignored(tiny_config, tiny_data, tmp_path, single_thread):
    out = tmp_path / "x"
    out.mkdir()
    torch_save({"fingerprint": {"train_hash": "0" * 16, "sigma": 0.25, "data_sha256": "ab" * 32}, "epoch": 1,
                "state_dict": {}, "optimizer": {}, "scheduler": {}, "history": []}, out / "resume.pt")
    tiny_config["train"]["epochs"] = 1
    _, lines = _run(tiny_config, tiny_data, out)
    assert any(l.startswith("ignoring") for l in lines)
    assert len(_history(out / "train.csv")) == 1


@pytest.mark.parametrize("damage", ["truncated", "not a checkpoint"])
def test_a_corrupt_resume_file_is_set_aside_and_training_restarts(tiny_config, tiny_data, tmp_path, single_thread,
                                                                  damage):
    """A truncated model.resume.pt (killed mid-write by an older arq, a full disk) used to raise a raw
    traceback on every rerun; it is now kept as .corrupt, with a message, and the stage starts afresh."""
    straight, _ = _run(tiny_config, tiny_data, tmp_path / "straight")

    def crash_on_epoch_2(msg):
        if msg.startswith("epoch 2/2"):
            raise Interrupt

    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        _run(tiny_config, tiny_data, out, log=crash_on_epoch_2)
    resume = out / "resume.pt"
    blob = resume.read_bytes()
    resume.write_bytes(blob[: len(blob) // 2] if damage == "truncated" else b"{\"epoch\": 1}")
    _, lines = _run(tiny_config, tiny_data, out)
    assert any("aside" in l and "resume checkpoint" in l for l in lines), lines
    assert (out / "resume.pt.corrupt").exists()
    assert any(l.startswith("epoch 1/2") for l in lines)
    _assert_same_weights(out / "model.pt", tmp_path / "straight" / "model.pt")


def test_batchnorm_statistics_are_re_estimated_exactly_on_the_given_batches():
    """reestimate_bn replaces the running statistics (stale after a few QAT steps) by the exact average over the
    batches, whatever the momentum, and leaves the model in eval mode."""
    from torch import nn

    from arq.train import reestimate_bn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    model[1].running_mean.fill_(5.0)
    batches = [torch.randn(8, 3, 6, 6) + 1.0 for _ in range(3)]
    seen = reestimate_bn(model, batches)
    with torch.no_grad():
        acts = torch.cat([model[0](x) for x in batches])
    assert seen == 24 and not model.training and model[1].momentum == 0.1
    per_batch = torch.stack([model[0](x).detach().mean((0, 2, 3)) for x in batches])
    assert torch.allclose(model[1].running_mean, per_batch.mean(0), atol=1e-5)  # equal batches: the overall mean
    assert torch.allclose(model[1].running_mean, acts.mean((0, 2, 3)), atol=1e-5)


def test_a_diverging_run_stops_with_an_error_and_keeps_the_last_finite_epochs_resume_file(tiny_config, tiny_data,
                                                                                         tmp_path, single_thread):
    from arq.train import DivergedError

    tiny_config["train"]["lr"] = 1.0e12  # the loss overflows within the first epoch
    with pytest.raises(DivergedError, match=r"train: the loss became nan in epoch 1 \(learning rate 1e\+12"):
        _run(tiny_config, tiny_data, tmp_path / "nan")
    assert not (tmp_path / "nan" / "model.pt").exists() and not (tmp_path / "nan" / "resume.pt").exists()


def test_a_noise_finetune_starts_from_the_imported_weights_with_its_own_recipe(tiny_config, tiny_data, tmp_path,
                                                                              single_thread):
    from arq.config import ConfigError

    torch.manual_seed(3)
    start = models.build("resnet20")
    models.save_checkpoint(tmp_path / "imported.pt", start, "resnet20", sigma=0.25, method="fp32",
                           profile=tiny_config["profile"], imported={"path": "x.pth", "sha256": "cd" * 32,
                                                                     "format": "torchvision", "noise_trained": False})
    out = tmp_path / "tuned"
    with pytest.raises(ConfigError, match="needs pretrained.finetune"):
        train(tiny_config, 0.25, tiny_data, out / "model.pt", out / "resume.pt", out / "train.csv",
              out / "train.json", DEVICE, log=lambda *_: None, init=tmp_path / "imported.pt")
    tiny_config["pretrained"] = {"format": "torchvision", "checkpoints": {"0.25": "x.pth"},
                                 "finetune": {**tiny_config["train"], "epochs": 1, "lr": 1.0e-9}}
    summary = train(tiny_config, 0.25, tiny_data, out / "model.pt", out / "resume.pt", out / "train.csv",
                    out / "train.json", DEVICE, log=lambda *_: None, init=tmp_path / "imported.pt")
    tuned, meta = models.load_checkpoint(out / "model.pt", "resnet20")
    assert summary["epochs"] == 1 and summary["noise_finetune_of"]["imported"]["sha256"] == "cd" * 32
    assert meta["imported"]["format"] == "torchvision"
    for (k, a), b in zip(start.state_dict().items(), tuned.state_dict().values()):  # a tiny step from the start
        if a.is_floating_point() and "running" not in k:
            assert torch.allclose(a, b, atol=1e-6), k
