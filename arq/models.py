"""ResNet-20 for CIFAR-10 with its input normalization inside, and architecture-checked checkpoints.

Normalization lives in the model so that Gaussian noise is added in [0,1] pixel space (Cohen et al.) and
any later transformation of the network (quantization) sees the same input convention.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from arq.io import torch_save

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:  # 1×1 projection: a real layer the quantizer can address by name
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers, widths 16/32/64)."""

    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.normalize = Normalize(CIFAR10_MEAN, CIFAR10_STD)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        layers, c_in = [], 16
        for stage, c_out in enumerate((16, 32, 64)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(c_in, c_out, 2 if (i == 0 and stage > 0) else 1))
                c_in = c_out
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalized(nn.Module):
    """A torchvision network with its input normalization in front (names: ``normalize``, ``net.*``)."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def _torchvision(name: str, num_classes: int) -> nn.Module:
    import torchvision

    return Normalized(getattr(torchvision.models, name)(weights=None, num_classes=num_classes), IMAGENET_MEAN,
                      IMAGENET_STD)


ARCHITECTURES = {
    "resnet20": lambda k: ResNetCifar(20, k),
    "resnet50": lambda k: _torchvision("resnet50", k),
    "mobilenet_v2": lambda k: _torchvision("mobilenet_v2", k),
}
NUM_CLASSES = {"resnet20": 10, "resnet50": 1000, "mobilenet_v2": 1000}  # the datasets each was made for
INPUT_SHAPES = {"resnet20": (3, 32, 32), "resnet50": (3, 224, 224), "mobilenet_v2": (3, 224, 224)}


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or made for another architecture."""


def build(arch: str, num_classes: int | None = None) -> nn.Module:
    """The network ``arch`` with ``num_classes`` outputs (default: its dataset's: CIFAR-10's 10, ImageNet's 1000; a
    user's ImageFolder tree gives its own class count)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](num_classes or NUM_CLASSES[arch])


def num_classes(model: nn.Module) -> int:
    """Outputs of a network: the size of its last linear layer."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features


def save_checkpoint(path: str | Path, model: nn.Module, arch: str, **meta) -> None:
    """Write model weights with the metadata needed to trace and safely reload them (atomic); the class count is
    recorded where it differs from the architecture's default."""
    k = num_classes(model)
    extra = {"num_classes": k} if k != NUM_CLASSES[arch] else {}
    torch_save({"arch": arch, "state_dict": model.state_dict(), **extra, **meta}, path)


def load_checkpoint(path: str | Path, arch: str | None = None, map_location="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint was made for; refuse one made for a different ``arch``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict) or "arch" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not an arq checkpoint (no 'arch'/'state_dict')")
    if arch is not None and ckpt["arch"] != arch:
        raise CheckpointError(f"{path} holds a {ckpt['arch']!r} model, but {arch!r} was expected")
    try:
        model = build(ckpt["arch"], ckpt.get("num_classes"))
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    if "policy" in ckpt:  # a quantized model: recreate its quantized layers before loading their state
        from arq.quant import apply_policy

        apply_policy(model, ckpt["policy"]["layers"], ckpt.get("weight_clip", "max"))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit architecture {ckpt['arch']!r}: {exc}") from exc
    return model, {k: v for k, v in ckpt.items() if k != "state_dict"}


def load_for_stage(path: str | Path, config: dict, sigma: float | None = None, method: str | None = None,
                   log=print) -> tuple[nn.Module, dict]:
    """Load a checkpoint for a stage whose outputs claim an architecture, a σ, a method and a profile, and refuse
    one that was made for anything else (a σ=0.5 model certified into a σ=0.25 file, say)."""
    model, meta = load_checkpoint(path, config["model"]["arch"])
    if sigma is not None and ("sigma" not in meta or abs(float(meta["sigma"]) - float(sigma)) > 1e-9):
        raise CheckpointError(f"{path} was trained at σ={meta.get('sigma')}, but this stage is for σ={sigma}")
    have = meta.get("method", "fp32")
    if method is not None and have != method:
        raise CheckpointError(f"{path} holds the model {have!r}, but this stage is for {method!r}")
    profile = meta.get("profile")
    if profile is None:
        log(f"note: {path} records no profile (written by an older arq); it cannot be checked against profile "
            f"{config['profile']!r}")
    elif profile != config["profile"]:
        raise CheckpointError(f"{path} belongs to profile {profile!r}, but this run is profile {config['profile']!r}")
    return model, meta
