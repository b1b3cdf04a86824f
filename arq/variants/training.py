"""What a robust base variant changes in the training step: the loss (SymReg's penalty), the weights (SatNL's
parametrization) and the step itself ((A)SAM with SatNL, as the paper combines them)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from arq.variants import sam, satnl, symreg


class Objective:
    """The training objective of one base variant: cross-entropy + weight · SymReg penalty, over weights that SatNL
    may reparametrize, stepped plainly or by (A)SAM."""

    def __init__(self, symreg_settings: dict | None, satnl_settings: dict | None, sam_settings: dict | None):
        self.symreg = symreg_settings
        self.satnl = satnl_settings
        self.sam = sam_settings

    def describe(self) -> str:
        parts = []
        if self.symreg:
            parts.append(f"SymReg (weight {self.symreg['weight']:g}, pairing {self.symreg['pairing']})")
        if self.satnl:
            parts.append(f"SatNL (tanh, {self.satnl['scale']} scale, headroom {self.satnl['headroom']:g})")
        if self.sam:
            parts.append(f"{'ASAM' if self.sam['adaptive'] else 'SAM'} (ρ {self.sam['rho']:g})")
        return ", ".join(parts)

    def prepare(self, model: nn.Module) -> None:
        """Reparametrize the quantizable layers' weights (SatNL), before the optimizer is built."""
        if self.satnl:
            satnl.attach(model, self.satnl["scale"], self.satnl["headroom"])

    def penalty(self, model: nn.Module) -> torch.Tensor:
        if not self.symreg:
            return torch.zeros((), device=next(model.parameters()).device)
        return self.symreg["weight"] * symreg.penalty(model, self.symreg["pairing"])

    def step(self, model: nn.Module, params: list, opt, x: torch.Tensor, y: torch.Tensor):
        """One optimizer step on a batch; returns (logits, cross-entropy, penalty), the last two detached."""
        seen = {}

        def closure():
            out = model(x)
            ce = F.cross_entropy(out, y)
            pen = self.penalty(model)
            (ce + pen).backward()
            seen.setdefault("first", (out.detach(), ce.detach(), pen.detach()))
            return ce

        if self.sam:
            sam.step(params, closure, opt, self.sam["rho"], self.sam["adaptive"])
        else:
            opt.zero_grad(set_to_none=True)
            closure()
            opt.step()
        return seen["first"]

    @torch.no_grad()
    def finish(self, model: nn.Module) -> dict:
        """Export SatNL's weights as ordinary ones; return what the variant reached (the bounds, the asymmetry)."""
        out = {}
        if self.satnl:
            out["satnl_bounds"] = {name: [round(w, 6), round(a, 6)] for name, (w, a) in satnl.bounds(model).items()}
            satnl.export(model)
        out["asymmetry"] = {name: round(float(symreg.asymmetry(m.weight, (self.symreg or {}).get("pairing", 1))), 8)
                            for name, m in symreg.regular_layers(model)}
        return out
