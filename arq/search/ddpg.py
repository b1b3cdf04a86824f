"""DDPG with HAQ's settings: the agent that proposes bits, and the random control that shares its interface.

Actor and critic are 300-300 MLPs (sigmoid actor output, critic taking state and action through separate first
layers, summed). Adam 1e-4 / 1e-3, soft target updates τ = 0.01, discount 1. Every transition of an episode is
stored with the episode's final reward; a moving-average baseline is subtracted from sampled rewards; updates
run at episode end, one per stored transition, after the warm-up episodes. Exploration: uniform actions during
warm-up, then a truncated normal on [0, 1] around the actor's output with σ = δ₀ · d^(episode − warm-up).

HAQ fixes d = 0.99 (``delta_final: null``), which suits its 600 episodes (δ ends near .0015) but leaves a short
search exploring as widely at its end as in its middle (δ = .23 at episode 100 of 100). With ``delta_final`` set,
d is chosen so that δ falls from δ₀ at the first learned episode to exactly ``delta_final`` at the last one
(d = (δ_final/δ₀)^(1/(episodes − warm-up − 1))): a deviation from HAQ, so that every search length converges.

Where this differs from HAQ's code: transitions are stored with the actions of the policy that was evaluated
(the bits after budget enforcement, as the centres of their action bins, and observations whose previous-bits
feature follows them), not the raw actor outputs, so the critic learns the value of what was rewarded. The
replay buffer keeps explicit next observations, so HAQ's dummy end-of-episode transition is not needed. All
randomness comes from the agent's own generators (no global RNG), so a checkpointed agent resumes exactly.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import truncnorm
from torch import nn


@dataclass(frozen=True)
class DDPGSettings:
    hidden: int = 300
    lr_actor: float = 1e-4
    lr_critic: float = 1e-3
    tau: float = 0.01
    discount: float = 1.0
    batch_size: int = 64
    replay_per_step: int = 128  # replay capacity = this × steps per episode
    warmup: int = 20  # episodes with uniform random actions
    init_delta: float = 0.5
    delta_decay: float = 0.99  # HAQ's fixed decay per episode, used when delta_final is None
    delta_final: float | None = None  # else: δ at the last episode, the decay following the episode count
    episodes: int = 600  # the search's length (for delta_final)
    baseline_alpha: float = 0.5  # moving average of sampled batch rewards


class Actor(nn.Module):
    def __init__(self, obs_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


class Critic(nn.Module):
    def __init__(self, obs_dim: int, hidden: int):
        super().__init__()
        self.fc_obs, self.fc_act = nn.Linear(obs_dim, hidden), nn.Linear(1, hidden)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc_obs(obs) + self.fc_act(action))


class Replay:
    """A ring buffer of (obs, action, reward, next obs, done) as numpy arrays (easy to checkpoint)."""

    def __init__(self, capacity: int, obs_dim: int):
        self.capacity, self.size, self.head = capacity, 0, 0
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.action = np.zeros((capacity, 1), np.float32)
        self.reward = np.zeros((capacity, 1), np.float32)
        self.done = np.zeros((capacity, 1), np.float32)

    def add(self, obs, action, reward, next_obs, done) -> None:
        i = self.head
        self.obs[i], self.action[i], self.reward[i], self.next_obs[i], self.done[i] = obs, action, reward, next_obs, done
        self.head = (self.head + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        i = rng.choice(self.size, size=min(batch, self.size), replace=False)
        return self.obs[i], self.action[i], self.reward[i], self.next_obs[i], self.done[i]

    ARRAYS = ("obs", "next_obs", "action", "reward", "done")

    def state_dict(self) -> dict:
        """Arrays as tensors, so that a checkpoint loads with torch.load(weights_only=True)."""
        return {"capacity": self.capacity, "size": self.size, "head": self.head,
                **{k: torch.from_numpy(getattr(self, k).copy()) for k in self.ARRAYS}}

    def load_state_dict(self, state: dict) -> None:
        self.capacity, self.size, self.head = state["capacity"], state["size"], state["head"]
        for k in self.ARRAYS:
            setattr(self, k, state[k].numpy().copy())


def _soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters()):
            t.mul_(1 - tau).add_(s, alpha=tau)


class DDPG:
    """The learning agent. ``act`` explores, ``remember`` stores an episode, ``update`` trains (CPU: tiny nets)."""

    learns = True

    def __init__(self, obs_dim: int, steps_per_episode: int, settings: DDPGSettings, seed: int):
        self.s = settings
        with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the global generator
            torch.manual_seed(seed)
            self.actor, self.critic = Actor(obs_dim, settings.hidden), Critic(obs_dim, settings.hidden)
        self.actor_target, self.critic_target = copy.deepcopy(self.actor), copy.deepcopy(self.critic)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=settings.lr_actor)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=settings.lr_critic)
        self.replay = Replay(settings.replay_per_step * steps_per_episode, obs_dim)
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.baseline: float | None = None

    def delta(self, episode: int) -> float:
        """The exploration σ of a learned episode (0-based; episodes before the warm-up ends explore uniformly)."""
        return self.s.init_delta * self.decay() ** max(episode - self.s.warmup, 0)

    def decay(self) -> float:
        if self.s.delta_final is None:
            return self.s.delta_decay
        learned = self.s.episodes - self.s.warmup
        return 1.0 if learned <= 1 else (self.s.delta_final / self.s.init_delta) ** (1.0 / (learned - 1))

    def act(self, obs: np.ndarray, episode: int) -> float:
        if episode < self.s.warmup:
            return float(self.rng.uniform(0.0, 1.0))
        with torch.no_grad():
            mu = float(self.actor(torch.as_tensor(obs, dtype=torch.float32)[None])[0, 0])
        sd = self.delta(episode)
        return float(truncnorm.rvs((0.0 - mu) / sd, (1.0 - mu) / sd, loc=mu, scale=sd, random_state=self.rng))

    def remember(self, observations: list[np.ndarray], actions: list[float], reward: float) -> None:
        """Store one episode: every step with the episode's reward; the last one terminal."""
        for t, (obs, a) in enumerate(zip(observations, actions)):
            last = t == len(actions) - 1
            self.replay.add(obs, a, reward, observations[t] if last else observations[t + 1], float(last))

    def update(self) -> dict:
        """One DDPG step on a sampled batch; returns the losses for the log."""
        obs, action, reward, next_obs, done = (torch.as_tensor(a) for a in self.replay.sample(self.s.batch_size,
                                                                                               self.rng))
        mean = float(reward.mean())
        self.baseline = mean if self.baseline is None else self.baseline + self.s.baseline_alpha * (mean -
                                                                                                   self.baseline)
        with torch.no_grad():
            target = (reward - self.baseline) + self.s.discount * (1 - done) * self.critic_target(
                next_obs, self.actor_target(next_obs))
        critic_loss = nn.functional.mse_loss(self.critic(obs, action), target)
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        actor_loss = -self.critic(obs, self.actor(obs)).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        _soft_update(self.actor_target, self.actor, self.s.tau)
        _soft_update(self.critic_target, self.critic, self.s.tau)
        return {"critic_loss": float(critic_loss.detach()), "actor_loss": float(actor_loss.detach())}

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "actor_target": self.actor_target.state_dict(), "critic_target": self.critic_target.state_dict(),
                "actor_opt": self.actor_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
                "replay": self.replay.state_dict(), "rng": self.rng.bit_generator.state, "baseline": self.baseline}

    def load_state_dict(self, state: dict) -> None:
        for name in ("actor", "critic", "actor_target", "critic_target", "actor_opt", "critic_opt"):
            getattr(self, name).load_state_dict(state[name])
        self.replay.load_state_dict(state["replay"])
        self.rng.bit_generator.state = state["rng"]
        self.baseline = state["baseline"]


class RandomAgent:
    """The control: uniform random actions in every episode, no learning (same environment and reward)."""

    learns = False

    def __init__(self, seed: int):
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def act(self, obs: np.ndarray, episode: int) -> float:
        return float(self.rng.uniform(0.0, 1.0))

    def remember(self, observations, actions, reward) -> None:
        pass

    def update(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
