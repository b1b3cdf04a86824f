"""Noise-augmented training of the base classifier (Cohen et al.'s recipe), resumable per epoch.

The whole training split stays on the device as uint8; cropping, flipping and Gaussian noise are done on
the device per batch, so a GPU never waits on the host. Randomness of epoch e comes from a generator
derived from (stage, seed, e) (arq.rng), so a run resumed from the checkpoint of epoch e-1 repeats an uninterrupted run.
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from arq import models, quant, rng, variants
from arq.config import ConfigError, config_hash
from arq.data import Prepared, Split, balanced, streamed
from arq.io import origin, provenance, set_aside, torch_save, write_json, write_text
from arq.layout import parse

if TYPE_CHECKING:
    from arq.variants.training import Objective


def epoch_generator(stream: str, seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The generator of one epoch of a training loop (``stream``: 'train' or 'finetune', see arq.rng)."""
    return rng.generator(stream, seed, epoch, device=device)


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, batched on x's device; uint8 → [0,1]."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device)
    flip = torch.rand(b, generator=gen, device=x.device) < 0.5
    rows = (oy[:, None] + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    cols = ox[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols).view(b, 1, 1, w)
    out = xp[torch.arange(b, device=x.device).view(b, 1, 1, 1), torch.arange(c, device=x.device).view(1, c, 1, 1),
             rows, cols]
    return out.float().div_(255)


@torch.inference_mode()
def noisy_accuracy(model: nn.Module, split: Split, sigma: float, batch_size: int, gen: torch.Generator) -> float:
    """Top-1 accuracy of the base classifier on x + N(0, σ²) (one draw per image)."""
    was_training = model.training
    model.eval()
    correct = 0
    for x, y in _eval_batches(split, batch_size, gen.device):
        x = x + sigma * torch.randn(x.shape, generator=gen, device=x.device)
        correct += (model(x).argmax(1) == y).sum().item()
    model.train(was_training)
    return correct / len(split)


def _eval_batches(split, batch_size: int, device: torch.device):
    """(images in [0,1], labels) in order, on ``device``."""
    if streamed(split):
        for x, y in split.loader(batch_size, train=False):
            yield x.to(device, non_blocking=True).float().div_(255), y.to(device, non_blocking=True)
        return
    for i in range(0, len(split), batch_size):
        yield split.x[i:i + batch_size].float().div_(255), split.y[i:i + batch_size]


def _train_batches(split, batch_size: int, gen: torch.Generator, device: torch.device):
    """One epoch of augmented (images in [0,1], labels) on ``device``, in an order drawn from ``gen``.

    An in-memory split is permuted, cropped with padding and flipped on the device (CIFAR's augmentation); a
    streamed one is shuffled and augmented (random-resized crop, flip) by its DataLoader's workers, seeded from
    ``gen`` so an epoch's batches repeat."""
    if streamed(split):
        seed = int(torch.randint(2**62, (1,), generator=gen, device=gen.device).item())
        for x, y in split.loader(batch_size, train=True, seed=seed):
            yield x.to(device, non_blocking=True).float().div_(255), y.to(device, non_blocking=True)
        return
    perm = torch.randperm(len(split), generator=gen, device=device)
    for i in range(0, len(split), batch_size):
        idx = perm[i:i + batch_size]
        yield augment(split.x[idx], gen), split.y[idx]


def _train_fingerprint(config: dict, sigma: float, data_sha: str, base: str = "fp32", init: dict | None = None) -> dict:
    """What a resume checkpoint must match: same recipe (a robust variant's settings included), same σ, same data,
    and for a noise finetune of an imported model the same imported weights."""
    recipe = {"train": config["train"], "model": config["model"]}
    if base != "fp32":
        recipe["robust_base"] = variants.settings(config, base)
    if init is not None:
        recipe = {"pretrained": config["pretrained"], "model": config["model"], "init": init}
    return {"train_hash": config_hash(recipe), "sigma": sigma, "data_sha256": data_sha,
            **({"base": base} if base != "fp32" else {})}


def _to_device(split: Split, device: torch.device) -> Split:
    """An in-memory split moved to ``device``; a streamed one stays where it is (its batches move)."""
    return split if streamed(split) else Split(split.x.to(device), split.y.to(device))


def first_images(split: Split, k: int | None) -> Split:
    """The first ``k`` images of a split (all of them when k is None); the train splits are kept in a seeded
    random order, so these are a random subset."""
    if k is None:
        return split
    return split.subset(range(min(k, len(split)))) if streamed(split) else Split(split.x[:k], split.y[:k])


def _try_resume(resume_path: Path, fingerprint: dict, model: nn.Module, opt, sched, device: torch.device,
                log) -> tuple[list[dict], int]:
    """(history, epochs done) from a matching resume checkpoint; ([], 0) when there is none or it differs."""
    if not resume_path.exists():
        return [], 0
    try:
        ckpt = torch.load(resume_path, map_location=device, weights_only=True)
        if not isinstance(ckpt, dict) or not {"fingerprint", "epoch", "state_dict", "optimizer", "scheduler",
                                              "history"} <= set(ckpt):
            raise ValueError("not a resume checkpoint of this stage")
    except Exception as exc:  # a truncated or foreign file: torch raises many types
        set_aside([resume_path], f"it cannot be read as a resume checkpoint ({type(exc).__name__}: {exc})", log)
        return [], 0
    if ckpt.get("fingerprint") != fingerprint:
        log(f"ignoring {resume_path}: it was made with another recipe, σ, policy or dataset; starting afresh")
        return [], 0
    model.load_state_dict(ckpt["state_dict"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    log(f"resuming from {resume_path} after epoch {ckpt['epoch']}")
    return ckpt["history"], ckpt["epoch"]


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite: the stage stops instead of writing a model of NaN weights."""


def run_epochs(model: nn.Module, opt, sched, train_split: Split, val_split: Split, sigma: float, stream: str,
               seed: int, epochs: int, batch_size: int, device: torch.device, log=print, first_epoch: int = 0,
               history: list[dict] | None = None, on_epoch=None, objective: Objective | None = None
               ) -> list[dict]:
    """The training loop every stage shares (base training, QAT finetune, search episodes).

    Each epoch: crop/flip + N(0, σ²) noise on the device, SGD steps, then noisy accuracy on ``val_split``.
    ``stream`` names the random stream (arq.rng purpose) so that two stages with equal seeds draw different noise.
    ``on_epoch(epoch, history)`` runs after each epoch (the stages save their resume checkpoint there).
    ``objective`` (a robust base variant's) adds a penalty to the cross-entropy and may make each step an (A)SAM
    step; the history then also holds the penalty's mean."""
    history = list(history or [])
    n, bs = len(train_split), batch_size
    params = [p for p in model.parameters() if p.requires_grad]
    for epoch in range(first_epoch, epochs):
        model.train()
        gen = epoch_generator(stream, seed, epoch, device)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        penalty_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        for x, y in _train_batches(train_split, bs, gen, device):
            x = x + sigma * torch.randn(x.shape, generator=gen, device=device)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            if objective is None:
                out = model(x)
                loss = F.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            else:
                out, loss, penalty = objective.step(model, params, opt, x, y)
                penalty_sum += penalty * len(y)
            loss_sum += loss.detach() * len(y)
            correct += (out.argmax(1) == y).sum()
        lr = opt.param_groups[0]["lr"]
        sched.step()
        seconds = time.perf_counter() - t0
        val_acc = noisy_accuracy(model, val_split, sigma, 1000, gen)
        row = {"epoch": epoch + 1, "lr": lr, "loss": round(loss_sum.item() / n, 5),
               "train_acc": round(correct.item() / n, 5), "noisy_val_acc": round(val_acc, 5),
               "images_per_s": round(n / seconds, 1), "epoch_seconds": round(seconds, 3)}
        if objective is not None:
            row["penalty"] = round(penalty_sum.item() / n, 8)
        history.append(row)
        log(f"epoch {epoch + 1}/{epochs}  loss {row['loss']:.4f}  train acc {row['train_acc']:.4f}  "
            f"noisy val acc {val_acc:.4f}  {row['images_per_s']:.0f} img/s  lr {lr:g}"
            + (f"  penalty {row['penalty']:.3g}" if objective is not None else ""))
        if not torch.isfinite(loss_sum):  # before on_epoch: the resume checkpoint keeps the last finite epoch
            raise DivergedError(f"{stream}: the loss became {loss_sum.item()} in epoch {epoch + 1} (learning rate "
                                f"{lr:g}, batches of {bs}): training diverged; lower the learning rate of this "
                                "stage in the profile")
        if on_epoch is not None:
            on_epoch(epoch + 1, history)
    return history


def _checkpointer(resume_path: Path, fingerprint: dict, model, opt, sched, log_csv):
    def save(epoch: int, history: list[dict]) -> None:
        torch_save({"fingerprint": fingerprint, "epoch": epoch, "state_dict": model.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": history},
                   resume_path)
        _write_history(log_csv, history)
    return save


def train(config: dict, sigma: float, data: Prepared, out_model: str | Path, resume_path: str | Path,
          log_csv: str | Path, metrics_json: str | Path, device: torch.device, log=print, base: str = "fp32",
          init: str | Path | None = None) -> dict:
    """Train the base model at noise level σ; write the final checkpoint, a per-epoch CSV and a summary.

    ``base`` names the variant (arq.variants): ``fp32``, or a robust one trained with SymReg and/or SatNL from the
    same initial weights and batches. The checkpoint records it (as its ``method``) and holds ordinary weights.
    With ``init`` (the finetune_base stage) the weights start from that imported checkpoint (arq.pretrained) and the
    recipe is ``pretrained.finetune``: a noise finetune of a network trained without noise."""
    if init is not None and (config["pretrained"] or {}).get("finetune") is None:
        raise ConfigError("a noise finetune of an imported model (--init) needs pretrained.finetune, its recipe")
    tc = config["train"] if init is None else config["pretrained"]["finetune"]
    stream = "train" if init is None else "finetune-base"
    start = time.perf_counter()
    torch.manual_seed(tc["seed"])  # model initialisation: the same for every variant
    # the class count of the data (a user's tree); the architecture's default when the manifest lists no classes
    classes = len(data.manifest.get("classes", ())) or None
    imported = None
    if init is None:
        model = models.build(config["model"]["arch"], classes)
    else:
        model, meta = models.load_for_stage(init, config, sigma, "fp32", log)
        imported = meta.get("imported")
        if classes is not None and models.num_classes(model) != classes:
            raise models.CheckpointError(f"{init} has {models.num_classes(model)} outputs, but the data has "
                                         f"{classes} classes")
    model = model.to(device)
    objective = variants.objective(config, base)
    if objective is not None:
        objective.prepare(model)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=tc["lr"], momentum=tc["momentum"], weight_decay=tc["weight_decay"])
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=tc["lr_milestones"], gamma=tc["lr_gamma"])
    fingerprint = _train_fingerprint(config, sigma, data.manifest["file_sha256"], base, imported)
    train_split = _to_device(first_images(data.train, tc["train_images"]), device)
    val_split = _to_device(balanced(data.val, tc["val_images"]), device)

    resume_path = Path(resume_path)
    history, first_epoch = _try_resume(resume_path, fingerprint, model, opt, sched, device, log)
    log(f"{'training' if init is None else f'noise-finetuning {init}:'} {config['model']['arch']} ({base}) at "
        f"σ={sigma} on {len(train_split)} images for {tc['epochs']} epochs on {device}"
        + (f": {objective.describe()}" if objective is not None else ""))
    history = run_epochs(model, opt, sched, train_split, val_split, sigma, stream, tc["seed"], tc["epochs"], tc["batch_size"],
                         device, log, first_epoch, history,
                         _checkpointer(resume_path, fingerprint, model, opt, sched, log_csv), objective)

    wall = time.perf_counter() - start
    extra = {}
    if objective is not None:
        extra = objective.finish(model)  # SatNL exported to ordinary weights; what the variant reached
    models.save_checkpoint(out_model, model.to(memory_format=torch.contiguous_format).cpu(),
                           config["model"]["arch"], sigma=sigma, epoch=tc["epochs"], method=base,
                           profile=config["profile"], config_hash=config_hash(config),
                           data_sha256=data.manifest["file_sha256"], **({"imported": imported} if init else {}))
    summary = {"base": base, "sigma": sigma, "epochs": tc["epochs"], "train_images": len(train_split),
               **({"noise_finetune_of": {"path": str(init), "imported": imported}} if init else {}),
               "final_noisy_val_acc": history[-1]["noisy_val_acc"],
               "mean_images_per_s": round(sum(r["images_per_s"] for r in history) / len(history), 1), **extra,
               **provenance(config, device, wall, {"data": origin("prepared data", data.manifest)})}
    write_json(metrics_json, summary)
    resume_path.unlink(missing_ok=True)  # the final checkpoint supersedes it
    return summary


# ------------------------------------------------------------------------------------ quantization-aware finetune

def calibration_batches(split: Split, sigma: float, images: int, batch_size: int, seed: int,
                        device: torch.device, purpose: str = "calibrate"):
    """Noisy copies of the first ``images`` training images, as the quantized model will see them."""
    gen = rng.generator(purpose, seed, device=device)
    x_all = split.x[:images]
    for i in range(0, len(x_all), batch_size):
        x = x_all[i:i + batch_size].to(device).float().div_(255)
        yield x + sigma * torch.randn(x.shape, generator=gen, device=device)


def quantize_for_finetune(model: nn.Module, layers: dict, quant_config: dict, calib: Split, sigma: float,
                          batch_size: int, seed: int, device: torch.device) -> dict:
    """Apply a policy to an FP32 model, calibrate its activation ranges under noise, set clip learning."""
    quant.apply_policy(model, layers, quant_config["weight_clip"])
    qc = quant_config["calibration"]
    ranges = quant.calibrate(model, calibration_batches(calib, sigma, qc["images"], batch_size, seed, device),
                             qc["method"])
    quant.set_clip_learning(model, quant_config["act_clip"] == "learned")
    return ranges


def param_groups(model: nn.Module) -> list[dict]:
    """Weights and biases with weight decay, learned activation ranges without it."""
    clips = [p for n, p in model.named_parameters() if n.endswith("act.clip") and p.requires_grad]
    others = [p for n, p in model.named_parameters() if not n.endswith("act.clip")]
    return [{"params": others}] + ([{"params": clips, "weight_decay": 0.0}] if clips else [])


def qat_steps(model: nn.Module, split: Split, sigma: float, steps: int, batch_size: int, lr: float, momentum: float,
              weight_decay: float, gen: torch.Generator, teacher: nn.Module | None = None) -> float:
    """A short QAT finetune under noise for a fixed number of SGD steps (a search episode's finetune).

    Batches are drawn with replacement from ``split`` (on the model's device), cropped, flipped and noised like
    training. With a ``teacher`` (the FP32 model) the loss is the KL divergence to its predictive distribution on
    the same noisy input, the agreement IRS rewards; otherwise cross-entropy. Returns the mean loss."""
    if steps == 0:
        return float("nan")
    device = split.x.device
    opt = torch.optim.SGD(param_groups(model), lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()
    total = torch.zeros((), device=device)
    for _ in range(steps):
        idx = torch.randint(len(split), (batch_size,), generator=gen, device=device)
        x = augment(split.x[idx], gen)
        x = x + sigma * torch.randn(x.shape, generator=gen, device=device)
        out = model(x)
        if teacher is None:
            loss = F.cross_entropy(out, split.y[idx])
        else:
            with torch.no_grad():
                target = F.softmax(teacher(x), 1)
            loss = F.kl_div(F.log_softmax(out, 1), target, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach()
    model.eval()
    return float(total) / steps


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches) -> int:
    """Replace every BatchNorm's running statistics by their exact average over ``batches`` (noisy inputs, as the
    model will see them), the forward pass fake-quantized as in inference. A few QAT steps move the weights but
    update the running statistics only by an exponential average of those few batches, so the scored network would
    normalise with statistics of the FP32 weights; re-estimating them is the cheap part of what a real finetune
    repairs. Returns the number of images seen."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    seen = 0
    for x in batches:
        model(x)
        seen += len(x)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.eval()
    return seen


def _finetune_fingerprint(config: dict, sigma: float, policy_doc: dict, base_sha: str, data_sha: str,
                          seed: int) -> dict:
    return {"finetune_hash": config_hash({"finetune": config["finetune"], "quant": config["quant"],
                                          "model": config["model"]}),
            "layers": policy_doc["layers"], "sigma": sigma, "base_sha256": base_sha, "data_sha256": data_sha,
            "seed": seed}


def finetune(config: dict, sigma: float, base_model: str | Path, policy_doc: dict, data: Prepared,
             out_model: str | Path, resume_path: str | Path, log_csv: str | Path, metrics_json: str | Path,
             device: torch.device, method: str, log=print) -> dict:
    """The final finetune every method shares: quantize the FP32 base model with ``policy_doc``, calibrate,
    then QAT under Gaussian noise at σ (SGD, cosine schedule). Writes a quantized checkpoint carrying its policy.

    ``method`` is the model's name; the seed it carries (``arq_b1.0_s2``) offsets ``finetune.seed``, so each seed of a
    method is finetuned with its own batches and noise, and every method sees the same finetune seeds."""
    from arq.io import sha256_file

    fc = config["finetune"]
    seed = fc["seed"] + (parse(method).seed or 0)
    start = time.perf_counter()
    model, meta = models.load_for_stage(base_model, config, sigma, parse(method).base, log=log)
    if "policy" in meta:
        raise models.CheckpointError(f"{base_model} is already quantized; finetune starts from an FP32 model")
    model.to(device)
    base_sha = sha256_file(base_model)
    train_split = _to_device(first_images(data.train, fc["train_images"]), device)
    val_split = _to_device(balanced(data.val, fc["val_images"]), device)
    log(f"finetuning {method} ({policy_doc['bitops_pct']:.3f}% of FP32 BitOps) at σ={sigma} on {len(train_split)} "
        f"images for {fc['epochs']} epochs on {device}")
    ranges = quantize_for_finetune(model, policy_doc["layers"], config["quant"], train_split, sigma,
                                   fc["batch_size"], seed, device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(param_groups(model), lr=fc["lr"], momentum=fc["momentum"], weight_decay=fc["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(fc["epochs"], 1))
    fingerprint = _finetune_fingerprint(config, sigma, policy_doc, base_sha, data.manifest["file_sha256"], seed)
    resume_path = Path(resume_path)
    history, first_epoch = _try_resume(resume_path, fingerprint, model, opt, sched, device, log)
    if first_epoch == 0:
        val_acc = noisy_accuracy(model, val_split, sigma, 1000, rng.generator("finetune-eval", seed, device=device))
        log(f"after calibration (before QAT): noisy val acc {val_acc:.4f}")
    history = run_epochs(model, opt, sched, train_split, val_split, sigma, "finetune", seed, fc["epochs"], fc["batch_size"],
                         device, log, first_epoch, history,
                         _checkpointer(resume_path, fingerprint, model, opt, sched, log_csv))
    if not history:  # epochs: 0 = post-training quantization (calibration only)
        history = [{"epoch": 0, "lr": 0.0, "loss": None, "train_acc": None,
                    "noisy_val_acc": round(noisy_accuracy(model, val_split, sigma, 1000,
                                                          rng.generator("finetune-eval", seed, device=device)), 5),
                    "images_per_s": 0.0, "epoch_seconds": 0.0}]
        _write_history(log_csv, history)

    wall = time.perf_counter() - start
    model = model.to(memory_format=torch.contiguous_format).cpu()
    models.save_checkpoint(out_model, model, config["model"]["arch"], sigma=sigma, epoch=fc["epochs"], method=method,
                           profile=config["profile"], policy=policy_doc, weight_clip=config["quant"]["weight_clip"],
                           base_sha256=base_sha,
                           config_hash=config_hash(config),
                           data_sha256=data.manifest["file_sha256"])
    summary = {"method": method, "sigma": sigma, "bitops_pct": policy_doc["bitops_pct"], "epochs": fc["epochs"],
               "train_images": len(train_split), "final_noisy_val_acc": history[-1]["noisy_val_acc"],
               "activation_ranges": ranges,
               **provenance(config, device, wall, {"model": origin(base_model, meta),
                                                   "policy": origin(policy_doc["produced_by"], policy_doc)})}
    write_json(metrics_json, summary)
    resume_path.unlink(missing_ok=True)
    return summary


def _write_history(path: str | Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buf.getvalue())
