"""The certification engine (arq.engine.Engine): layouts and faster numerics, and what they do to results."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from arq import config as config_mod
from arq import irs, models, quant
from arq.engine import Engine, Executed
from arq.smoothing import Smooth

SIGMA = 0.25
CPU = torch.device("cpu")


def _small_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = models.build("resnet20").eval()
    for m in model.modules():  # non-trivial BN statistics, so folding them (compile) is really exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _w4a4(model: nn.Module) -> nn.Module:
    q = copy.deepcopy(model)
    layers = {name: {"w_bits": 4, "a_bits": 4} for name in quant.quantizable_layers(q)}
    quant.apply_policy(q, layers)
    quant.calibrate(q, [torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))], "max")
    return q.eval()


def _noisy(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, 32, 32, generator=g) + SIGMA * torch.randn(n, 3, 32, 32, generator=g)


def test_default_engine_is_channels_last_float32_eager():
    e = Engine()
    assert e.describe() == {"channels_last": True, "compile": False, "dtype": "float32"}
    run = e.prepare(_small_resnet(), CPU)
    assert isinstance(run, Executed) and not run.training


def test_engine_from_config_reads_the_profile(paper_config, smoke_config):
    for cfg in (paper_config, smoke_config):
        assert Engine.from_config(cfg) == Engine(**cfg["engine"])


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="engine.dtype"):
        Engine(dtype="int8")


def test_schema_names_a_bad_engine_key(paper_config):
    bad = copy.deepcopy(paper_config)
    bad["engine"]["dtype"] = "float64"
    with pytest.raises(config_mod.ConfigError, match="engine.dtype"):
        config_mod.validate(bad)
    bad = copy.deepcopy(paper_config)
    del bad["engine"]["compile"]
    with pytest.raises(config_mod.ConfigError, match="engine"):
        config_mod.validate(bad)


@pytest.mark.parametrize("quantized", [False, True])
def test_channels_last_changes_layout_not_results(quantized):
    model = _small_resnet()
    if quantized:
        model = _w4a4(model)
    x = _noisy(64)
    with torch.inference_mode():
        eager = model(x)
        run = Engine().prepare(copy.deepcopy(model), CPU)
        out = run(x)
    assert out.dtype == torch.float32
    if not quantized:
        torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    else:  # another summation order can push an activation across a rounding boundary: one code step away
        assert torch.isclose(out, eager, rtol=1e-4, atol=1e-4).float().mean() >= 0.9
    assert (out.argmax(1) == eager.argmax(1)).float().mean() >= 0.9


def test_prepare_shares_the_weights_it_is_given():
    model = _small_resnet()
    run = Engine(channels_last=False).prepare(model, CPU)
    assert run.model is model  # no hidden copy: the certified network is the one passed in


def test_bfloat16_runs_the_network_in_reduced_precision():
    model = _small_resnet()
    x = _noisy(32)
    with torch.inference_mode():
        eager = model(x)
        out = Engine(dtype="bfloat16").prepare(copy.deepcopy(model), CPU)(x)
    assert out.dtype == torch.float32  # logits come back as float32
    assert not torch.equal(out, eager)  # the arithmetic really changed ...
    torch.testing.assert_close(out, eager, rtol=0.1, atol=0.15)  # ... within bf16's precision


def test_compiled_quantized_network_matches_eager_and_certifies():
    """Compilation (frozen weights, BN folded, quantized weights constant-folded) keeps the network's function up
    to rounding, and the weight cache of the quantized layers does not break tracing."""
    model = _w4a4(_small_resnet())
    x = _noisy(50)
    run = Engine(compile=True).prepare(copy.deepcopy(model), CPU)
    with torch.inference_mode():
        eager, compiled = model(x), run(x)
    # a quantized network is piecewise constant: where folding batch norm moves an activation across a rounding
    # boundary by one float ulp, it lands on the neighbouring code, so a few logits move by a quantization step
    close = torch.isclose(compiled, eager, rtol=1e-3, atol=1e-3)
    assert close.float().mean() >= 0.9
    assert (compiled.argmax(1) == eager.argmax(1)).float().mean() >= 0.9
    counts = Smooth(run, 10, SIGMA, 50).sample_counts(x[0], 100, torch.Generator().manual_seed(0))
    assert int(counts.sum()) == 100


def test_irs_replays_the_same_noise_under_any_engine():
    """Noise is drawn in float32 outside the network, so a bf16 or channels-last f_p sees the cached inputs."""
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            seen.append(x.detach().float().contiguous().clone())
            return torch.stack([x.flatten(1).mean(1), -x.flatten(1).mean(1)], 1)

    x = torch.rand(3, 4, 4)
    for engine in (Engine(channels_last=False), Engine(), Engine(dtype="bfloat16")):
        irs.predictions(engine.prepare(Recorder(), CPU), x, SIGMA, 1, 7, 1, 200, 100, 2)
    assert len(seen) == 3
    assert torch.equal(seen[0], seen[1])
    # under autocast the Recorder still receives the float32 input (only convolutions and matmuls are cast)
    assert torch.equal(seen[0], seen[2])
