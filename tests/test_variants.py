"""Quantization-robust base variants (arq/variants): SymReg, SatNL, (A)SAM, their training and their checkpoints."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from arq import config as arq_config
from arq import layout, models
from arq.variants import BASES, objective, sam, satnl, settings, symreg, variant


# ------------------------------------------------------------------------------------------------------- SymReg

@pytest.mark.parametrize("pairing", [1, 2])
@pytest.mark.parametrize("n", [6, 7, 9, 64, 2304])
def test_symreg_is_zero_for_a_symmetric_tensor_and_positive_otherwise(pairing, n):
    g = torch.Generator().manual_seed(n)
    half = torch.rand(n // 2, generator=g) + 0.01
    values = torch.cat([half, -half] + ([torch.zeros(1)] if n % 2 else []))
    w = values[torch.randperm(n, generator=g)].view(-1)  # the order of the weights does not matter
    assert symreg.asymmetry(w, pairing) == pytest.approx(0.0, abs=1e-12)
    skewed = w.clone()
    skewed[skewed > 0] *= 1.5
    assert symreg.asymmetry(skewed, pairing) > 1e-4
    assert symreg.asymmetry(w + 0.05, pairing) > 1e-4  # a shifted distribution is not symmetric about zero


def test_symreg_pairings_on_a_hand_computed_case():
    w = torch.tensor([-3.0, -1.0, 0.5, 2.0])  # sorted; mirror sums -3+2, -1+0.5 → 1 + 0.25 over 4
    assert float(symreg.asymmetry(w, 1)) == pytest.approx((1.0 + 0.25) * 2 / 4)
    assert float(symreg.asymmetry(w, 2)) == pytest.approx(((-4.0) + 2.5) ** 2 / 4)


@pytest.mark.parametrize("pairing", [1, 2])
def test_symreg_gradient_moves_an_asymmetric_tensor_toward_symmetry(pairing):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(512, generator=g).abs() ** 1.5 - 0.3).requires_grad_(True)  # skewed
    before = float(symreg.asymmetry(w.detach(), pairing))
    opt = torch.optim.SGD([w], lr=50.0)
    for _ in range(20):
        opt.zero_grad()
        symreg.asymmetry(w, pairing).backward()
        opt.step()
    assert float(symreg.asymmetry(w.detach(), pairing)) < 0.1 * before


def test_symreg_exempts_depthwise_convolutions_only():
    net = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, groups=4),
                        nn.Flatten(), nn.Linear(16, 4))
    names = [name for name, _ in symreg.regular_layers(net)]
    assert names == ["1", "2", "4"]  # the depthwise 8→8 conv is exempt; a grouped (not depthwise) one is not
    depthwise = net[0].weight
    with torch.no_grad():
        depthwise.add_(5.0)  # however asymmetric, it does not count
    before = float(symreg.penalty(net).detach())
    with torch.no_grad():
        depthwise.add_(5.0)
    assert float(symreg.penalty(net).detach()) == before


def test_symreg_refuses_an_unknown_pairing():
    with pytest.raises(ValueError, match="pairing"):
        symreg.asymmetry(torch.ones(4), 3)


# ------------------------------------------------------------------------------------------------------- SatNL

@pytest.mark.parametrize("scale", ["channel", "layer"])
def test_satnl_starts_at_the_initial_weights_and_bounds_them(scale):
    torch.manual_seed(0)
    net = models.build("resnet20")
    w0 = {n: m.weight.detach().clone() for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    names = satnl.attach(net, scale, headroom=1.5)
    assert set(names) == set(w0)
    for n, m in net.named_modules():
        if n in w0:
            assert torch.allclose(m.weight, w0[n], atol=1e-5)
    with torch.no_grad():  # latents far into saturation, as large updates would drive them
        for m in satnl.attached(net):
            m.parametrizations.weight.original.mul_(500.0)
    for name, (w_max, alpha_max) in satnl.bounds(net).items():
        assert w_max <= alpha_max + 1e-6, name
    for n, m in net.named_modules():
        if n in w0:
            sat = m.parametrizations.weight[0]
            bound = sat.alpha.expand_as(m.weight) if scale == "channel" else sat.alpha
            assert bool((m.weight.abs() <= bound + 1e-6).all()), n


def test_satnl_export_gives_an_ordinary_network_with_the_same_logits(tmp_path):
    torch.manual_seed(1)
    net = models.build("resnet20")
    satnl.attach(net, "channel", 1.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x = torch.rand(8, 3, 32, 32)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), torch.arange(8) % 10).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        before = net(x)
    satnl.export(net)
    assert not satnl.attached(net)
    assert set(net.state_dict()) == set(models.build("resnet20").state_dict())  # ordinary keys only
    models.save_checkpoint(tmp_path / "m.pt", net, "resnet20", sigma=0.25, method="fp32_satnl")
    loaded, meta = models.load_checkpoint(tmp_path / "m.pt", "resnet20")
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), before)
    assert meta["method"] == "fp32_satnl"


def test_satnl_refuses_a_bound_below_the_initial_weights():
    with pytest.raises(ValueError, match="headroom"):
        satnl.attach(models.build("resnet20"), "channel", 1.0)


# -------------------------------------------------------------------------------------------------------- (A)SAM

@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_steps_with_the_gradient_at_the_perturbed_point(adaptive):
    """On f(w) = Σ w⁴/4 the SAM step is w − lr·∇f(w + e), e = ρ·g/‖g‖ (SAM) or ρ·w²g/‖|w|g‖ (ASAM)."""
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = torch.optim.SGD([w], lr=0.1)
    w0 = w.detach().clone()
    g = w0 ** 3
    e = 0.05 * (w0.abs() ** 2 * g / torch.linalg.vector_norm(w0.abs() * g) if adaptive
                else g / torch.linalg.vector_norm(g))
    expected = w0 - 0.1 * (w0 + e) ** 3

    def closure():
        loss = (w ** 4).sum() / 4
        loss.backward()
        return loss

    loss = sam.step([w], closure, opt, rho=0.05, adaptive=adaptive)
    assert float(loss.detach()) == pytest.approx(float((w0 ** 4).sum() / 4))
    assert torch.allclose(w.detach(), expected, atol=1e-6)


# ---------------------------------------------------------------------------------------- variants and training

def test_variant_names_and_settings(smoke_config):
    assert BASES == ("fp32", "fp32_symreg", "fp32_satnl", "fp32_symreg_satnl")
    assert variant("fp32_symreg_satnl").symreg and variant("fp32_symreg_satnl").satnl
    assert variant("fp32_symreg_satnl").suffix == "_symreg_satnl" and variant("fp32").suffix == ""
    with pytest.raises(ValueError, match="unknown base variant"):
        variant("fp32_kure")
    assert objective(smoke_config, "fp32") is None
    s = settings(smoke_config, "fp32_symreg")
    assert s["symreg"] == smoke_config["robust_base"]["symreg"] and s["satnl"] is None and s["sam"] is None


def _tiny(smoke_config, base: str, **robust) -> dict:
    cfg = copy.deepcopy(smoke_config)
    cfg["train"].update(epochs=2, train_images=64, val_images=20, batch_size=32, lr_milestones=[1])
    cfg["robust_base"].update(bases=["fp32", base], **robust)
    return arq_config.validate(cfg)


@pytest.mark.parametrize("base", ["fp32_symreg", "fp32_satnl", "fp32_symreg_satnl"])
def test_a_variant_trains_from_the_plain_initial_weights_and_exports_a_plain_checkpoint(tmp_path, smoke_config,
                                                                                        tiny_data, base):
    from arq.train import train

    cfg = _tiny(smoke_config, base, sam={"rho": 0.05, "adaptive": True})
    out = tmp_path / base
    s = train(cfg, 0.25, tiny_data, out / "model.pt", out / "resume.pt", out / "train.csv", out / "train.json",
              torch.device("cpu"), log=lambda *_: None, base=base)
    model, meta = models.load_checkpoint(out / "model.pt", "resnet20")
    assert meta["method"] == base and s["base"] == base
    assert set(model.state_dict()) == set(models.build("resnet20").state_dict())
    assert "penalty" in (out / "train.csv").read_text().splitlines()[0]
    assert set(s["asymmetry"]) == {n for n, _ in symreg.regular_layers(model)}
    if variant(base).satnl:
        assert all(w <= a + 1e-6 for w, a in s["satnl_bounds"].values())


def test_symreg_training_makes_the_weights_more_symmetric(tmp_path, smoke_config, tiny_data):
    from arq.train import train

    out = {}
    for base in ("fp32", "fp32_symreg"):
        cfg = _tiny(smoke_config, "fp32_symreg", symreg={"weight": 1.0e4, "pairing": 1})
        train(cfg, 0.25, tiny_data, tmp_path / base / "m.pt", tmp_path / base / "r.pt", tmp_path / base / "t.csv",
              tmp_path / base / "t.json", torch.device("cpu"), log=lambda *_: None, base=base)
        out[base] = float(symreg.penalty(models.load_checkpoint(tmp_path / base / "m.pt")[0]).detach())
    assert out["fp32_symreg"] < 0.5 * out["fp32"]


def test_a_variant_checkpoint_is_refused_where_another_is_expected(tmp_path, smoke_config):
    cfg = copy.deepcopy(smoke_config)
    net = models.build("resnet20")
    models.save_checkpoint(tmp_path / "m.pt", net, "resnet20", sigma=0.25, method="fp32_symreg",
                           profile=cfg["profile"])
    models.load_for_stage(tmp_path / "m.pt", cfg, 0.25, "fp32_symreg")
    for expected in ("fp32", "fp32_satnl"):
        with pytest.raises(models.CheckpointError, match=f"holds the model 'fp32_symreg', but this stage is for "
                                                         f"'{expected}'"):
            models.load_for_stage(tmp_path / "m.pt", cfg, 0.25, expected)


def test_a_finetune_from_the_wrong_base_is_refused(tmp_path, smoke_config, tiny_data):
    from arq import policy
    from arq.train import finetune

    cfg = copy.deepcopy(smoke_config)
    models.save_checkpoint(tmp_path / "m.pt", models.build("resnet20"), "resnet20", sigma=0.25, method="fp32",
                           profile=cfg["profile"])
    doc = policy.uniform_policy(cfg, "W4A4")
    with pytest.raises(models.CheckpointError, match="but this stage is for 'fp32_satnl'"):
        finetune(cfg, 0.25, tmp_path / "m.pt", doc, tiny_data, tmp_path / "q.pt", tmp_path / "r.pt",
                 tmp_path / "q.csv", tmp_path / "q.json", torch.device("cpu"), "uniform_w4a4_satnl_s0",
                 log=lambda *_: None)


# ------------------------------------------------------------------------------------------ profile and layout

def test_arms_must_be_methods_of_the_profile_and_need_a_robust_base(smoke_config, tmp_path):
    cfg = copy.deepcopy(smoke_config)
    cfg["robust_base"]["arms"] = ["uniform_w4a4"]
    with pytest.raises(arq_config.ConfigError, match="robust_base.arms: robust_base.bases lists no robust base"):
        layout.check(arq_config.validate(cfg))
    cfg["robust_base"]["bases"] = ["fp32", "fp32_satnl"]
    layout.check(arq_config.validate(cfg))
    cfg["robust_base"]["arms"] = ["uniform_w4a4", "arq_b0.3"]
    with pytest.raises(arq_config.ConfigError, match="robust_base.arms.1: arq_b0.3 is not a method"):
        layout.check(arq_config.validate(cfg))
    # arq check-config runs the same check
    import yaml

    from arq.cli import main

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["check-config", str(path)]) == 2
    cfg["robust_base"]["bases"] = ["fp32_satnl"]
    with pytest.raises(arq_config.ConfigError, match="robust_base.bases"):
        arq_config.validate(cfg)


def test_robust_arms_are_models_of_their_own_with_the_arm_s_seeds(smoke_config):
    cfg = copy.deepcopy(smoke_config)
    cfg["search"].update(seeds=[0, 1], budgets=[1.0, 0.7], seeds_by_budget={"0.7": [0]})
    cfg["robust_base"].update(bases=["fp32", "fp32_symreg", "fp32_symreg_satnl"],
                              arms=["uniform_w3a3", "hawq_b1.0", "arq_b0.7"])
    layout.check(arq_config.validate(cfg))
    arms = layout.arms(cfg)
    assert arms == [f"{m}_{tag}_s{s}" for tag in ("symreg", "symreg_satnl")
                    for m, seeds in (("uniform_w3a3", (0, 1)), ("hawq_b1.0", (0, 1)), ("arq_b0.7", (0,)))
                    for s in seeds]
    methods = layout.methods(cfg)
    assert methods[-len(arms) - 2:] == ["fp32_symreg", "fp32_symreg_satnl"] + arms
    assert "arq_b0.7_symreg_s0" in layout.searched(cfg) and "hawq_b1.0_symreg_s0" not in layout.searched(cfg)
    # the uniform policy is the base's business of nobody: one file; HAWQ's and a search's are per base
    assert layout.policy_name("uniform_w3a3_symreg_s1", "0.25") == "uniform_w3a3.json"
    assert layout.policy_name("hawq_b1.0_symreg_s1", "0.25") == "hawq_b1.0_symreg_sigma0.25.json"
    assert layout.cache_file(cfg, "fp32_symreg", "0.25").endswith("irs/cache_symreg_sigma0.25.pt")
    assert layout.cache_file(cfg, "fp32", "0.25").endswith("irs/cache_sigma0.25.pt")
    binaries = layout.binaries(cfg)
    assert any(b.endswith("models/fp32_symreg_satnl_sigma0.25/model.pt") for b in binaries)
    assert any(b.endswith("irs/cache_symreg_satnl_sigma0.25.pt") for b in binaries)
