"""The search: action bins, budget enforcement, HAQ's observation, the Gymnasium environment, DDPG, the rewards,
and the resumable stage (on tiny data; the smoke DAG runs it on real CIFAR-10)."""
from __future__ import annotations

import copy
import csv

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from arq import cost, irs, models, policy
from arq.data import Prepared, Split
from arq.policy import BudgetError, cheapest_layers, smallest_budget_pct
from arq.search.constraint import enforce_budget
from arq.search.ddpg import DDPG, DDPGSettings, RandomAgent
from arq.search.env import QuantizationEnv, action_to_bits
from arq.search.evaluate import EpisodeEvaluator
from arq.search.features import raw_static, static_features
from arq.search.run import TIME_COLUMNS, run_search


@pytest.fixture(scope="module")
def resnet20():
    costs = cost.for_arch("resnet20")
    rules = policy.rules_for("resnet20", costs, {"pin_first_last": True, "pinned_bits": 8, "min_bits": 2,
                                                 "max_bits": 8})
    return costs, rules


# ------------------------------------------------------------------------------------------ action → bits

def test_actions_map_to_bits_by_equal_width_bins():
    assert action_to_bits(0.0, 2, 8) == 2 and action_to_bits(1.0, 2, 8) == 8
    for k, bits in enumerate(range(2, 9)):  # bin k is [k/7, (k+1)/7)
        assert action_to_bits(k / 7 + 1e-9, 2, 8) == bits
        assert action_to_bits((k + 1) / 7 - 1e-9, 2, 8) == bits
    grid = np.linspace(0, 1, 70_001)
    counts = np.bincount([action_to_bits(a, 2, 8) for a in grid])[2:]
    assert counts.max() - counts.min() <= 1  # equal widths
    assert action_to_bits(-0.3, 2, 8) == 2 and action_to_bits(1.7, 2, 8) == 8


# ------------------------------------------------------------------------------------------ budget

def test_budget_enforcement_properties_for_random_policies(resnet20):
    costs, rules = resnet20
    g = np.random.default_rng(0)
    for trial in range(300):
        budget = float(g.uniform(smallest_budget_pct(costs, cost.bitops(costs, cheapest_layers(rules))), 12.0))
        chosen = {n: {"w_bits": int(g.integers(2, 9)), "a_bits": int(g.integers(2, 9))} for n in rules.layers}
        chosen.update({n: {"w_bits": b, "a_bits": b} for n, b in rules.pinned.items()})
        out = enforce_budget(chosen, costs, rules, budget)
        assert cost.bitops_pct(costs, out) <= budget + 1e-9
        assert all(out[n] == chosen[n] for n in rules.pinned)
        assert all(2 <= out[n][k] <= chosen[n][k] for n in rules.layers for k in ("w_bits", "a_bits"))
        policy.validate(out, rules)
        if cost.bitops_pct(costs, chosen) <= budget:
            assert out == chosen  # already within: untouched


@pytest.mark.parametrize("min_bits, pin", [(2, True), (3, True), (4, True), (2, False), (3, False)])
def test_the_named_smallest_budget_always_passes(resnet20, min_bits, pin):
    costs, _ = resnet20
    rules = policy.rules_for("resnet20", costs, {"min_bits": min_bits, "max_bits": 8, "pin_first_last": pin,
                                                 "pinned_bits": 8})
    floor = smallest_budget_pct(costs, cost.bitops(costs, cheapest_layers(rules)))
    policy.require_budget(costs, cost.bitops(costs, cheapest_layers(rules)), floor, "test")  # no error
    with pytest.raises(BudgetError, match=f"smallest achievable is {floor:.4f}%"):
        policy.require_budget(costs, cost.bitops(costs, cheapest_layers(rules)), floor - 1e-4, "test")


def test_budget_walk_lowers_the_last_layers_activations_first(resnet20):
    costs, rules = resnet20
    eight = {n: {"w_bits": 8, "a_bits": 8} for n in rules.layers}
    budget = cost.bitops_pct(costs, eight) - 1e-6  # one step is enough
    out = enforce_budget(eight, costs, rules, budget)
    changed = [(n, k) for n in rules.layers for k in ("w_bits", "a_bits") if out[n][k] != 8]
    last_searched = [n for n in rules.layers if n not in rules.pinned][-1]
    assert changed == [(last_searched, "a_bits")] and out[last_searched]["a_bits"] == 7


def test_an_unreachable_budget_names_the_smallest_achievable(resnet20):
    costs, rules = resnet20
    cheapest = cost.bitops(costs, cheapest_layers(rules))
    floor = smallest_budget_pct(costs, cheapest)
    exact = cost.bitops_pct(costs, cheapest_layers(rules))
    assert exact <= floor < exact + 1e-4  # rounded up to four decimals
    assert 0.4 < floor < 1.0  # W2A2 everywhere but the 8-bit first conv and FC
    with pytest.raises(BudgetError, match=f"smallest achievable is {floor:.4f}%"):
        enforce_budget(cheapest_layers(rules), costs, rules, exact * 0.99)
    assert enforce_budget(cheapest_layers(rules), costs, rules, floor) == cheapest_layers(rules)  # the named budget passes


# ------------------------------------------------------------------------------------------ observation

def test_static_features_of_resnet20_against_hand_values(resnet20):
    costs, _ = resnet20
    raw = raw_static(costs)
    names = [c.name for c in costs]
    # depthwise, c_in, c_out, stride, kernel, #weights, input H·W, index
    assert raw[names.index("conv1")].tolist() == [0, 3, 16, 1, 3, 432, 1024, 0]
    assert raw[names.index("layer2.0.conv1")].tolist() == [0, 16, 32, 2, 3, 4608, 1024, names.index("layer2.0.conv1")]
    assert raw[names.index("layer3.0.shortcut.0")].tolist() == [0, 32, 64, 2, 1, 2048, 256,
                                                                names.index("layer3.0.shortcut.0")]
    assert raw[names.index("fc")].tolist() == [0, 64, 10, 0, 1, 640, 64, len(costs) - 1]
    norm = static_features(costs)
    assert norm.min() >= 0 and norm.max() <= 1 and norm.dtype == np.float32
    assert norm[names.index("layer2.0.conv1"), 3] == 1.0 and norm[names.index("fc"), 3] == 0.0  # stride 2 vs 0
    assert (norm[:, 0] == 0).all()  # no depthwise layer: a constant column is 0
    assert norm[names.index("fc"), 7] == 1.0 and norm[0, 7] == 0.0


# ------------------------------------------------------------------------------------------ environment

def _bits_reward(layers):
    """A cheap stand-in evaluation for environment mechanics only: more bits, more reward."""
    return float(np.mean([b["w_bits"] + b["a_bits"] for b in layers.values()])) / 16, {"seconds": {}}


def test_the_environment_passes_gymnasiums_checker(resnet20):
    costs, rules = resnet20
    env = QuantizationEnv(costs, rules, 1.5, _bits_reward)
    check_env(env, skip_render_check=True)


def test_an_episode_walks_the_searched_layers_and_ends_within_budget(resnet20):
    costs, rules = resnet20
    for act_bits in (True, False):
        env = QuantizationEnv(costs, rules, 1.5, _bits_reward, act_bits=act_bits, fixed_a_bits=6)
        searched = [n for n in rules.layers if n not in rules.pinned]
        assert len(env.steps) == len(searched) * (2 if act_bits else 1)
        obs, _ = env.reset(seed=0)
        assert obs[-1] == 1.0 and obs[-2] == 0.0  # a weight step first, no previous bits
        for t in range(len(env.steps)):
            obs, reward, done, truncated, info = env.step(np.array([1.0], np.float32))
            assert done == (t == len(env.steps) - 1) and not truncated
            if not done:
                assert reward == 0.0 and obs[-2] == 1.0  # previous step chose 8 of 8 bits
        assert info["bitops_pct"] <= 1.5
        if not act_bits:
            assert all(info["chosen"][n]["a_bits"] == 6 for n in searched)
        assert all(info["layers"][n] == {"w_bits": 8, "a_bits": 8} for n in rules.pinned)


def test_the_replayed_trajectory_reproduces_the_enforced_policy(resnet20):
    costs, rules = resnet20
    env = QuantizationEnv(costs, rules, 1.5, _bits_reward)
    g = np.random.default_rng(1)
    env.reset()
    for _ in env.steps:
        *_, done, _, info = env.step(np.array([g.uniform()], np.float32))
    observations, actions = env.trajectory(info["layers"])
    assert len(observations) == len(actions) == len(env.steps)
    replay = {n: dict(b) for n, b in info["layers"].items()}
    for (name, key), a in zip(env.steps, actions):
        assert action_to_bits(a, 2, 8) == info["layers"][name][key]
    env.reset()
    for obs, a in zip(observations, actions):
        assert np.array_equal(obs, env._observation())
        *_, done, _, again = env.step(np.array([a], np.float32))
    assert again["layers"] == replay  # already within budget: enforcement leaves it


# ------------------------------------------------------------------------------------------ agents

def test_ddpg_learns_a_toy_problem_whose_best_action_is_known():
    """One step per episode, reward 1 − 4(a − 0.7)²: after warm-up the actor's action approaches 0.7."""
    settings = DDPGSettings(warmup=20, batch_size=32)
    agent = DDPG(3, 1, settings, seed=0)
    obs = np.array([0.2, 0.5, 1.0], np.float32)
    for episode in range(300):
        a = agent.act(obs, episode)
        agent.remember([obs], [a], 1 - 4 * (a - 0.7) ** 2)
        if episode >= settings.warmup:
            for _ in range(4):
                agent.update()
    with torch.no_grad():
        mu = float(agent.actor(torch.as_tensor(obs)[None])[0, 0])
    assert abs(mu - 0.7) < 0.08, mu
    assert agent.delta(300) == pytest.approx(0.5 * 0.99 ** 280)


def test_agents_are_seeded_and_leave_the_global_generators_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = DDPG(10, 4, DDPGSettings(), seed=5), DDPG(10, 4, DDPGSettings(), seed=5)
    assert torch.rand(1) == before  # building the agents drew nothing from torch's global generator
    obs = np.zeros(10, np.float32)
    assert [a.act(obs, e) for e in range(30)] == [b.act(obs, e) for e in range(30)]
    r1, r2 = RandomAgent(3), RandomAgent(3)
    assert [r1.act(obs, 0) for _ in range(5)] == [r2.act(obs, 0) for _ in range(5)]


def test_exploration_after_warmup_stays_in_range_and_narrows():
    agent = DDPG(2, 1, DDPGSettings(warmup=0), seed=0)
    obs = np.zeros(2, np.float32)
    early = np.array([agent.act(obs, 0) for _ in range(400)])
    late = np.array([agent.act(obs, 400) for _ in range(400)])
    assert early.min() >= 0 and early.max() <= 1 and late.min() >= 0 and late.max() <= 1
    assert late.std() < 0.25 * early.std()


@pytest.mark.parametrize("episodes, warmup", [(100, 20), (600, 20), (30, 5), (22, 20)])
def test_exploration_decays_to_its_final_value_at_the_last_episode(episodes, warmup):
    agent = DDPG(2, 1, DDPGSettings(warmup=warmup, episodes=episodes, init_delta=0.5, delta_final=0.05), seed=0)
    assert agent.delta(warmup) == pytest.approx(0.5)  # the first learned episode explores at δ₀
    assert agent.delta(episodes - 1) == pytest.approx(0.05)  # the last one at the configured final value
    deltas = [agent.delta(e) for e in range(warmup, episodes)]
    assert all(a > b for a, b in zip(deltas, deltas[1:]))  # geometric, strictly decreasing


def test_haqs_fixed_decay_stays_selectable():
    agent = DDPG(2, 1, DDPGSettings(warmup=20, episodes=100, delta_final=None), seed=0)
    assert agent.delta(20) == pytest.approx(0.5)
    assert agent.delta(99) == pytest.approx(0.5 * 0.99 ** 79)  # .226: still wide at the last of 100 episodes
    assert DDPG(2, 1, DDPGSettings(warmup=20, episodes=600, delta_final=None), seed=0).delta(599) < 0.002


# ------------------------------------------------------------------------------------------ rewards and the stage

class Forbidden:
    """Stands in for the test split's tensors: any use fails the test (a search must never see them)."""

    def __getattr__(self, name):
        raise AssertionError("search code touched the test split")

    def __getitem__(self, key):
        raise AssertionError("search code touched the test split")

    def __len__(self):
        raise AssertionError("search code touched the test split")


@pytest.fixture
def search_setup(tmp_path, smoke_config, tiny_data, single_thread):
    cfg = copy.deepcopy(smoke_config)
    cfg["quant"]["calibration"]["images"] = 32
    cfg["irs"].update(images=4, n0=10, n=100, chunk=50, chunks_per_batch=2, n_p=20)
    cfg["search"].update(episodes=5, warmup=2, arq_lambda=10.0, haq_images=10)
    cfg["search"]["finetune"].update(steps=2, batch_size=16, train_images=None)
    cfg["search"]["ddpg"].update(batch_size=8, hidden=32)
    torch.manual_seed(0)
    model_path = tmp_path / "fp32.pt"
    models.save_checkpoint(model_path, models.build("resnet20"), "resnet20", sigma=0.25, method="fp32",
                           profile="smoke")
    data = Prepared(train=tiny_data.train, val=tiny_data.val, cert=Split(Forbidden(), Forbidden()),
                    cert_idx=Forbidden(), manifest={"file_sha256": "ab" * 32, "classes": list(range(10))})
    cache_path = tmp_path / "cache.pt"
    irs.run_cache(cfg, 0.25, model_path, data, cache_path, tmp_path / "cache.json", torch.device("cpu"),
                  log=lambda s: None)
    return cfg, model_path, data, cache_path


def _search(setup, out, method="arq", log=None):
    cfg, model_path, data, cache_path = setup
    return run_search(cfg, 0.25, method, 1.5, 0, model_path, data, cache_path, out / "ep.csv", out / "policy.json",
                      out / "curve.png", out / "state.pt", torch.device("cpu"), log=log or (lambda s: None),
                      progress=False)


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_rewards_have_the_right_sign_and_scale(search_setup):
    cfg, model_path, data, cache_path = search_setup
    fp32, _ = models.load_checkpoint(model_path)
    cache = irs.Cache.load(cache_path)
    val = Split(data.val.x[cache.idx], data.val.y[cache.idx])
    cpu = torch.device("cpu")
    arq10 = EpisodeEvaluator(fp32, cfg, 0.25, data.train, val, 10, cpu, "arq", 0, cache)
    arq20 = EpisodeEvaluator(fp32, {**cfg, "search": {**cfg["search"], "arq_lambda": 20.0}}, 0.25, data.train, val,
                             10, cpu, "arq", 0, cache)
    haq = EpisodeEvaluator(fp32, cfg, 0.25, data.train, val, 10, cpu, "haq", 0)
    # the FP32 model against itself: HAQ's reward is exactly 0; ARQ's is ≤ 0 (ζ > 0 even with no disagreement)
    assert haq.score(copy.deepcopy(fp32))[0] == 0.0
    r10, info = arq10.score(copy.deepcopy(fp32))
    assert r10 <= 0 and info["acr"] <= info["acr_fp32"] == pytest.approx(irs.cached_acr(cache))
    assert arq20.score(copy.deepcopy(fp32))[0] == pytest.approx(2 * r10)
    # a network that always says one class: ARQ reward −λ·ACR_fp at most; HAQ −0.1 per lost percentage point
    dead = copy.deepcopy(fp32)
    with torch.no_grad():
        dead.fc.weight.zero_()
        dead.fc.bias.copy_(torch.arange(10.0))
    r_dead, info = haq.score(dead)
    assert r_dead == pytest.approx(0.1 * (info["top1"] - info["top1_fp32"]))
    assert arq10.score(dead)[0] <= 0


def test_an_episode_leaves_the_fp32_model_unchanged(search_setup, resnet20):
    cfg, model_path, data, cache_path = search_setup
    fp32, _ = models.load_checkpoint(model_path)
    before = {k: v.clone() for k, v in fp32.state_dict().items()}
    cache = irs.Cache.load(cache_path)
    val = Split(data.val.x[cache.idx], data.val.y[cache.idx])
    ev = EpisodeEvaluator(fp32, cfg, 0.25, data.train, val, 10, torch.device("cpu"), "arq", 0, cache)
    _, rules = resnet20
    reward, info = ev(enforce_budget({n: {"w_bits": 4, "a_bits": 4} for n in rules.layers} |
                                     {n: {"w_bits": 8, "a_bits": 8} for n in rules.pinned}, resnet20[0], rules, 1.5))
    assert set(info["seconds"]) == {"calibrate", "finetune", "reward"}
    after = fp32.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert not any("act" in k for k in after)  # no quantizer was attached to it
    again, _ = ev(enforce_budget({n: {"w_bits": 4, "a_bits": 4} for n in rules.layers} |
                                 {n: {"w_bits": 8, "a_bits": 8} for n in rules.pinned}, resnet20[0], rules, 1.5))
    assert again == reward  # common random numbers: the same policy gets the same reward


@pytest.mark.parametrize("method", ["arq", "haq", "random"])
def test_a_search_writes_its_csv_policy_and_curve_without_the_test_split(search_setup, tmp_path, method):
    doc = _search(search_setup, tmp_path / method, method)
    rows = _csv(tmp_path / method / "ep.csv")
    assert [int(r["episode"]) for r in rows] == [1, 2, 3, 4, 5]
    assert all(float(r["bitops_pct"]) <= 1.5 for r in rows)
    best = max(rows, key=lambda r: float(r["reward"]))
    assert doc["episode"] == int(best["episode"]) and doc["reward"] == pytest.approx(float(best["reward"]))
    assert doc["produced_by"] == f"search {method}" and doc["bitops_pct"] <= 1.5
    assert float(rows[-1]["best_reward"]) == pytest.approx(doc["reward"])
    cfg = search_setup[0]
    costs, rules = policy.for_config(cfg)
    assert policy.load(tmp_path / method / "policy.json", rules, costs)["layers"] == doc["layers"]
    assert (tmp_path / method / "curve.png").read_bytes().startswith(b"\x89PNG")
    assert ("acr" in doc) == (method != "haq") and ("top1" in doc) == (method == "haq")
    # HAQ logs the exploration σ and the agent's losses per episode; so do we (empty in warm-up and for random)
    learned = [r for r in rows if int(r["episode"]) > cfg["search"]["warmup"]]
    for r in rows:
        assert {"delta", "critic_loss", "actor_loss"} <= set(r)
        assert (r in learned and method != "random") == (r["delta"] != "" and r["critic_loss"] != "")
    if method != "random":
        assert float(learned[0]["delta"]) == pytest.approx(cfg["search"]["ddpg"]["init_delta"])
        assert float(learned[-1]["delta"]) == pytest.approx(cfg["search"]["ddpg"]["delta_final"])


def test_haqs_reward_scores_its_own_class_balanced_val_set(search_setup, tmp_path, monkeypatch):
    """HAQ's accuracy reward used to move in 2-point steps on the 50 images of the IRS cache; it now has its own
    class-balanced set of search.haq_images."""
    from arq.search import run as search_run

    seen = {}
    real = search_run.EpisodeEvaluator

    def spy(fp32, config, sigma, train, val, *args, **kwargs):
        seen["y"] = val.y.clone()
        return real(fp32, config, sigma, train, val, *args, **kwargs)

    monkeypatch.setattr(search_run, "EpisodeEvaluator", spy)
    cfg = search_setup[0]
    _search(search_setup, tmp_path / "haq", "haq")
    counts = torch.bincount(seen["y"], minlength=10)
    assert len(seen["y"]) == cfg["search"]["haq_images"] and counts.max() - counts[counts > 0].min() <= 1


class Interrupt(Exception):
    pass


def test_an_interrupted_search_resumes_to_the_same_episode_csv(search_setup, tmp_path):
    _search(search_setup, tmp_path / "straight")

    def crash_after_episode_3(msg):
        if msg.startswith("episode 3/"):
            raise Interrupt

    with pytest.raises(Interrupt):
        _search(search_setup, tmp_path / "run", log=crash_after_episode_3)
    assert not (tmp_path / "run" / "ep.csv").exists()
    said = []
    _search(search_setup, tmp_path / "run", log=said.append)
    assert any(s.startswith("resuming") and "after episode 3" in s for s in said), said

    def without_time(rows):
        return [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in rows]

    assert without_time(_csv(tmp_path / "run" / "ep.csv")) == without_time(_csv(tmp_path / "straight" / "ep.csv"))
    assert (tmp_path / "run" / "policy.json").read_text().split('"seconds_per_episode"')[0] == \
        (tmp_path / "straight" / "policy.json").read_text().split('"seconds_per_episode"')[0]


def test_a_corrupt_or_foreign_search_state_is_not_resumed(search_setup, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "state.pt").write_bytes(b"garbage")
    said = []
    _search(search_setup, out, log=said.append)
    assert (out / "state.pt.corrupt").exists() and any("aside" in s for s in said)
    cfg = copy.deepcopy(search_setup[0])
    cfg["search"]["finetune"]["steps"] = 3
    said = []
    run_search(cfg, 0.25, "arq", 1.5, 0, search_setup[1], search_setup[2], search_setup[3], out / "ep.csv",
               out / "policy.json", out / "curve.png", out / "state.pt", torch.device("cpu"), log=said.append,
               progress=False)
    assert any(s.startswith("ignoring") and "other search settings" in s for s in said), said


def test_an_unreachable_budget_stops_the_search_naming_the_smallest(search_setup, tmp_path):
    cfg, model_path, data, cache_path = search_setup
    with pytest.raises(BudgetError, match="smallest achievable"):
        run_search(cfg, 0.25, "arq", 0.1, 0, model_path, data, cache_path, tmp_path / "ep.csv", tmp_path / "p.json",
                   tmp_path / "c.png", tmp_path / "s.pt", torch.device("cpu"), log=lambda s: None, progress=False)


def test_a_search_refuses_a_seed_its_budget_does_not_run(smoke_config, tmp_path):
    cfg = copy.deepcopy(smoke_config)
    cfg["search"].update(seeds=[0, 1], budgets=[1.0, 0.7], seeds_by_budget={"0.7": [0]})
    args = (tmp_path / "fp32.pt", None, None, tmp_path / "a.csv", tmp_path / "a.json", tmp_path / "a.png",
            tmp_path / "a.state.pt", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"seed 1 is not among the profile's seeds at budget 0.7% \[0\]"):
        run_search(cfg, 0.25, "arq", 0.7, 1, *args)
    with pytest.raises(ValueError, match="seed 2 is not among"):
        run_search(cfg, 0.25, "arq", 1.0, 2, *args)
    assert not any(tmp_path.iterdir())  # refused before anything was written
