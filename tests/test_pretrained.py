"""Importing published base models (arq/pretrained.py): synthetic checkpoints in the published formats."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from arq import models, pretrained


class CohenNormalize(nn.Module):
    """Cohen et al.'s normalization layer as their released networks hold it: mean and sd as plain attributes
    (no state_dict keys), broadcast over the batch."""

    def __init__(self, means, sds):
        super().__init__()
        self.means, self.sds = torch.tensor(means), torch.tensor(sds)

    def forward(self, x):
        b, _, h, w = x.shape
        means = self.means.repeat((b, h, w, 1)).permute(0, 3, 1, 2)
        sds = self.sds.repeat((b, h, w, 1)).permute(0, 3, 1, 2)
        return (x - means) / sds


def _cohen_resnet50(path):
    torch.manual_seed(0)
    net = nn.Sequential(CohenNormalize(models.IMAGENET_MEAN, models.IMAGENET_STD),
                        nn.DataParallel(torchvision.models.resnet50(weights=None)))
    for m in net.modules():  # non-trivial batch-norm statistics, so eval mode differs from identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save({"epoch": 90, "arch": "resnet50", "state_dict": net.state_dict(), "optimizer": {}}, path)
    return net.eval()


def _config(arch):
    return {"profile": "imagenet-test", "model": {"arch": arch}}


def test_a_cohen_resnet50_imports_with_identical_logits(tmp_path):
    original = _cohen_resnet50(tmp_path / "noise_0.50.pth.tar")
    assert all(k.startswith("1.module.") for k in original.state_dict())
    meta = pretrained.run_import(_config("resnet50"), 0.5, tmp_path / "noise_0.50.pth.tar", "cohen",
                                 tmp_path / "model.pt", log=lambda *_: None)
    ours, saved = models.load_checkpoint(tmp_path / "model.pt", "resnet50")
    assert saved["sigma"] == 0.5 and saved["method"] == "fp32" and meta["imported"]["noise_trained"]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), original(x))


def test_a_torchvision_mobilenet_v2_from_data_parallel_imports_with_identical_logits(tmp_path):
    torch.manual_seed(1)
    tv = torchvision.models.mobilenet_v2(weights=None).eval()
    torch.save(nn.DataParallel(tv).state_dict(), tmp_path / "mnv2.pth")
    pretrained.run_import(_config("mobilenet_v2"), 0.25, tmp_path / "mnv2.pth", "torchvision", tmp_path / "m.pt",
                          log=lambda *_: None)
    ours, meta = models.load_checkpoint(tmp_path / "m.pt", "mobilenet_v2")
    assert meta["imported"]["format"] == "torchvision" and not meta["imported"]["noise_trained"]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        mean, std = torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(models.IMAGENET_STD).view(1, 3, 1, 1)
        assert torch.equal(ours.eval()(x), tv((x - mean) / std))


def test_weights_of_another_architecture_are_refused_naming_a_key(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(models.CheckpointError, match=r"does not fit resnet50: .*e\.g\. net\.layer"):
        pretrained.run_import(_config("resnet50"), 0.5, tmp_path / "r18.pth", "torchvision", tmp_path / "o.pt")
    assert not (tmp_path / "o.pt").exists()


def test_a_cohen_checkpoint_of_another_network_or_a_plain_file_in_cohen_format_is_refused(tmp_path):
    torch.save({"arch": "cifar_resnet110", "state_dict": {"1.conv1.weight": torch.zeros(1)}}, tmp_path / "c.pth")
    with pytest.raises(models.CheckpointError, match="'cifar_resnet110' checkpoint, not 'resnet50'"):
        pretrained.run_import(_config("resnet50"), 0.5, tmp_path / "c.pth", "cohen", tmp_path / "o.pt")
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "tv.pth")
    with pytest.raises(models.CheckpointError, match="is this a torchvision file"):
        pretrained.run_import(_config("resnet50"), 0.5, tmp_path / "tv.pth", "cohen", tmp_path / "o.pt")
    with pytest.raises(FileNotFoundError, match="published checkpoint not found"):
        pretrained.run_import(_config("resnet50"), 0.5, tmp_path / "absent.pth", "cohen", tmp_path / "o.pt")
