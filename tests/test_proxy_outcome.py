"""benchmarks/proxy_outcome.py: the policy selection, the ρ intervals, the pooling of batches and the resume files,
on hand-made rows (the study itself runs for an hour; its committed results are checked in test_artifacts)."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import proxy_outcome as po  # noqa: E402


def _row(reward: float, acr: float, w2: int, a2: int) -> dict:
    return {"w_bits": [8] + [2] * w2 + [4] * (6 - w2) + [8], "a_bits": [8] + [2] * a2 + [4] * (6 - a2) + [8],
            "proxies": {"today": {"reward": reward, "seconds": 10.0}, "bn": {"reward": -reward, "seconds": 11.0}},
            "outcome_acr": acr}


def _summary(seed: int, rows: list[dict]) -> dict:
    names = ("today", "bn")
    return {"proxies": {n: {"description": n, "settings": {"finetune": {}, "search": {}, "irs": {}, "reward": "arq"},
                            "spearman": po.spearman_interval([r["proxies"][n]["reward"] for r in rows],
                                                             [r["outcome_acr"] for r in rows], 200, seed)}
                        for n in names},
            "rows": rows, "budget_pct": 1.0, "sigma": 0.25, "profile": "cpu", "config_hash": "abc",
            "outcome": {"images": 100, "n": 2000}, "args": {"seed": seed}, "git_commit": "x", "device": "cpu",
            "wall_seconds_this_run": 1.0}


def test_spread_takes_evenly_spaced_ranks_with_both_ends():
    scores = [5.0, 1.0, 3.0, 9.0, 7.0, 2.0]
    picked = po.spread(scores, 3)
    assert 1 in picked and 3 in picked  # the lowest and the highest score
    assert len(picked) == 3


def test_one_batch_stratified_interval_is_the_plain_one_and_brackets_rho():
    g = np.random.default_rng(0)
    x = g.normal(size=14)
    y = x + g.normal(size=14)
    plain = po.spearman_interval(x, y, 500, 3)
    assert plain == po.stratified_spearman_interval([(x, y)], 500, 3)
    assert plain["rho"] == pytest.approx(spearmanr(x, y)[0], abs=1e-4)
    assert plain["low"] < plain["rho"] < plain["high"]


def test_stratified_resampling_keeps_each_batch_its_own_items():
    # batch A holds only x in 0..9, batch B only x in 100..109: a resample that mixed them could draw 20 items of A
    a = (list(range(10)), list(range(10)))
    b = (list(range(100, 110)), list(range(100, 110)))
    r = po.stratified_spearman_interval([a, b], 300, 0)
    assert r["rho"] == 1.0 and r["low"] == 1.0 and r["undefined_resamples"] == 0


def test_bits_fidelity_counts_two_bit_layers():
    rows = [_row(-i, 0.2 + 0.01 * i, w2=i, a2=5 - i) for i in range(5)]
    fid = po.bits_fidelity(rows, ["today"])
    assert po.two_bit_layers(rows[3]) == {"w2": 3, "a2": 2}
    assert fid["outcome"] == {"w2": 1.0, "a2": -1.0}
    assert fid["today"] == {"w2": -1.0, "a2": 1.0}


def test_combine_pools_the_batches_and_keeps_each_batch_rho():
    g = np.random.default_rng(1)
    batches = []
    for seed in (0, 1):
        acr = g.uniform(0.18, 0.23, 12)
        batches.append(_summary(seed, [_row(a * 10 + g.normal(0, 0.05), a, 1, 1) for a in acr]))
    out = po.combine(batches, 300, 0)
    rows = batches[0]["rows"] + batches[1]["rows"]
    assert out["policies"] == 24 and out["batches"] == [0, 1]
    rho = spearmanr([r["proxies"]["today"]["reward"] for r in rows], [r["outcome_acr"] for r in rows])[0]
    assert out["proxies"]["today"]["spearman"]["rho"] == pytest.approx(rho, abs=1e-4)
    assert out["proxies"]["bn"]["spearman"]["rho"] == pytest.approx(-rho, abs=1e-4)
    assert out["proxies"]["today"]["per_batch"]["1"] == batches[1]["proxies"]["today"]["spearman"]
    assert out["proxies"]["bn"]["seconds_per_episode"] == 11.0
    assert out["bits"]["outcome"] == {"w2": None, "a2": None}  # every row has one W2 and one A2 layer
    assert out["outcome"]["acr_range"] == [min(r["outcome_acr"] for r in rows), max(r["outcome_acr"] for r in rows)]


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(config_hash="other"), "config_hash"),
    (lambda s: s["outcome"].update(n=500), "outcome"),
    (lambda s: s["outcome"].update(acr_range=[0.1, 0.2]), None),  # measured, not a setting: combines
    (lambda s: s["proxies"]["bn"]["settings"].update(reward="haq"), "different proxies"),
    (lambda s: s["args"].update(seed=0), "share a --seed"),
])
def test_combine_refuses_batches_of_another_study(change, message):
    a = _summary(0, [_row(-i, 0.2 + 0.01 * i, 1, 1) for i in range(4)])
    b = copy.deepcopy(a)
    b["args"]["seed"] = 1
    change(b)
    if message is None:
        assert po.combine([a, b], 50, 0)["policies"] == 8
        return
    with pytest.raises(SystemExit, match=message):
        po.combine([a, b], 50, 0)
    with pytest.raises(SystemExit, match="at least two"):
        po.combine([a], 50, 0)


def test_a_torn_resume_line_is_dropped_from_the_file(tmp_path):
    study = po.Study.__new__(po.Study)
    study.fingerprint = {"config_hash": "abc"}
    path = tmp_path / "out.json.rows.jsonl"
    good = [{"fingerprint": study.fingerprint, "policy": k} for k in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"fingerprint": {"conf')
    assert study._read(path) == good
    assert path.read_text().splitlines() == [json.dumps(r) for r in good]  # the next append starts a clean line
    other = tmp_path / "other.rows.jsonl"
    other.write_text(json.dumps({"fingerprint": {"config_hash": "zzz"}, "policy": 0}) + "\n")
    with pytest.raises(SystemExit, match="other settings"):
        study._read(other)
