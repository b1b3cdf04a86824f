"""The search stage: episodes of the environment driven by an agent, checkpointed after every episode.

Methods differ only in the reward and the agent (DESIGN §5): ``arq`` = DDPG + the certified-ACR reward,
``haq`` = DDPG + HAQ's accuracy reward, ``random`` = uniform random actions + the ARQ reward (the control).
Everything else (quantizer, budget, short finetune, val images) is shared.

Outputs: a per-episode CSV, the best policy as a policy JSON, and a learning-curve figure. The agent's networks,
optimizers, replay buffer, baseline, random generators and the episode counter are saved atomically after each
episode, so an interrupted search continues from the last finished one and writes the same CSV (timings aside).
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from arq import layout, models, policy
from arq.config import config_hash, search_settings
from arq.io import origin, provenance, set_aside, sha256_file, torch_save, write_text
from arq.search.constraint import enforce_budget
from arq.data import Split, balanced, in_memory
from arq.search.ddpg import DDPG, DDPGSettings, RandomAgent
from arq.search.env import QuantizationEnv
from arq.search.evaluate import EpisodeEvaluator
from arq.train import first_images

METHODS = {"arq": ("arq", "ddpg"), "haq": ("haq", "ddpg"), "random": ("arq", "random")}  # reward, agent
FORMAT = "arq-search-state/1"
TIME_COLUMNS = ("seconds_calibrate", "seconds_finetune", "seconds_reward", "seconds_agent")


def make_agent(kind: str, obs_dim: int, steps: int, sc: dict, seed: int):
    if kind == "random":
        return RandomAgent(seed)
    return DDPG(obs_dim, steps, DDPGSettings(warmup=sc["warmup"], episodes=sc["episodes"], **sc["ddpg"]), seed)


def learning(agent, episode: int, losses: list[dict]) -> dict:
    """What the agent did this episode, as HAQ logs it: the exploration σ of its actions (empty during the warm-up
    and for the random control, whose actions are uniform) and the mean critic and actor losses of its updates."""
    explored = agent.learns and episode >= agent.s.warmup
    mean = {k: round(float(np.mean([d[k] for d in losses])), 6) if losses else "" for k in ("critic_loss", "actor_loss")}
    return {"delta": round(agent.delta(episode), 6) if explored else "", **mean}


def fingerprint(config: dict, sigma: float, method: str, budget: float, seed: int, fp32_sha: str, data_sha: str,
                cache_meta: dict | None) -> dict:
    """What a search checkpoint must match to be resumed."""
    return {"search_hash": config_hash(search_settings(config)), "sigma": sigma, "method": method,
            "budget_pct": budget, "seed": seed, "fp32_sha256": fp32_sha, "data_sha256": data_sha,
            "cache_model": (cache_meta or {}).get("model_sha256")}


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def learning_curve(rows: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from arq.io import atomic_path

    episodes = [r["episode"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(episodes, [r["reward"] for r in rows], ".", ms=3, alpha=0.6, label="reward of the episode")
    ax.plot(episodes, [r["best_reward"] for r in rows], "-", label="best so far")
    ax.set_xlabel("episode")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    plt.close(fig)


def run_search(config: dict, sigma: float, method: str, budget: float, seed: int, fp32_path: str | Path, data,
               cache_path: str | Path | None, out_csv: str | Path, out_policy: str | Path, out_png: str | Path,
               state_path: str | Path, device: torch.device, log: Callable = print,
               progress: bool = True, base: str = "fp32") -> dict:
    """Run (or resume) one search with one of its budget's seeds (``arq.layout.seeds``); write the episode CSV, the
    best policy and the learning curve. ``base`` is the FP32 variant searched from (arq.variants): the checkpoint
    must be that one."""
    from arq.irs import NOISE_SCHEME, Cache

    if method not in METHODS:
        raise ValueError(f"unknown search method {method!r}; known: {', '.join(METHODS)}")
    if seed not in layout.seeds(config, budget):
        raise ValueError(f"seed {seed} is not among the profile's seeds at budget {budget}% "
                         f"{layout.seeds(config, budget)} (search.seeds, search.seeds_by_budget)")
    reward_kind, agent_kind = METHODS[method]
    sc = config["search"]
    start = time.perf_counter()
    fp32, meta = models.load_for_stage(fp32_path, config, sigma, base, log)
    fp32_sha, data_sha = sha256_file(fp32_path), data.manifest["file_sha256"]
    cache = None
    if reward_kind == "arq":
        if cache_path is None:
            raise ValueError(f"the {method} search needs the FP32 model's IRS cache")
        cache = Cache.load(cache_path, {"model_sha256": fp32_sha, "data_sha256": data_sha, "device": device.type,
                                        "noise_scheme": NOISE_SCHEME, "split": "val"})
        val = Split(data.val.x[cache.idx], data.val.y[cache.idx])  # the search scores on val only, never on test
    else:  # HAQ's accuracy reward: its own class-balanced val set
        val = in_memory(balanced(data.val, sc["haq_images"]))
    # an episode's finetune draws random batches from these images, held on the device (a streamed tree's are
    # decoded once, so search.finetune.train_images must be set for one)
    train = in_memory(first_images(data.train, sc["finetune"]["train_images"]))
    costs, rules = policy.for_config(config)
    enforce_budget(policy.cheapest_layers(rules), costs, rules, budget)  # an unreachable budget fails before any work
    evaluator = EpisodeEvaluator(fp32, config, sigma, train, val, len(data.manifest["classes"]), device, reward_kind,
                                 seed, cache)
    env = QuantizationEnv(costs, rules, budget, evaluator, sc["act_bits"], sc["fixed_a_bits"])
    agent = make_agent(agent_kind, env.observation_space.shape[0], len(env.steps), sc, seed)
    fp = fingerprint(config, sigma, method, budget, seed, fp32_sha, data_sha, cache.meta if cache else None)

    rows, best, first = [], None, 0
    state_path = Path(state_path)
    if state_path.exists():
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or state.get("format") != FORMAT:
                raise ValueError("not a search checkpoint")
        except Exception as exc:
            set_aside([state_path], f"it cannot be read as a search checkpoint ({type(exc).__name__}: {exc})", log)
            state = None
        if state is not None and state["fingerprint"] != fp:
            log(f"ignoring {state_path}: it was made with other search settings, model, data or cache; "
                "starting afresh")
        elif state is not None:
            agent.load_state_dict(state["agent"])
            rows, best, first = state["rows"], state["best"], state["episode"]
            log(f"resuming from {state_path} after episode {first} of {sc['episodes']}")

    log(f"search {method} (reward {reward_kind}, agent {agent_kind}, seed {seed}) at σ={sigma}, budget {budget}% of "
        f"FP32 BitOps, {len(env.steps)} steps per episode, {sc['episodes']} episodes ({sc['warmup']} warm-up), "
        f"on {device}")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sc["episodes"], initial=first, desc=f"search {method} σ={sigma}", unit="ep", mininterval=5)
    for episode in range(first, sc["episodes"]):
        obs, _ = env.reset()
        t_agent = 0.0
        while True:
            t0 = time.perf_counter()
            a = agent.act(obs, episode)
            t_agent += time.perf_counter() - t0
            obs, reward, done, _, info = env.step(np.array([a], dtype=np.float32))
            if done:
                break
        layers = info["layers"]
        t0 = time.perf_counter()
        losses = []
        if agent.learns:
            observations, actions = env.trajectory(layers)
            agent.remember(observations, actions, reward)
            if episode >= sc["warmup"]:
                losses = [agent.update() for _ in range(len(actions))]
        t_agent += time.perf_counter() - t0
        if best is None or reward > best["reward"]:
            best = {"episode": episode + 1, "reward": reward, "layers": layers, "bitops_pct": info["bitops_pct"],
                    **{k: info[k] for k in ("acr", "acr_fp32", "top1", "top1_fp32") if k in info}}
        names = rules.layers
        row = {"episode": episode + 1, "reward": round(reward, 6), "best_reward": round(best["reward"], 6),
               "metric": round(info.get("acr", info.get("top1", float("nan"))), 6),
               "bitops_pct": round(info["bitops_pct"], 6),
               "w_bits": "/".join(str(layers[n]["w_bits"]) for n in names),
               "a_bits": "/".join(str(layers[n]["a_bits"]) for n in names),
               **learning(agent, episode, losses),
               **{f"seconds_{k}": round(v, 3) for k, v in info["seconds"].items()}, "seconds_agent": round(t_agent, 3)}
        rows.append(row)
        torch_save({"format": FORMAT, "fingerprint": fp, "episode": episode + 1, "agent": agent.state_dict(),
                    "rows": rows, "best": best}, state_path)
        if bar is not None:
            bar.set_postfix(reward=f"{reward:.4f}", best=f"{best['reward']:.4f}", refresh=False)
            bar.update(1)
        else:
            log(f"episode {episode + 1}/{sc['episodes']}: reward {reward:.4f}, best {best['reward']:.4f}, "
                f"{info['bitops_pct']:.3f}% BitOps")
    if bar is not None:
        bar.close()
    _write_csv(Path(out_csv), rows)
    seconds = {c: round(sum(r[c] for r in rows) / len(rows), 3) for c in TIME_COLUMNS}
    doc = policy.make(best["layers"], costs, rules, f"search {method}", method=method, reward_kind=reward_kind,
                      agent=agent_kind, sigma=sigma, budget_pct=budget, seed=seed, episodes=len(rows),
                      episode=best["episode"],
                      reward=best["reward"], **{k: best[k] for k in ("acr", "acr_fp32", "top1", "top1_fp32")
                                                 if k in best},
                      seconds_per_episode=seconds,
                      **provenance(config, device, time.perf_counter() - start, {"model": origin(fp32_path, meta)}))
    policy.save(out_policy, doc)
    learning_curve(rows, Path(out_png), f"{method} search, σ={sigma}, budget {budget}% BitOps, seed {seed}")
    return doc
