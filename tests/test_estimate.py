"""The up-front cost estimate: each stage priced from the profile's own settings."""
import copy
from pathlib import Path

import pytest

from arq import config as cfg, estimate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cpu():
    """The cpu study's plain-base comparison (its robust base, arms and sweep left out: priced by their own test)."""
    config = cfg.load(ROOT / "config" / "cpu.yaml")
    config["robust_base"].update(bases=["fp32"], arms=[], sam=None)
    config["sweep"]["enabled"] = False
    return config


def test_hawq_term_scales_with_its_iterations_and_vanishes_when_disabled(cpu):
    base = estimate.estimate_seconds(cpu, "cpu", 2)
    more = copy.deepcopy(cpu)
    more["hawq"]["max_iterations"] *= 2
    assert estimate.estimate_seconds(more, "cpu", 2)["hawq"] == pytest.approx(2 * base["hawq"])
    off = copy.deepcopy(cpu)
    off["hawq"]["enabled"] = False
    est = estimate.estimate_seconds(off, "cpu", 2)
    assert est["hawq"] == 0
    # one model fewer to finetune and certify per budget
    assert est["finetune"] < base["finetune"] and est["certify"] < base["certify"]


def test_haq_episodes_cost_less_than_certified_reward_episodes(cpu):
    only = {}
    for method in ("arq", "haq", "random"):
        one = copy.deepcopy(cpu)
        one["search"]["methods"] = [method]
        only[method] = estimate.estimate_seconds(one, "cpu", 2)["search"]
    assert only["haq"] < only["arq"] == pytest.approx(only["random"])
    assert estimate.estimate_seconds(cpu, "cpu", 2)["search"] == pytest.approx(sum(only.values()))


def test_more_threads_and_a_gpu_are_faster_and_the_description_names_every_stage(cpu):
    two, four = estimate.estimate_seconds(cpu, "cpu", 2), estimate.estimate_seconds(cpu, "cpu", 4)
    assert four["total"] < two["total"]
    assert estimate.estimate_seconds(cpu, "cuda")["total"] < four["total"]
    text = estimate.describe(cpu, "cpu", 2)
    for word in ("profile 'cpu'", "training", "searches", "HAWQ Hessian", "finetune", "certification", "IRS", "H100"):
        assert word in text


def test_a_budget_with_fewer_seeds_costs_its_share(cpu):
    """At 0.7% the cpu study runs one seed of three: its searches, HAWQ-V3 and W3A2/W2A3 cost a third."""
    every = copy.deepcopy(cpu)
    every["search"]["seeds_by_budget"] = {}
    full, study = estimate.estimate_seconds(every, "cpu", 2), estimate.estimate_seconds(cpu, "cpu", 2)
    per_budget = full["search"] / 2  # two budgets alike but for the seeds
    assert study["search"] == pytest.approx(per_budget + per_budget / 3)
    # quantized models: 3 × (W8A8, W4A4, W3A3, HAWQ 1.0, 3 searches 1.0) + 1 × (W3A2, W2A3, HAWQ 0.7, 3 searches 0.7)
    assert study["finetune"] / full["finetune"] == pytest.approx((3 * 7 + 6) / (3 * 13))


def test_robust_bases_their_arms_and_the_sweep_are_priced(cpu):
    plain = estimate.estimate_seconds(cpu, "cpu", 2)
    assert plain["sweep"] == 0 and "sweep" not in estimate.describe(cpu, "cpu", 2)
    robust = copy.deepcopy(cpu)
    robust["robust_base"].update(bases=["fp32", "fp32_symreg"], arms=["uniform_w3a3", "arq_b1.0"])
    est = estimate.estimate_seconds(robust, "cpu", 2)
    assert est["train"] == pytest.approx(2 * plain["train"])  # a second base, same recipe
    arq_only = copy.deepcopy(cpu)
    arq_only["search"].update(methods=["arq"], budgets=[1.0], seeds_by_budget={})
    # three more ARQ searches at 1.0% (seeds 0-2), on the robust base
    assert est["search"] == pytest.approx(plain["search"] + estimate.estimate_seconds(arq_only, "cpu", 2)["search"])
    assert est["finetune"] > plain["finetune"] and est["certify"] > plain["certify"] and est["irs"] > plain["irs"]
    sam = copy.deepcopy(robust)
    sam["robust_base"].update(bases=["fp32", "fp32_satnl"], sam={"rho": 0.05, "adaptive": True})
    assert estimate.estimate_seconds(sam, "cpu", 2)["train"] == pytest.approx(
        plain["train"] + 2 * plain["train"] - _val_passes(cpu))  # ASAM: two passes per training step
    robust["sweep"].update(enabled=True)
    swept = estimate.estimate_seconds(robust, "cpu", 2)
    assert swept["sweep"] > 0 and "bit-width sweep" in estimate.describe(robust, "cpu", 2)
    robust["sweep"]["qat"] = []
    assert estimate.estimate_seconds(robust, "cpu", 2)["sweep"] < swept["sweep"]


def _val_passes(config):
    """The training estimate's noisy-val part of one base."""
    rate = estimate.ANCHORS["cpu_per_2_threads"]
    t = config["train"]
    return len(config["sigmas"]) * t["epochs"] * min(t["val_images"], config["data"]["val_size"]) / rate["infer"]
