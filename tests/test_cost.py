"""Exact cost model (arq/cost.py): traced MACs against hand counts, BitOps, and whole-network totals."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from arq import cost, policy, quant

pytestmark = pytest.mark.usefixtures("single_thread")


def _only(module: nn.Module, input_shape) -> cost.LayerCost:
    costs = cost.trace(nn.Sequential(module), input_shape)
    assert len(costs) == 1
    return costs[0]


# ----------------------------------------------------------------------------------- hand-counted layers

@pytest.mark.parametrize("layer,input_shape,macs,kind,out_shape", [
    # 10×10 outputs × 8 filters × (3 in-channels × 3 × 3)
    (nn.Conv2d(3, 8, 3, stride=1, padding=1), (3, 10, 10), 10 * 10 * 8 * 3 * 3 * 3, "conv", (8, 10, 10)),
    # stride 2: 5×5 outputs
    (nn.Conv2d(3, 8, 3, stride=2, padding=1), (3, 10, 10), 5 * 5 * 8 * 3 * 3 * 3, "conv", (8, 5, 5)),
    # no padding: 8×8 outputs
    (nn.Conv2d(3, 8, 3), (3, 10, 10), 8 * 8 * 8 * 3 * 3 * 3, "conv", (8, 8, 8)),
    # depthwise: each output channel sees one input channel
    (nn.Conv2d(8, 8, 3, padding=1, groups=8), (8, 10, 10), 10 * 10 * 8 * 1 * 3 * 3, "depthwise", (8, 10, 10)),
    # grouped: 4 groups, each output channel sees 8/4 input channels
    (nn.Conv2d(8, 16, 3, padding=1, groups=4), (8, 10, 10), 10 * 10 * 16 * 2 * 3 * 3, "grouped", (16, 10, 10)),
    # channel multiplier 2 with groups = in_channels is grouped, not depthwise
    (nn.Conv2d(4, 8, 3, padding=1, groups=4), (4, 6, 6), 6 * 6 * 8 * 1 * 3 * 3, "grouped", (8, 6, 6)),
    # rectangular kernel and stride: out (8+2-3)//2+1 = 4 rows, 6 columns
    (nn.Conv2d(2, 4, (3, 1), stride=(2, 1), padding=(1, 0)), (2, 8, 6), 4 * 6 * 4 * 2 * 3 * 1, "conv", (4, 4, 6)),
    # 1×1 strided projection
    (nn.Conv2d(16, 32, 1, stride=2, bias=False), (16, 16, 16), 8 * 8 * 32 * 16, "conv", (32, 8, 8)),
    (nn.Linear(20, 5), (20,), 100, "linear", (5,)),
    # linear applied to every position of a sequence
    (nn.Linear(20, 5), (7, 20), 7 * 100, "linear", (7, 5)),
])
def test_macs_of_single_layers(layer, input_shape, macs, kind, out_shape):
    c = _only(layer, input_shape)
    assert c.name == "0"
    assert c.macs == macs
    assert c.kind == kind
    assert c.in_shape == tuple(input_shape) and c.out_shape == out_shape
    assert c.weights == layer.weight.numel()
    assert c.out_channels == layer.weight.shape[0]
    if isinstance(layer, nn.Conv2d):
        assert (c.in_channels, c.groups, c.stride, c.kernel) == (layer.in_channels, layer.groups, layer.stride[0],
                                                                 layer.kernel_size[0])
    else:
        assert (c.in_channels, c.groups, c.stride, c.kernel) == (20, 1, 1, 1)


class _Shared(nn.Module):
    """One linear layer called twice (shared weights), then a head."""

    def __init__(self):
        super().__init__()
        self.block = nn.Linear(10, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        return self.head(torch.relu(self.block(torch.relu(self.block(x)))))


def test_a_layer_called_twice_is_listed_once_with_both_calls_counted():
    costs = cost.trace(_Shared(), (10,))
    assert [c.name for c in costs] == ["block", "head"]
    assert costs[0].macs == 2 * 10 * 10
    assert costs[0].weights == 100  # the weights are stored once
    assert cost.total_macs(costs) == 200 + 30


class _Reordered(nn.Module):
    """Layers defined in one order and called in another."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(2 * 4 * 4, 3)
        self.late = nn.Conv2d(4, 2, 1)
        self.early = nn.Conv2d(3, 4, 3, padding=1, stride=2)

    def forward(self, x):
        return self.head(torch.flatten(self.late(self.early(x)), 1))


def test_layers_are_listed_in_call_order_not_definition_order():
    model = _Reordered()
    assert quant.quantizable_layers(model) == ["head", "late", "early"]
    costs = cost.trace(model, (3, 8, 8))
    assert [c.name for c in costs] == ["early", "late", "head"]
    assert [c.macs for c in costs] == [4 * 4 * 4 * 3 * 9, 4 * 4 * 2 * 4, 3 * 32]


def test_trace_restores_training_mode_and_ignores_unused_layers():
    model = _Reordered()
    model.unused = nn.Linear(3, 3)
    model.train()
    costs = cost.trace(model, (3, 8, 8))
    assert model.training
    assert "unused" not in [c.name for c in costs]


def test_trace_of_a_quantized_uncalibrated_model_equals_the_fp32_trace():
    """The cost of a policy's model is traced before calibration; the trace must not calibrate it."""
    fp = _Reordered()
    q = quant.apply_policy(_Reordered(), {n: {"w_bits": 4, "a_bits": 4} for n in ("head", "late", "early")})
    assert cost.trace(q, (3, 8, 8)) == cost.trace(fp, (3, 8, 8))
    for layer in quant.quantized_layers(q).values():
        assert not layer.act.calibrated and layer.act._observed is None
    with pytest.raises(RuntimeError, match="calibrat"):
        q(torch.zeros(1, 3, 8, 8))


# ------------------------------------------------------------------------------------------------ BitOps

def test_bitops_weight_bits_and_summary_by_hand():
    costs = cost.trace(_Reordered(), (3, 8, 8))
    macs = {"early": 1728, "late": 128, "head": 96}
    weights = {"early": 4 * 3 * 9, "late": 2 * 4, "head": 3 * 32}
    assert {c.name: c.macs for c in costs} == macs
    bits = {"early": {"w_bits": 8, "a_bits": 8}, "late": {"w_bits": 2, "a_bits": 5}, "head": {"w_bits": 4, "a_bits": 3}}
    expected = 1728 * 64 + 128 * 10 + 96 * 12
    total = 1728 + 128 + 96
    assert cost.bitops(costs, bits) == expected
    assert cost.fp32_bitops(costs) == total * 32 * 32
    assert cost.bitops_pct(costs, bits) == pytest.approx(100 * expected / (total * 1024), rel=1e-12)
    assert cost.weight_bits(costs, bits) == weights["early"] * 8 + weights["late"] * 2 + weights["head"] * 4
    s = cost.summary(costs, bits)
    assert set(s) == set(cost.SUMMARY_FIELDS)
    assert s["macs"] == total and s["bitops"] == expected and s["fp32_bitops"] == total * 1024
    assert s["fp32_weight_bits"] == sum(weights.values()) * 32
    assert s["bitops_pct"] == round(100 * expected / (total * 1024), 6)


def test_bitops_needs_bits_for_every_traced_layer():
    costs = cost.trace(_Reordered(), (3, 8, 8))
    with pytest.raises(KeyError):
        cost.bitops(costs, {"early": {"w_bits": 4, "a_bits": 4}, "late": {"w_bits": 4, "a_bits": 4}})


# ------------------------------------------------------------------------------------ whole architectures

@pytest.fixture(scope="module")
def resnet20_costs():
    return cost.for_arch("resnet20")


def _conv_macs(c_in, c_out, k, out_hw):
    return out_hw * out_hw * c_out * c_in * k * k


def test_resnet20_macs_match_the_analytic_count(resnet20_costs):
    conv1 = _conv_macs(3, 16, 3, 32)
    stage1 = 6 * _conv_macs(16, 16, 3, 32)
    stage2 = _conv_macs(16, 32, 3, 16) + 5 * _conv_macs(32, 32, 3, 16)
    stage3 = _conv_macs(32, 64, 3, 8) + 5 * _conv_macs(64, 64, 3, 8)
    fc = 64 * 10
    assert (conv1, stage1, stage2, stage3) == (442_368, 6 * 2_359_296, 1_179_648 + 5 * 2_359_296,
                                               1_179_648 + 5 * 2_359_296)
    assert conv1 + stage1 + stage2 + stage3 == 40_550_400  # the 19 3×3 convolutions
    standard = conv1 + stage1 + stage2 + stage3 + fc
    assert standard == 40_551_040  # standard ResNet-20, conv + fc
    projections = _conv_macs(16, 32, 1, 16) + _conv_macs(32, 64, 1, 8)
    assert projections == 2 * 131_072
    assert cost.total_macs(resnet20_costs) == standard + projections == 40_813_184
    assert len(resnet20_costs) == 19 + 2 + 1
    assert resnet20_costs[0].name == "conv1" and resnet20_costs[-1].name == "fc"
    by_name = {c.name: c for c in resnet20_costs}
    assert by_name["layer2.0.shortcut.0"].macs == 131_072 and by_name["layer3.0.shortcut.0"].macs == 131_072
    assert by_name["fc"].macs == 640 and by_name["fc"].kind == "linear"
    assert {c.kind for c in resnet20_costs} == {"conv", "linear"}


def test_resnet50_macs():
    costs = cost.for_arch("resnet50")
    assert len(costs) == 54  # 53 convolutions (4 projections) + fc
    assert cost.total_macs(costs) == pytest.approx(4.089e9, rel=0.01)
    assert costs[0].name == "net.conv1" and costs[0].macs == 112 * 112 * 64 * 3 * 7 * 7
    assert costs[-1].name == "net.fc" and costs[-1].macs == 2048 * 1000


def test_mobilenet_v2_macs_and_depthwise_layers():
    costs = cost.for_arch("mobilenet_v2")
    assert cost.total_macs(costs) == pytest.approx(300.77e6, rel=0.01)
    depthwise = [c for c in costs if c.kind == "depthwise"]
    assert len(depthwise) == 17
    for c in depthwise:
        assert c.groups == c.in_channels == c.out_channels and c.kernel == 3
        assert c.macs == c.out_channels * c.out_shape[1] * c.out_shape[2] * 9
    assert costs[-1].name == "net.classifier.1" and costs[-1].macs == 1280 * 1000


# ------------------------------------------------------------------------------------------ uniform costs

def _rules(costs, pin: bool) -> policy.Rules:
    return policy.rules_for("resnet20", costs, {"min_bits": 2, "max_bits": 8, "pin_first_last": pin,
                                                "pinned_bits": 8})


@pytest.mark.parametrize("bits,fraction", [(4, 64), (8, 16), (2, 256)])
def test_uniform_bits_cost_an_exact_fraction_of_fp32(resnet20_costs, bits, fraction):
    rules = _rules(resnet20_costs, pin=True)
    layers = policy.uniform_layers(rules, bits, bits)
    free = [c for c in resnet20_costs if c.name not in rules.pinned]
    assert len(free) == len(resnet20_costs) - 2
    free_bitops = sum(c.macs * layers[c.name]["w_bits"] * layers[c.name]["a_bits"] for c in free)
    free_macs = sum(c.macs for c in free)
    assert free_bitops * fraction == free_macs * 1024
    # without pinning the whole network costs exactly that fraction
    unpinned = policy.uniform_layers(_rules(resnet20_costs, pin=False), bits, bits)
    assert cost.bitops(resnet20_costs, unpinned) * fraction == cost.fp32_bitops(resnet20_costs)
    assert cost.bitops_pct(resnet20_costs, unpinned) == pytest.approx(100 / fraction, rel=1e-12)


def test_resnet20_w4a4_with_pinned_first_and_last_layer(smoke_config, resnet20_costs):
    assert smoke_config["quant"]["pin_first_last"] and smoke_config["quant"]["pinned_bits"] == 8
    doc = policy.uniform_policy(smoke_config, "W4A4")
    assert doc["layers"]["conv1"] == {"w_bits": 8, "a_bits": 8}
    assert doc["layers"]["fc"] == {"w_bits": 8, "a_bits": 8}
    assert doc["pinned"] == {"conv1": 8, "fc": 8}
    assert all(v == {"w_bits": 4, "a_bits": 4} for k, v in doc["layers"].items() if k not in ("conv1", "fc"))
    pinned_macs = 442_368 + 640
    expected = pinned_macs * 64 + (40_813_184 - pinned_macs) * 16
    assert doc["bitops"] == expected
    assert doc["fp32_bitops"] == 40_813_184 * 1024
    assert doc["bitops_pct"] == pytest.approx(100 * expected / (40_813_184 * 1024), abs=1e-6)
    assert doc["bitops_pct"] == pytest.approx(1.613, abs=5e-4)
    assert doc["macs"] == cost.total_macs(resnet20_costs)
