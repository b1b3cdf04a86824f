"""The up-front cost estimate: each stage priced from the profile's own settings."""
import copy
from pathlib import Path

import pytest

from arq import budget, config as cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cpu():
    return cfg.load(ROOT / "config" / "cpu.yaml")


def test_hawq_term_scales_with_its_iterations_and_vanishes_when_disabled(cpu):
    base = budget.estimate_seconds(cpu, "cpu", 2)
    more = copy.deepcopy(cpu)
    more["hawq"]["max_iterations"] *= 2
    assert budget.estimate_seconds(more, "cpu", 2)["hawq"] == pytest.approx(2 * base["hawq"])
    off = copy.deepcopy(cpu)
    off["hawq"]["enabled"] = False
    est = budget.estimate_seconds(off, "cpu", 2)
    assert est["hawq"] == 0
    # one model fewer to finetune and certify per budget
    assert est["finetune"] < base["finetune"] and est["certify"] < base["certify"]


def test_haq_episodes_cost_less_than_certified_reward_episodes(cpu):
    only = {}
    for method in ("arq", "haq", "random"):
        one = copy.deepcopy(cpu)
        one["search"]["methods"] = [method]
        only[method] = budget.estimate_seconds(one, "cpu", 2)["search"]
    assert only["haq"] < only["arq"] == pytest.approx(only["random"])
    assert budget.estimate_seconds(cpu, "cpu", 2)["search"] == pytest.approx(sum(only.values()))


def test_more_threads_and_a_gpu_are_faster_and_the_description_names_every_stage(cpu):
    two, four = budget.estimate_seconds(cpu, "cpu", 2), budget.estimate_seconds(cpu, "cpu", 4)
    assert four["total"] < two["total"]
    assert budget.estimate_seconds(cpu, "cuda")["total"] < four["total"]
    text = budget.describe(cpu, "cpu", 2)
    for word in ("profile 'cpu'", "training", "searches", "HAWQ Hessian", "finetune", "certification", "IRS", "H100"):
        assert word in text
