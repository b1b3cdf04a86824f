"""ResNet-20 with built-in normalization, and architecture-checked checkpoints (arq/models.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from arq import models
from arq.models import CIFAR10_MEAN, CIFAR10_STD, CheckpointError, load_checkpoint, save_checkpoint


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = models.build("resnet20")
    # non-trivial batch-norm statistics, so that eval mode differs from a freshly built model
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.1, 0.1)
    return m.eval()


def test_resnet20_size_and_output(model):
    params = sum(p.numel() for p in model.parameters())
    assert 260_000 < params < 280_000
    assert params == 272_474
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 20  # 19 3×3 convolutions + the classifier = 20 weighted layers
    out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_unknown_architecture_and_bad_depth():
    with pytest.raises(ValueError, match="unknown architecture"):
        models.build("resnet1000")
    with pytest.raises(ValueError, match="6n\\+2"):
        models.ResNetCifar(depth=21)


def test_normalize_buffers_hold_the_cifar10_statistics(model):
    assert model.normalize.mean.flatten().tolist() == pytest.approx(CIFAR10_MEAN)
    assert model.normalize.std.flatten().tolist() == pytest.approx(CIFAR10_STD)
    # buffers, not parameters: saved with the weights but never trained
    names = dict(model.named_buffers())
    assert "normalize.mean" in names and "normalize.std" in names
    assert not any(n.startswith("normalize") for n, _ in model.named_parameters())


def test_normalization_is_the_first_operation(model):
    order = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: order.append(name))
             for name, m in model.named_modules() if name and not list(m.children())]
    x = torch.rand(3, 3, 32, 32)
    out = model(x)
    for h in hooks:
        h.remove()
    assert order[0] == "normalize"
    assert order[1] == "conv1"
    # the model on [0,1] pixels equals the same network without its Normalize fed normalized pixels
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    model.normalize = nn.Identity()
    torch.testing.assert_close(model((x - mean) / std), out, rtol=1e-5, atol=1e-5)
    # and differs from feeding raw pixels to it, i.e. the normalization really is applied
    assert not torch.allclose(model(x), out, atol=1e-3)


def test_checkpoint_round_trip(model, tmp_path):
    path = tmp_path / "ck" / "model.pt"
    save_checkpoint(path, model, "resnet20", sigma=0.25, epoch=3)
    loaded, meta = load_checkpoint(path, "resnet20")
    assert meta == {"arch": "resnet20", "sigma": 0.25, "epoch": 3}
    loaded.eval()
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    for (ka, a), (kb, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    # arch=None accepts whatever the checkpoint says
    again, _ = load_checkpoint(path)
    assert torch.equal(again.eval()(x), model(x))
    assert not list(tmp_path.glob("ck/.*.tmp"))  # atomic write left no temporary file


def test_checkpoint_for_another_arch_names_both(model, tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, "resnet20")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, "other")
    assert "'resnet20'" in str(exc.value) and "'other'" in str(exc.value)
    assert str(path) in str(exc.value)


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "absent.pt"
    with pytest.raises(CheckpointError, match="not found") as exc:
        load_checkpoint(path, "resnet20")
    assert str(path) in str(exc.value)


def test_unreadable_and_foreign_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a torch file")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(junk, "resnet20")
    bare = tmp_path / "bare.pt"
    torch.save(models.build("resnet20").state_dict(), bare)  # a plain state_dict, no 'arch'
    with pytest.raises(CheckpointError, match="not an arq checkpoint"):
        load_checkpoint(bare, "resnet20")
    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    with pytest.raises(CheckpointError, match="not an arq checkpoint"):
        load_checkpoint(listed)


def test_weights_that_do_not_fit(model, tmp_path):
    sd = model.state_dict()
    sd["fc.weight"] = torch.zeros(5, 64)  # 5 classes instead of 10
    path = tmp_path / "wrong.pt"
    torch.save({"arch": "resnet20", "state_dict": sd}, path)
    with pytest.raises(CheckpointError, match="do not fit") as exc:
        load_checkpoint(path, "resnet20")
    assert "fc.weight" in str(exc.value)
    missing = tmp_path / "missing_keys.pt"
    sd = model.state_dict()
    del sd["layer3.2.conv2.weight"]
    torch.save({"arch": "resnet20", "state_dict": sd}, missing)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(missing, "resnet20")
