"""Random streams: no two stages (or images, epochs, chunks) share a generator, whatever the configured seeds."""
from __future__ import annotations

import pytest
import torch

from arq import certify, irs, rng, train


def _stage_seeds(cfg: dict) -> dict[str, int]:
    """The generator seed of every stream a profile's stages draw, by (stage, index)."""
    seeds = {}
    for i in range(0, 10_000, 20):  # the certification subset (CERTIFY and PREDICT)
        seeds[f"certify {i}"] = rng.derive_seed("certify", cfg["certify"]["seed"], i)
        seeds[f"predict {i}"] = rng.derive_seed("predict", cfg["certify"]["seed"], i)
    for e in range(cfg["train"]["epochs"]):
        seeds[f"train epoch {e}"] = rng.derive_seed("train", cfg["train"]["seed"], e)
    for e in range(max(cfg["finetune"]["epochs"], 1)):
        seeds[f"finetune epoch {e}"] = rng.derive_seed("finetune", cfg["finetune"]["seed"], e)
    seeds["calibration"] = rng.derive_seed("calibrate", cfg["finetune"]["seed"])
    seeds["finetune eval"] = rng.derive_seed("finetune-eval", cfg["finetune"]["seed"])
    for i in range(50):
        for stream in (irs.SELECTION_STREAM, 1, 2, irs.FRESH_BASE):
            seeds[f"irs {i}/{stream}"] = irs.noise_seed(cfg["irs"]["seed"], i, stream)
    return seeds


@pytest.mark.parametrize("profile", ["paper_config", "smoke_config"])
def test_default_seeds_of_all_stages_give_pairwise_distinct_streams(profile, request):
    seeds = _stage_seeds(request.getfixturevalue(profile))
    assert len(set(seeds.values())) == len(seeds)


def test_equal_seeds_no_longer_share_noise(smoke_config):
    """The old formulas gave test image 0 the calibration noise (bare seed 0) and training epoch k the noise of
    test image k (seed·1,000,003 + k): with every seed 0 the first draws now differ."""
    cpu = torch.device("cpu")
    draws = {
        "certify image 0": certify.image_generator(0, 0, cpu),
        "predict image 0": certify.image_generator(0, 0, cpu, "predict"),
        "calibration": rng.generator("calibrate", 0),
        "train epoch 0": train.epoch_generator("train", 0, 0, cpu),
        "finetune epoch 0": train.epoch_generator("finetune", 0, 0, cpu),
        "finetune eval": rng.generator("finetune-eval", 0),
    }
    first = {name: torch.randn(2000, generator=g) for name, g in draws.items()}
    names = list(first)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            assert int((first[names[a]] == first[names[b]]).sum()) == 0, (names[a], names[b])


def test_a_stream_is_reproducible_and_an_unknown_purpose_is_refused():
    a = torch.randn(5, generator=rng.generator("train", 3, 7))
    assert torch.equal(a, torch.randn(5, generator=rng.generator("train", 3, 7)))
    assert 0 <= rng.derive_seed("irs", 0, 1, 2) < 2 ** 63
    with pytest.raises(ValueError, match="unknown random-stream purpose 'trian'"):
        rng.derive_seed("trian", 0)
