"""Model names and the seed dimension of the file layout (arq/layout.py), and the per-budget uniform baselines."""
from __future__ import annotations

import copy

import pytest

from arq import cost, layout, policy


@pytest.mark.parametrize("name, family, variant, budget, seed, method", [
    ("fp32", "fp32", None, None, None, "fp32"),
    ("uniform_w4a4_s0", "uniform", "w4a4", None, 0, "uniform_w4a4"),
    ("hawq_b1.0_s12", "hawq", "b1.0", 1.0, 12, "hawq_b1.0"),
    ("arq_b0.7_s2", "arq", "b0.7", 0.7, 2, "arq_b0.7"),
    ("arq_b1.5", "arq", "b1.5", 1.5, None, "arq_b1.5"),
    ("fp32_symreg", "fp32", None, None, None, "fp32_symreg"),
    ("fp32_symreg_satnl", "fp32", None, None, None, "fp32_symreg_satnl"),
    ("uniform_w3a3_satnl_s1", "uniform", "w3a3", None, 1, "uniform_w3a3_satnl"),
    ("arq_b1.0_symreg_satnl_s2", "arq", "b1.0", 1.0, 2, "arq_b1.0_symreg_satnl"),
])
def test_a_name_parses_back_to_what_built_it(name, family, variant, budget, seed, method):
    n = layout.parse(name)
    assert (n.family, n.variant, n.budget, n.seed, n.method) == (family, variant, budget, seed, method)
    assert layout.model_name(n.method, n.seed) == name
    assert n.base == "fp32" + next((s for s in ("_symreg_satnl", "_symreg", "_satnl") if s in name), "")
    assert layout.parse(layout.model_name(n.plain, n.seed)).base == "fp32"


@pytest.mark.parametrize("name", ["ARQ b1.0", "fp32_s0", "fp32_w4a4", "arq_b1.0_s0_symreg"])
def test_a_malformed_name_is_refused_naming_the_form(name):
    with pytest.raises(ValueError, match="not a model name"):
        layout.parse(name)


def test_seeds_multiply_every_quantized_model_and_name_its_files(smoke_config):
    cfg = copy.deepcopy(smoke_config)
    cfg["search"].update(seeds=[0, 1, 2], budgets=[1.0, 0.7], methods=["arq", "random"])
    cfg["quant"]["uniform"] = ["W8A8"]
    models = layout.methods(cfg)
    assert models[0] == "fp32"
    # W8A8 as configured, then each budget's uniform policies with the most bits (W3A3; W3A2 and W2A3)
    uniform = ["uniform_w8a8", "uniform_w3a3", "uniform_w3a2", "uniform_w2a3"]
    hawq = ["hawq_b1.0", "hawq_b0.7"]
    searched = [f"{m}_b{b}" for m in ("arq", "random") for b in ("1.0", "0.7")]
    assert models[1:] == [f"{m}_s{s}" for m in uniform + hawq for s in (0, 1, 2)] + \
        [f"{m}_s{s}" for m in searched for s in (0, 1, 2)]
    res = layout.results_dir(cfg)
    # a search's policy depends on its seed; HAWQ's on σ only; uniform ones on neither
    assert layout.policy_file(cfg, "arq_b1.0_s2", "0.25") == f"{res}/policies/arq_b1.0_s2_sigma0.25.json"
    assert layout.policy_file(cfg, "hawq_b0.7_s1", "0.25") == f"{res}/policies/hawq_b0.7_sigma0.25.json"
    assert layout.policy_file(cfg, "uniform_w3a2_s2", "0.25") == f"{res}/policies/uniform_w3a2.json"
    inputs = layout.report_inputs(cfg)
    assert f"{res}/certify/uniform_w3a3_s1_sigma0.25.tsv" in inputs["tsvs"]
    assert f"{res}/search/random_b0.7_s2_sigma0.25.csv" in inputs["search_csvs"]
    assert len(inputs["summaries"]) == len(models)
    assert len(inputs["policies"]) == 4 + 2 + 2 * 2 * 3  # uniform, HAWQ, one per search and seed
    assert f"{res}/search/arq_b1.0_s1_sigma0.25.state.pt" in layout.binaries(cfg)


def test_a_budget_may_run_a_subset_of_the_seeds(smoke_config):
    """The cpu study's shape: three seeds at 1.0%, one at 0.7% (its searches, HAWQ-V3 and the uniform models only it
    adds); the references of quant.uniform keep every seed."""
    cfg = copy.deepcopy(smoke_config)
    cfg["search"].update(seeds=[0, 1, 2], budgets=[1.0, 0.7], methods=["arq", "haq"], seeds_by_budget={"0.7": [0]})
    cfg["quant"]["uniform"] = ["W4A4"]
    three = (0, 1, 2)
    expected = (["fp32"] + [f"uniform_w4a4_s{s}" for s in three] + [f"uniform_w3a3_s{s}" for s in three]
                + ["uniform_w3a2_s0", "uniform_w2a3_s0"] + [f"hawq_b1.0_s{s}" for s in three] + ["hawq_b0.7_s0"]
                + [f"arq_b1.0_s{s}" for s in three] + ["arq_b0.7_s0"] + [f"haq_b1.0_s{s}" for s in three]
                + ["haq_b0.7_s0"])
    assert layout.methods(cfg) == expected
    assert layout.seeds(cfg, "0.7") == [0] and layout.seeds(cfg, 1.0) == [0, 1, 2] and layout.seeds(cfg) == [0, 1, 2]
    # a tag two budgets add runs the union of their seeds
    cfg["search"]["budgets"] = [1.0, 0.95]
    cfg["search"]["seeds_by_budget"] = {"0.95": [2]}
    assert layout.uniform_seeds(cfg)["W3A3"] == [0, 1, 2]
    cfg["search"]["seeds_by_budget"] = {"0.95": [2], "1.0": [1]}
    assert layout.uniform_seeds(cfg)["W3A3"] == [1, 2]


@pytest.mark.parametrize("budget, tags", [(1.0, ["W3A3"]), (0.7, ["W3A2", "W2A3"]), (1.5, ["W4A3", "W3A4"]),
                                          (6.25, ["W8A8"]), (0.5, ["W2A2"]), (0.4, [])])
def test_each_budget_gets_the_uniform_policies_with_the_most_bits_that_fit(smoke_config, budget, tags):
    costs, rules = policy.for_config(smoke_config)
    assert policy.uniform_within(costs, rules, budget) == tags
    for tag in tags:
        assert cost.bitops_pct(costs, policy.uniform_layers(rules, *policy.parse_uniform(tag))) <= budget
