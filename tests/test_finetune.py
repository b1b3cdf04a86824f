"""Quantization-aware finetune (arq/train.py finetune): quantized checkpoint with its policy, refusals, PTQ,
and exact resumption after an interruption."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from arq import cost, models, policy, quant
from arq.config import load as load_config
from arq.models import CheckpointError
from arq.train import finetune

from conftest import REPO_ROOT

DEVICE = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("single_thread")


class Interrupt(Exception):
    pass


@pytest.fixture
def ft_config(smoke_config):
    cfg = smoke_config
    cfg["finetune"].update(epochs=2, batch_size=32, train_images=None, val_images=None)
    cfg["quant"]["calibration"]["images"] = 32
    return cfg


@pytest.fixture(scope="module")
def w4a4():
    """The uniform W4A4 policy of the smoke profile (resnet20, first and last layer pinned at 8 bits)."""
    cfg = load_config(REPO_ROOT / "config" / "smoke.yaml")
    costs = cost.for_arch("resnet20")
    rules = policy.rules_for("resnet20", costs, cfg["quant"])
    return policy.make(policy.uniform_layers(rules, 4, 4), costs, rules, "uniform W4A4")


def _base(path, sigma=0.25, seed=0):
    torch.manual_seed(seed)
    model = models.build("resnet20")
    models.save_checkpoint(path, model, "resnet20", sigma=sigma, epoch=1)
    return path


def _run(cfg, data, base, doc, out, sigma=0.25, log=None, method="uniform_w4a4_s0"):
    out.mkdir(parents=True, exist_ok=True)
    lines = []

    def record(msg):
        lines.append(msg)
        if log is not None:
            log(msg)

    summary = finetune(cfg, sigma, base, doc, data, out / "model.pt", out / "resume.pt", out / "ft.csv",
                       out / "ft.json", DEVICE, method, log=record)
    return summary, lines


def _history(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _state(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_finetune_writes_a_quantized_checkpoint_with_its_policy(ft_config, tiny_data, w4a4, tmp_path):
    ft_config["finetune"]["epochs"] = 1
    base = _base(tmp_path / "base.pt")
    summary, lines = _run(ft_config, tiny_data, base, w4a4, tmp_path / "ft")
    out = tmp_path / "ft"

    model, meta = models.load_checkpoint(out / "model.pt", "resnet20")
    assert meta["policy"] == w4a4
    assert meta["sigma"] == 0.25 and meta["method"] == "uniform_w4a4_s0" and meta["epoch"] == 1
    layers = quant.quantized_layers(model)
    assert set(layers) == set(w4a4["layers"]) and len(layers) == 22
    for name, layer in layers.items():
        assert (layer.w_bits, layer.a_bits) == (w4a4["layers"][name]["w_bits"], w4a4["layers"][name]["a_bits"])
        assert layer.act.calibrated
    assert layers["conv1"].w_bits == 8 and layers["layer1.0.conv1"].w_bits == 4
    with torch.inference_mode():
        logits = model.eval()(tiny_data.val.x[:4].float() / 255)
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()

    written = json.loads((out / "ft.json").read_text())
    assert written == summary
    assert summary["method"] == "uniform_w4a4_s0"
    assert summary["bitops_pct"] == w4a4["bitops_pct"]
    assert summary["epochs"] == 1 and summary["train_images"] == 64
    ranges = summary["activation_ranges"]
    assert set(ranges) == set(w4a4["layers"])
    assert ranges["conv1"]["signed"]  # normalized pixels go below zero
    assert not ranges["layer1.0.conv2"]["signed"]  # after a ReLU
    assert all(r["clip"] > 0 for r in ranges.values())
    for name, layer in layers.items():  # the saved ranges are the (learned) clips, same signedness
        assert layer.act.clip.item() == pytest.approx(ranges[name]["clip"], rel=0.5)
        assert layer.act.signed == ranges[name]["signed"]
    # QAT changed the weights of the base model
    base_state = _state(base)
    assert not torch.equal(model.state_dict()["layer1.0.conv1.weight"], base_state["layer1.0.conv1.weight"])
    assert len(_history(out / "ft.csv")) == 1
    assert not (out / "resume.pt").exists()
    assert any("after calibration" in l for l in lines)


def test_finetune_refuses_a_base_model_trained_at_another_sigma(ft_config, tiny_data, w4a4, tmp_path):
    base = _base(tmp_path / "base.pt", sigma=0.5)
    with pytest.raises(CheckpointError, match="σ=0.5"):
        _run(ft_config, tiny_data, base, w4a4, tmp_path / "ft", sigma=0.25)
    assert not (tmp_path / "ft" / "model.pt").exists()


def test_finetune_refuses_an_already_quantized_base(ft_config, tiny_data, w4a4, tmp_path):
    torch.manual_seed(0)
    model = quant.apply_policy(models.build("resnet20"), w4a4["layers"])
    quant.calibrate(model, [torch.rand(4, 3, 32, 32)])
    models.save_checkpoint(tmp_path / "q.pt", model, "resnet20", sigma=0.25, policy=w4a4)
    with pytest.raises(CheckpointError, match="already quantized"):
        _run(ft_config, tiny_data, tmp_path / "q.pt", w4a4, tmp_path / "ft")


def test_finetune_refuses_a_base_of_another_architecture(ft_config, tiny_data, w4a4, tmp_path):
    base = _base(tmp_path / "base.pt")
    ft_config["model"]["arch"] = "mobilenet_v2"
    with pytest.raises(CheckpointError, match="'resnet20' model, but 'mobilenet_v2' was expected"):
        _run(ft_config, tiny_data, base, w4a4, tmp_path / "ft")


def test_zero_epochs_is_post_training_quantization(ft_config, tiny_data, w4a4, tmp_path):
    ft_config["finetune"]["epochs"] = 0
    base = _base(tmp_path / "base.pt")
    summary, lines = _run(ft_config, tiny_data, base, w4a4, tmp_path / "ptq")
    out = tmp_path / "ptq"
    assert not any(l.startswith("epoch ") for l in lines)
    hist = _history(out / "ft.csv")
    assert len(hist) == 1 and hist[0]["epoch"] == "0"
    assert float(hist[0]["noisy_val_acc"]) == summary["final_noisy_val_acc"]
    assert summary["epochs"] == 0

    base_state, state = _state(base), _state(out / "model.pt")
    for key, value in base_state.items():  # the FP32 weights and BN statistics are untouched
        assert torch.equal(state[key], value), key
    model, meta = models.load_checkpoint(out / "model.pt")
    assert meta["policy"] == w4a4
    for name, layer in quant.quantized_layers(model).items():  # the clips are exactly the calibrated ranges
        assert layer.act.calibrated
        assert layer.act.clip.item() == summary["activation_ranges"][name]["clip"]
        assert layer.act.signed == summary["activation_ranges"][name]["signed"]


def test_interrupted_finetune_resumes_to_identical_weights(ft_config, tiny_data, w4a4, tmp_path):
    base = _base(tmp_path / "base.pt")
    straight, straight_log = _run(ft_config, tiny_data, base, w4a4, tmp_path / "straight")
    assert [l.split()[1] for l in straight_log if l.startswith("epoch")] == ["1/2", "2/2"]

    def crash_on_epoch_2(msg):
        if msg.startswith("epoch 2/2"):
            raise Interrupt

    out = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        _run(ft_config, tiny_data, base, w4a4, out, log=crash_on_epoch_2)
    assert torch.load(out / "resume.pt", weights_only=True)["epoch"] == 1
    assert len(_history(out / "ft.csv")) == 1
    assert not (out / "model.pt").exists()

    summary, lines = _run(ft_config, tiny_data, base, w4a4, out)
    assert any(l.startswith("resuming from") and "after epoch 1" in l for l in lines)
    assert not any(l.startswith("epoch 1/2") for l in lines)
    a, b = _state(out / "model.pt"), _state(tmp_path / "straight" / "model.pt")
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{k} differs"
        else:  # activation quantizers' extra state
            assert a[k] == b[k], k
    assert not (out / "resume.pt").exists()
    hist, ref = _history(out / "ft.csv"), _history(tmp_path / "straight" / "ft.csv")
    assert [r["epoch"] for r in hist] == ["1", "2"]
    for r, s in zip(hist, ref):
        for col in ("epoch", "lr", "loss", "train_acc", "noisy_val_acc"):
            assert r[col] == s[col], col
    assert float(hist[1]["lr"]) < float(hist[0]["lr"])  # the cosine schedule's state was restored
    assert summary["final_noisy_val_acc"] == straight["final_noisy_val_acc"]
    assert summary["activation_ranges"] == straight["activation_ranges"]


def test_resume_file_for_another_policy_is_ignored(ft_config, tiny_data, w4a4, tmp_path):
    base = _base(tmp_path / "base.pt")
    out = tmp_path / "ft"
    rules = policy.Rules("resnet20", tuple(w4a4["layers"]), pinned=w4a4["pinned"])
    w8a8 = {**w4a4, "layers": policy.uniform_layers(rules, 8, 8)}

    def crash_on_epoch_2(msg):
        if msg.startswith("epoch 2/2"):
            raise Interrupt

    with pytest.raises(Interrupt):  # same recipe, σ and data: only the policy differs
        _run(ft_config, tiny_data, base, w8a8, out, log=crash_on_epoch_2)
    assert torch.load(out / "resume.pt", weights_only=True)["epoch"] == 1
    _, lines = _run(ft_config, tiny_data, base, w4a4, out)
    assert any(l.startswith("ignoring") and "policy" in l for l in lines)
    assert any(l.startswith("epoch 1/2") for l in lines)
    model, meta = models.load_checkpoint(out / "model.pt")
    assert meta["policy"] == w4a4 and quant.quantized_layers(model)["layer1.0.conv1"].w_bits == 4


@pytest.mark.parametrize("mode", ["learned", "calibrated"])
def test_learned_clips_train_and_calibrated_clips_stay(ft_config, tiny_data, w4a4, tmp_path, mode):
    """With act_clip: learned, QAT moves the activation ranges away from their calibrated values (by a visible
    amount, well above float32 rounding); with calibrated they are exactly the calibration result."""
    ft_config["finetune"].update(epochs=1, lr=0.1)  # two SGD steps; a large lr makes their effect visible
    ft_config["quant"]["act_clip"] = mode
    summary, _ = _run(ft_config, tiny_data, _base(tmp_path / "base.pt"), w4a4, tmp_path / "ft")
    model, _ = models.load_checkpoint(tmp_path / "ft" / "model.pt", "resnet20")
    calibrated = {n: r["clip"] for n, r in summary["activation_ranges"].items()}
    final = {n: layer.act.clip.item() for n, layer in quant.quantized_layers(model).items()}
    rel = [abs(final[n] - calibrated[n]) / calibrated[n] for n in final]
    if mode == "learned":
        assert sum(r > 1e-6 for r in rel) >= len(rel) // 2  # float32 resolution is ~6e-8
    else:
        assert max(rel) < 1e-6


def test_the_finetune_logs_accuracy_on_a_class_balanced_val_set(ft_config, w4a4, tmp_path, monkeypatch):
    """The val split is kept in class order; the finetune's logged val accuracy used to be of its head (one or two
    classes). It now takes finetune.val_images balanced over the classes."""
    from arq import train
    from arq.data import Prepared, Split

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (104, 3, 32, 32), dtype=torch.uint8, generator=g)
    val_y = torch.arange(10).repeat_interleave(4)  # class-sorted, 4 per class
    data = Prepared(train=Split(x[:64], torch.randint(0, 10, (64,), generator=g)), val=Split(x[64:], val_y),
                    cert=Split(x[:4], val_y[:4]), cert_idx=torch.arange(4), manifest={"file_sha256": "ab" * 32})
    seen = []
    real = train.noisy_accuracy
    monkeypatch.setattr(train, "noisy_accuracy", lambda model, split, *a: seen.append(split.y.clone()) or
                        real(model, split, *a))
    ft_config["finetune"].update(epochs=0, val_images=20)
    _run(ft_config, data, _base(tmp_path / "base.pt"), w4a4, tmp_path / "ft")
    assert seen and all(torch.bincount(y, minlength=10).tolist() == [2] * 10 for y in seen)


def test_a_reused_base_from_an_older_config_is_traced_to_that_config(ft_config, tiny_data, w4a4, tmp_path):
    """The workflow reuses an FP32 base across config edits that do not touch training; the finetune then records
    the base's config hash beside its own instead of claiming the base came from the config now running."""
    from arq.config import config_hash

    ft_config["finetune"]["epochs"] = 0
    torch.manual_seed(0)
    base = tmp_path / "base.pt"
    models.save_checkpoint(base, models.build("resnet20"), "resnet20", sigma=0.25, epoch=1, profile="smoke",
                           config_hash="0123456789abcdef")
    summary, _ = _run(ft_config, tiny_data, base, dict(w4a4, config_hash="fedcba9876543210"), tmp_path / "ft")
    assert summary["config_hash"] == config_hash(ft_config) != "0123456789abcdef"
    assert summary["upstream"]["model"] == {"source": str(base), "config_hash": "0123456789abcdef"}
    assert summary["upstream"]["policy"] == {"source": "uniform W4A4", "config_hash": "fedcba9876543210"}
