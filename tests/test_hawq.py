"""HAWQ-V3: Hutchinson traces against exact Hessians, the ILP against brute force, budgets and errors."""
from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch
from torch import nn

from arq import cost, models, policy
from arq.hawq.hessian import layer_traces, run_hessian
from arq.hawq.ilp import allocate, run_allocate
from arq.policy import BudgetError


def _exact_block_traces(model, x, y):
    """Tr of each parameter's diagonal Hessian block, from the full Hessian (small models only)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in model.parameters()])

    def f(flat):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = flat[i:i + s.numel()].view(s)
            i += s.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(model, out, (x,)), y)

    h = torch.autograd.functional.hessian(f, flat0)
    traces, i = {}, 0
    for n, s in zip(names, shapes):
        k = s.numel()
        traces[n] = float(torch.diagonal(h[i:i + k, i:i + k]).sum())
        i += k
    return traces


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_hutchinson_matches_the_exact_hessian_trace_of_a_small_network():
    torch.manual_seed(0)
    model = _Tiny().double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 3, (16,))
    exact = _exact_block_traces(model, x, y)

    def batches():  # the same loss in two halves, weights summing to 1
        for sl in (slice(0, 8), slice(8, 16)):
            yield nn.functional.cross_entropy(model(x[sl]), y[sl]), 0.5

    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    got = layer_traces(batches, params, torch.Generator().manual_seed(1), probes=50, max_iterations=40, tol=1e-12)
    assert got["iterations"] == 40 and not got["converged"] and got["probes_total"] == 2000
    for name in params:
        est, se = got["layers"][name]["trace"], got["layers"][name]["stderr"]
        assert abs(est - exact[name]) < 4 * se + 1e-9, (name, est, exact[name], se)
        assert got["layers"][name]["params"] == params[name].numel()


def test_hutchinson_is_exact_for_a_separable_loss_and_stops_at_the_tolerance():
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    ca, cb = torch.rand(4, 6, dtype=torch.float64), torch.rand(7, dtype=torch.float64)

    def batches():
        yield (ca * a ** 2).sum() + (cb * b ** 2).sum() + (a.sum() * 0), 1.0

    got = layer_traces(batches, {"a": a, "b": b}, torch.Generator().manual_seed(0), probes=2, max_iterations=100,
                       tol=1e-3, patience=3)
    # a diagonal Hessian: every Rademacher probe gives the exact trace, so the running mean never moves; the first
    # iteration has no change, then three calm iterations in a row stop it
    assert got["converged"] and got["iterations"] == 4 and got["uncertain"] == []
    once = layer_traces(batches, {"a": a, "b": b}, torch.Generator().manual_seed(0), probes=2, max_iterations=100,
                        tol=1e-3, patience=1)
    assert once["converged"] and once["iterations"] == 2
    assert got["layers"]["a"]["trace"] == pytest.approx(float(2 * ca.sum()))
    assert got["layers"]["b"]["trace"] == pytest.approx(float(2 * cb.sum()))
    assert got["history"][0]["relative_change"] is None and got["history"][1]["relative_change"] == pytest.approx(0)


def _toy(macs=(100, 400, 300, 200, 50, 100)):
    costs = [cost.LayerCost(f"l{i}", "conv", m, 10, (1,), (1,), 1, 1, 1, 1, 1) for i, m in enumerate(macs)]
    rules = policy.Rules("toy", tuple(c.name for c in costs), 2, 8, {"l0": 8, f"l{len(macs) - 1}": 8})
    return costs, rules


@pytest.mark.parametrize("a_bits", ["same", 8])
@pytest.mark.parametrize("budget", [2.5, 3.5, 4.5, 5.5])  # the toy spans 1.41% (2.38% with A8) to 6.25%
def test_the_ilp_optimum_equals_brute_force(budget, a_bits):
    costs, rules = _toy()
    bits = [2, 3, 4, 6, 8]
    g = torch.Generator().manual_seed(int(budget * 10))
    free = [n for n in rules.layers if n not in rules.pinned]
    omega = {}
    for n in free:  # error falls with bits, at a random per-layer scale
        scale = float(torch.rand((), generator=g)) * 10
        omega[n] = {b: scale * 4.0 ** -b * (1 + 0.1 * float(torch.rand((), generator=g))) for b in bits}
    layers, report = allocate(omega, costs, rules, bits, budget, a_bits)

    def bitops_of(choice):
        full = {n: {"w_bits": b, "a_bits": b} for n, b in rules.pinned.items()}
        full.update({n: {"w_bits": b, "a_bits": b if a_bits == "same" else a_bits} for n, b in zip(free, choice)})
        return cost.bitops_pct(costs, full)

    feasible = [c for c in itertools.product(bits, repeat=len(free)) if bitops_of(c) <= budget + 1e-12]
    best = min(feasible, key=lambda c: sum(omega[n][b] for n, b in zip(free, c)))
    assert [layers[n]["w_bits"] for n in free] == list(best)
    assert report["objective"] == pytest.approx(sum(omega[n][b] for n, b in zip(free, best)))
    assert cost.bitops_pct(costs, layers) <= budget + 1e-9
    assert all(layers[n] == {"w_bits": 8, "a_bits": 8} for n in rules.pinned)
    if a_bits == 8:
        assert all(layers[n]["a_bits"] == 8 for n in free)


def test_an_infeasible_budget_names_the_smallest_achievable():
    costs, rules = _toy()
    omega = {n: {2: 1.0, 8: 0.0} for n in rules.layers if n not in rules.pinned}
    smallest = cost.bitops_pct(costs, {n: {"w_bits": rules.pinned.get(n, 2), "a_bits": rules.pinned.get(n, 2)}
                                       for n in rules.layers})
    printed = math.ceil(smallest * 1e4) / 1e4  # rounded up, so that the printed budget can be met
    with pytest.raises(BudgetError, match=f"smallest achievable is {printed:.4f}%"):
        allocate(omega, costs, rules, [2, 8], smallest * 0.99)
    allocate(omega, costs, rules, [2, 8], printed)
    layers, _ = allocate(omega, costs, rules, [2, 8], smallest)  # exactly the smallest is feasible
    assert all(layers[n]["w_bits"] == 2 for n in omega)


@pytest.fixture
def hawq_setup(tmp_path, smoke_config, tiny_data, single_thread):
    cfg = copy.deepcopy(smoke_config)
    cfg["hawq"].update(images=16, batch_size=8, probes=2, max_iterations=3)
    torch.manual_seed(0)
    model_path = tmp_path / "fp32.pt"
    models.save_checkpoint(model_path, models.build("resnet20"), "resnet20", sigma=0.25, method="fp32",
                           profile="smoke")
    return cfg, model_path, tiny_data


def test_the_stages_write_traces_and_a_policy_within_every_budget(hawq_setup, tmp_path):
    cfg, model_path, data = hawq_setup
    traces = run_hessian(cfg, 0.25, model_path, data, tmp_path / "h.json", torch.device("cpu"), log=lambda s: None)
    doc = json.loads((tmp_path / "h.json").read_text())
    assert doc["iterations"] == 3 and len(doc["history"]) == 3 and doc == json.loads(json.dumps(traces))
    assert set(doc["layers"]) == set(policy.for_config(cfg)[1].layers)
    assert all(v["params"] > 0 for v in doc["layers"].values())
    costs, rules = policy.for_config(cfg)
    previous = None
    for budget in (1.0, 1.5, 3.0, 6.25):
        out = tmp_path / f"hawq_{budget}.json"
        p = run_allocate(cfg, 0.25, budget, model_path, tmp_path / "h.json", out, log=lambda s: None)
        assert p["bitops_pct"] <= budget + 1e-9 and p["produced_by"] == "hawq-v3"
        reloaded = policy.load(out, rules, costs)  # a valid policy document
        assert all(v["w_bits"] == v["a_bits"] for v in reloaded["layers"].values())
        if previous is not None:  # a larger budget never costs more quantization error
            assert p["objective"] <= previous + 1e-12
        previous = p["objective"]
    with pytest.raises(BudgetError, match="smallest achievable"):
        run_allocate(cfg, 0.25, 0.3, model_path, tmp_path / "h.json", tmp_path / "x.json", log=lambda s: None)
    assert not (tmp_path / "x.json").exists()

    # a negative trace is reported before |trace| is used; a fixed activation width goes through the stage
    first = next(n for n in rules.layers if n not in rules.pinned)
    doc["layers"][first]["trace"] = -abs(doc["layers"][first]["trace"]) - 1.0
    (tmp_path / "neg.json").write_text(json.dumps(doc))
    said = []
    fixed = copy.deepcopy(cfg)
    fixed["hawq"]["a_bits"] = 8
    p = run_allocate(fixed, 0.25, 3.0, model_path, tmp_path / "neg.json", tmp_path / "a8.json", log=said.append)
    assert any(line.startswith(f"WARNING {first}: negative trace") for line in said)
    assert all(p["layers"][n]["a_bits"] == 8 for n in rules.layers) and p["bitops_pct"] <= 3.0 + 1e-9


def test_traces_of_another_model_are_refused(hawq_setup, tmp_path):
    cfg, model_path, data = hawq_setup
    run_hessian(cfg, 0.25, model_path, data, tmp_path / "h.json", torch.device("cpu"), log=lambda s: None)
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    models.save_checkpoint(other, models.build("resnet20"), "resnet20", sigma=0.25, method="fp32", profile="smoke")
    with pytest.raises(models.CheckpointError, match="another model"):
        run_allocate(cfg, 0.25, 1.5, other, tmp_path / "h.json", tmp_path / "p.json", log=lambda s: None)


def test_a_trace_within_two_standard_errors_of_zero_is_listed_as_uncertain():
    a = torch.randn(5, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def batches():  # Hessian of c0·c1 is [[0, 1], [1, 0]]: trace 0, each probe gives ±2
        yield (a ** 2).sum() + c[0] * c[1], 1.0

    got = layer_traces(batches, {"a": a, "c": c}, torch.Generator().manual_seed(0), probes=8, max_iterations=10,
                       tol=1e-12)
    assert got["uncertain"] == ["c"]
    assert got["layers"]["a"]["trace"] == pytest.approx(10.0) and got["layers"]["a"]["stderr"] == pytest.approx(0)


def test_the_hessian_loss_sees_the_images_with_gaussian_noise_of_std_sigma():
    from arq.hawq.hessian import noisy_loss_batches

    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(x.detach().clone())
            return x.flatten(1)[:, :3]

    x = torch.rand(64, 3, 8, 8)
    y = torch.zeros(64, dtype=torch.long)
    batches = noisy_loss_batches(Probe(), x, y, 0.25, 16, torch.Generator().manual_seed(0))
    shares = [w for _, w in batches()]
    assert shares == [0.25] * 4 and len(seen) == 4
    noise = torch.cat(seen) - x
    assert abs(float(noise.std()) - 0.25) < 0.01 and abs(float(noise.mean())) < 0.01
    first = torch.cat(seen)
    seen.clear()
    list(batches())
    assert torch.equal(torch.cat(seen), first)  # fixed noise: every pass is the same function of the weights


def test_a_model_whose_loss_is_not_finite_is_refused_before_the_ilp(hawq_setup, tmp_path):
    cfg, _, data = hawq_setup
    model = models.build("resnet20")
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    models.save_checkpoint(tmp_path / "nan.pt", model, "resnet20", sigma=0.25, method="fp32", profile="smoke")
    with pytest.raises(models.CheckpointError, match="the Hessian trace is nan"):
        run_hessian(cfg, 0.25, tmp_path / "nan.pt", data, tmp_path / "h.json", torch.device("cpu"),
                    log=lambda s: None)
    assert not (tmp_path / "h.json").exists()
