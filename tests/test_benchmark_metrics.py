"""benchmarks/certify.py: the speedup arithmetic (IRS vs full re-certification) on hand-made curves, and the
modified networks it compares."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import pytest
import torch

from arq import models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from certify import add_sample_metrics, area_ratio, fastest, model_tags, modified_copy, time_to_reach  # noqa: E402

BASE = [(10.0, 0.20), (20.0, 0.30), (40.0, 0.40)]  # (seconds, ACR)


def test_time_to_reach_interpolates_inside_the_curve():
    assert time_to_reach(0.25, BASE) == pytest.approx(15.0)
    assert time_to_reach(0.40, BASE) == pytest.approx(40.0)


def test_time_to_reach_refuses_to_extrapolate():
    assert time_to_reach(0.41, BASE) is None  # the baseline never gets there
    assert time_to_reach(0.10, BASE) is None  # its cheapest point already does better: no speedup to claim
    assert time_to_reach(0.20, BASE) is None  # reached by the cheapest point, maybe with less: only a bound
    assert time_to_reach(0.0, [(5.0, 0.0), (9.0, 0.1)]) is None  # ACR 0 (all abstain) costs nothing


def test_time_to_reach_uses_the_running_best_acr():
    noisy = [(10.0, 0.20), (20.0, 0.35), (40.0, 0.30), (80.0, 0.40)]  # a dip from sampling noise
    assert time_to_reach(0.32, noisy) == pytest.approx(10 + 10 * 0.12 / 0.15)


def test_area_ratio_of_a_curve_twice_as_fast_is_two():
    fast = [(t / 2, a) for t, a in BASE]
    assert area_ratio(BASE, fast) == pytest.approx(2.0)
    assert area_ratio(BASE, BASE) == pytest.approx(1.0)


def test_area_ratio_needs_a_common_acr_range():
    assert area_ratio(BASE, [(1.0, 0.05), (2.0, 0.15)]) is None


def test_fastest_keeps_the_quickest_of_identical_results():
    times = iter([3.0, 1.0, 2.0])
    assert fastest(lambda: ([float("nan"), 1], next(times)), 3)[1] == 1.0  # NaN compares equal
    results = iter([0.5, 0.6])
    with pytest.raises(RuntimeError, match="different result"):
        fastest(lambda: (next(results), 1.0), 2)


def test_sample_speedups_count_forward_passes():
    """IRS: n_p per image the cache did not abstain on; baseline: n0 + n per image."""
    report = {"images": 10, "n0": 100, "models": {"W8A8": {
        "baseline": [{"n": 100, "acr": 0.20}, {"n": 300, "acr": 0.30}, {"n": 700, "acr": 0.40}],
        "irs": {"top_class_losses": {"points": [
            {"n_p": 100, "acr": 0.25, "branches": {"irs": 6, "fresh": 2, "abstain-cached": 2}},
            {"n_p": 400, "acr": 0.45, "branches": {"irs": 6, "fresh": 2, "abstain-cached": 2}}]}}}}}
    points = add_sample_metrics(report)["models"]["W8A8"]["irs"]["top_class_losses"]["points"]
    assert [p["samples"] for p in points] == [800, 3200]
    # the baseline reaches ACR 0.25 halfway between 2,000 and 4,000 samples: 3,000 / 800
    assert points[0]["baseline_samples_to_same_acr"] == 3000 and points[0]["sample_speedup"] == pytest.approx(3.75)
    assert points[1]["sample_speedup"] is None  # above anything the baseline reached
    assert report["models"]["W8A8"]["irs"]["top_class_losses"]["area_sample_speedup"] > 1


@pytest.mark.parametrize("tag, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_float_variants_round_every_weight_and_compute_in_float32(tag, dtype):
    torch.manual_seed(0)
    fp32 = models.build("resnet20").eval()
    low = modified_copy(fp32, {}, tag, 0.25, None, torch.device("cpu"))
    changed = 0
    lowered = low.state_dict()
    for name, w in fp32.state_dict().items():
        w_low = lowered[name]
        if w.is_floating_point():
            assert w_low.dtype == torch.float32, name
            assert torch.equal(w_low, w.to(dtype).float()), name
            changed += int(not torch.equal(w_low, w))
    assert changed > 0
    assert next(fp32.parameters()).dtype == torch.float32  # the original is left alone


def test_fp32_variant_is_an_unchanged_copy():
    torch.manual_seed(0)
    fp32 = models.build("resnet20").eval()
    same = modified_copy(fp32, {}, "fp32", 0.25, None, torch.device("cpu"))
    assert same is not fp32
    x = torch.rand(4, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(same(x), fp32(x))


def test_model_tags_are_checked_while_parsing():
    assert model_tags("W8A8,fp16,bf16,fp32") == ["W8A8", "fp16", "bf16", "fp32"]
    with pytest.raises(argparse.ArgumentTypeError, match="W<bits>A<bits>.*fp16, bf16, fp32"):
        model_tags("W8A8,int8")


def test_the_irs_repository_int8_leaves_a_resnet20_unchanged():
    """RESULTS.md compares our W8A8 with the IRS paper's int8. The IRS repository makes that model with
    quantize_dynamic(net, {Conv2d}, qint8); PyTorch has no dynamic Conv2d mapping, so nothing is swapped."""
    torch.manual_seed(0)
    fp32 = models.build("resnet20").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager-mode quantization is deprecated in favour of torchao
        int8 = torch.ao.quantization.quantize_dynamic(fp32, {torch.nn.Conv2d}, dtype=torch.qint8)
    assert {type(m) for m in int8.modules()} == {type(m) for m in fp32.modules()}
    x = torch.rand(8, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(int8(x), fp32(x))
