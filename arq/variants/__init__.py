"""Quantization-robust base training (Park, Jang, Park, ECCV 2022): the base variants and what each one trains with.

A base variant is the FP32 model trained with symmetry regularization (``symreg.py``), a saturating weight
nonlinearity (``satnl.py``, optionally with sharpness-aware minimization, ``sam.py``), or both. Its name says which:
``fp32`` (plain), ``fp32_symreg``, ``fp32_satnl``, ``fp32_symreg_satnl``. Every variant exports ordinary weights, so
the quantizer, the cost model, the searches, HAWQ-V3, certification and IRS treat it like any other base.

That paper's exact formulas were not available to us (its body could not be read; only its abstract and a secondary
summary): what these modules implement is our reconstruction from that description, stated in each docstring.
"""
from __future__ import annotations

from dataclasses import dataclass

BASES = ("fp32", "fp32_symreg", "fp32_satnl", "fp32_symreg_satnl")


@dataclass(frozen=True)
class Variant:
    """What a base variant trains with."""

    name: str
    symreg: bool
    satnl: bool

    @property
    def suffix(self) -> str:
        """What a name derived from this base carries after it (``_symreg_satnl``; empty for the plain base)."""
        return self.name[len("fp32"):]


def variant(name: str) -> Variant:
    if name not in BASES:
        raise ValueError(f"unknown base variant {name!r}; known: {', '.join(BASES)}")
    return Variant(name, "symreg" in name, "satnl" in name)


def settings(config: dict, base: str) -> dict:
    """The ``robust_base`` settings a variant trains with (what its checkpoint and resume file depend on)."""
    v, rb = variant(base), config["robust_base"]
    return {"symreg": rb["symreg"] if v.symreg else None, "satnl": rb["satnl"] if v.satnl else None,
            "sam": rb["sam"] if v.satnl else None}


def objective(config: dict, base: str):
    """The training objective of ``base``; None for the plain base (plain cross-entropy and SGD)."""
    from arq.variants.training import Objective

    if base == "fp32":
        return None
    s = settings(config, base)
    return Objective(s["symreg"], s["satnl"], s["sam"])
