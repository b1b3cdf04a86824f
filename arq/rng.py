"""Random streams: every generator of the pipeline is derived from (purpose, seed, index…) by a hash.

Seeds are config, and several stages default to the same seed (0). A bare ``seed`` or ``seed·k + index``
formula would hand two stages the same stream (certification of test image k and training epoch k, say), so
their noise would be correlated. Hashing the purpose in separates the domains: no two (purpose, seed, index)
triples share a generator, whatever the seeds are.
"""
from __future__ import annotations

import hashlib

import torch

# Every purpose a stage draws noise for; derive_seed refuses others so a typo cannot alias a stream.
PURPOSES = ("train", "finetune", "finetune-eval", "calibrate", "certify", "predict", "irs", "search-calibrate",
            "search-finetune", "search-bn", "search-cohen", "search-agent", "hessian-noise", "hessian-probes",
            "fidelity-outcome", "finetune-base")


def derive_seed(purpose: str, seed: int, *index: int) -> int:
    """A 63-bit generator seed for one stream of one purpose."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown random-stream purpose {purpose!r}; known: {', '.join(PURPOSES)}")
    text = ":".join(["arq", purpose, str(int(seed)), *(str(int(i)) for i in index)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def generator(purpose: str, seed: int, *index: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(purpose, seed, *index))
