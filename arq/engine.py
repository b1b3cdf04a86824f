"""How the base classifier is executed while sampling noise: memory layout, compilation and numerics."""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Executed(nn.Module):
    """The base network as the engine runs it: inputs in the chosen memory layout, convolutions and matrix
    products under autocast when a reduced dtype is chosen. Logits come back as float32."""

    def __init__(self, model: nn.Module, channels_last: bool, dtype: torch.dtype):
        super().__init__()
        self.model, self.channels_last, self.dtype = model, channels_last, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype == torch.float32:
            return self.model(x)
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x).float()


@dataclass(frozen=True)
class Engine:
    """How the base classifier f is executed while sampling (config section ``engine``).

    A certificate is a statement about the classifier *as executed*. Channels-last only changes the memory
    layout (the arithmetic is the same up to summation order). ``compile`` (TorchInductor with frozen weights:
    batch norm folded into the convolutions, fused kernels) and a reduced ``dtype`` change the arithmetic, so a
    few noisy samples near a decision boundary can be classified differently than by the eager float32
    network: the certified classifier is then that compiled or reduced-precision network, which is what the
    summaries record (``engine``) and what must be deployed for the certificate to apply."""

    channels_last: bool = True
    compile: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"engine.dtype must be one of {sorted(DTYPES)}, not {self.dtype!r}")

    @classmethod
    def from_config(cls, config: dict) -> "Engine":
        return cls(**config["engine"])

    def describe(self) -> dict:
        return asdict(self)

    def prepare(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The executable form of ``model`` on ``device`` (eval mode; the weights are shared, not copied)."""
        model = model.to(device).eval()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        run = Executed(model, self.channels_last, DTYPES[self.dtype]).eval()
        if self.compile:
            # one graph per batch shape (a certification uses two or three); frozen weights let Inductor fold
            # batch norm and pre-pack convolution weights
            run = torch.compile(run, dynamic=False, options={"freezing": True})
        return run


def model_device(model: nn.Module) -> torch.device:
    """Where a model's tensors live; CPU for a model without parameters or buffers (a fixed function)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")
