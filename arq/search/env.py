"""The search as a Gymnasium environment: one episode chooses the bits of every searchable layer.

Each searchable layer (pinned ones are skipped) takes one step for its weight bits and, with
``act_bits=True``, one for its activation bits; otherwise activations stay at ``fixed_a_bits``. An action in
[0, 1] becomes bits by equal-width bins over [b_min − 0.5, b_max + 0.5]. After the last step the budget is
enforced (arq.search.constraint) and the finished policy is handed to ``evaluate``, whose reward ends the
episode; every intermediate step has reward 0, as in HAQ.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import gymnasium as gym
import numpy as np

from arq import cost
from arq.policy import Rules
from arq.search.constraint import enforce_budget
from arq.search.features import FEATURES, static_features

# evaluate(layers) -> (reward, info): the episode's policy in, its reward and anything to log out
Evaluate = Callable[[dict[str, dict[str, int]]], tuple[float, dict[str, Any]]]


def action_to_bits(action: float, min_bits: int, max_bits: int) -> int:
    """Equal-width bins of [0, 1], one per bit width: [0, 1/k) → min_bits, …, [(k−1)/k, 1] → max_bits."""
    k = max_bits - min_bits + 1
    return min_bits + min(int(np.floor(float(np.clip(action, 0.0, 1.0)) * k)), k - 1)


class QuantizationEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, costs: list[cost.LayerCost], rules: Rules, budget_pct: float, evaluate: Evaluate,
                 act_bits: bool = True, fixed_a_bits: int = 8):
        super().__init__()
        self.costs, self.rules, self.budget_pct, self.evaluate = costs, rules, budget_pct, evaluate
        self.act_bits, self.fixed_a_bits = act_bits, fixed_a_bits
        self.static = static_features(costs)
        index = {c.name: i for i, c in enumerate(costs)}
        self.searched = [n for n in rules.layers if n not in rules.pinned]
        # (layer, key) per step, in forward order; weight bits first, as HAQ
        self.steps = [(n, k) for n in self.searched for k in (("w_bits", "a_bits") if act_bits else ("w_bits",))]
        self._rows = [index[n] for n, _ in self.steps]
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(len(FEATURES),), dtype=np.float32)
        self.action_space = gym.spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
        self._t = 0
        self._prev = 0.0
        self._chosen: dict[str, dict[str, int]] = {}

    def _observation(self) -> np.ndarray:
        name, key = self.steps[self._t]
        return np.concatenate([self.static[self._rows[self._t]],
                               [self._prev, float(key == "w_bits")]]).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t, self._prev = 0, 0.0
        self._chosen = {n: {"w_bits": b, "a_bits": b} for n, b in self.rules.pinned.items()}
        for n in self.searched:
            self._chosen[n] = {"w_bits": self.rules.max_bits, "a_bits": self.fixed_a_bits}
        return self._observation(), {}

    def step(self, action):
        name, key = self.steps[self._t]
        bits = action_to_bits(float(np.asarray(action).reshape(-1)[0]), self.rules.min_bits, self.rules.max_bits)
        self._chosen[name][key] = bits
        self._prev = bits / self.rules.max_bits
        self._t += 1
        if self._t < len(self.steps):
            return self._observation(), 0.0, False, False, {"layer": name, "key": key, "bits": bits}
        chosen = {n: dict(self._chosen[n]) for n in self.rules.layers}
        layers = enforce_budget(chosen, self.costs, self.rules, self.budget_pct)
        reward, info = self.evaluate(layers)
        self._t = len(self.steps) - 1  # the observation after the end repeats the last one (gymnasium asks one)
        obs = self._observation()
        self._t = len(self.steps)
        return obs, float(reward), True, False, {"chosen": chosen, "layers": layers,
                                                 "bitops_pct": cost.bitops_pct(self.costs, layers), **info}


    def trajectory(self, layers: Mapping[str, Mapping[str, int]]) -> tuple[list[np.ndarray], list[float]]:
        """Observations and actions of a finished policy, step by step, as if the agent had chosen exactly it
        (each action at the centre of its bits' bin): what the replay stores (arq.search.ddpg)."""
        k = self.rules.max_bits - self.rules.min_bits + 1
        self.reset()
        observations, actions = [], []
        for name, key in self.steps:
            observations.append(self._observation())
            actions.append((layers[name][key] - self.rules.min_bits + 0.5) / k)
            self._prev = layers[name][key] / self.rules.max_bits
            self._t += 1
        return observations, actions
