"""Noise-augmented training of the base classifier (Cohen et al.'s recipe), resumable per epoch.

The whole training split stays on the device as uint8; cropping, flipping and Gaussian noise are done on
the device per batch, so a GPU never waits on the host. Randomness of epoch e comes from a generator
seeded with (seed, e), so a run resumed from the checkpoint of epoch e-1 repeats an uninterrupted run.
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from arq import models
from arq.config import config_hash
from arq.data import Prepared, Split
from arq.io import provenance, torch_save, write_json, write_text


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


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
    for i in range(0, len(split), batch_size):
        x = split.x[i:i + batch_size].float().div_(255)
        x = x + sigma * torch.randn(x.shape, generator=gen, device=x.device)
        correct += (model(x).argmax(1) == split.y[i:i + batch_size]).sum().item()
    model.train(was_training)
    return correct / len(split)


def _train_fingerprint(config: dict, sigma: float, data_sha: str) -> dict:
    """What a resume checkpoint must match: same recipe, same σ, same data."""
    return {"train_hash": config_hash({"train": config["train"], "model": config["model"]}),
            "sigma": sigma, "data_sha256": data_sha}


def _to_device(split: Split, device: torch.device) -> Split:
    return Split(split.x.to(device), split.y.to(device))


def train(config: dict, sigma: float, data: Prepared, out_model: str | Path, resume_path: str | Path,
          log_csv: str | Path, metrics_json: str | Path, device: torch.device, log=print) -> dict:
    """Train the base model at noise level σ; write the final checkpoint, a per-epoch CSV and a summary."""
    tc = config["train"]
    start = time.perf_counter()
    torch.manual_seed(tc["seed"])  # model initialisation
    model = models.build(config["model"]["arch"]).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=tc["lr"], momentum=tc["momentum"], weight_decay=tc["weight_decay"])
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=tc["lr_milestones"], gamma=tc["lr_gamma"])
    fingerprint = _train_fingerprint(config, sigma, data.manifest["file_sha256"])

    train_split = data.train if tc["train_images"] is None else Split(data.train.x[:tc["train_images"]],
                                                                      data.train.y[:tc["train_images"]])
    val_split = data.val if tc["val_images"] is None else Split(data.val.x[:tc["val_images"]],
                                                                data.val.y[:tc["val_images"]])
    train_split, val_split = _to_device(train_split, device), _to_device(val_split, device)

    history, first_epoch = [], 0
    resume_path = Path(resume_path)
    if resume_path.exists():
        ckpt = torch.load(resume_path, map_location=device, weights_only=True)
        if ckpt.get("fingerprint") == fingerprint:
            model.load_state_dict(ckpt["state_dict"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            history, first_epoch = ckpt["history"], ckpt["epoch"]
            log(f"resuming from {resume_path} after epoch {first_epoch}")
        else:
            log(f"ignoring {resume_path}: it was made with another recipe, σ or dataset; starting afresh")

    n, bs = len(train_split), tc["batch_size"]
    log(f"training {config['model']['arch']} at σ={sigma} on {n} images for {tc['epochs']} epochs on {device}")
    for epoch in range(first_epoch, tc["epochs"]):
        model.train()
        gen = epoch_generator(tc["seed"], epoch, device)
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen, device=device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            x = augment(train_split.x[idx], gen)
            x = x + sigma * torch.randn(x.shape, generator=gen, device=device)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            y = train_split.y[idx]
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(idx)
            correct += (out.argmax(1) == y).sum()
        lr = opt.param_groups[0]["lr"]
        sched.step()
        seconds = time.perf_counter() - t0
        val_acc = noisy_accuracy(model, val_split, sigma, 1000, gen)
        row = {"epoch": epoch + 1, "lr": lr, "loss": round(loss_sum.item() / n, 5),
               "train_acc": round(correct.item() / n, 5), "noisy_val_acc": round(val_acc, 5),
               "images_per_s": round(n / seconds, 1), "epoch_seconds": round(seconds, 3)}
        history.append(row)
        log(f"epoch {epoch + 1}/{tc['epochs']}  loss {row['loss']:.4f}  train acc {row['train_acc']:.4f}  "
            f"noisy val acc {val_acc:.4f}  {row['images_per_s']:.0f} img/s  lr {lr:g}")
        torch_save({"fingerprint": fingerprint, "epoch": epoch + 1, "state_dict": model.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": history},
                   resume_path)
        _write_history(log_csv, history)

    wall = time.perf_counter() - start
    models.save_checkpoint(out_model, model.to(memory_format=torch.contiguous_format).cpu(),
                           config["model"]["arch"], sigma=sigma, epoch=tc["epochs"],
                           config_hash=config_hash(config), data_sha256=data.manifest["file_sha256"])
    summary = {"sigma": sigma, "epochs": tc["epochs"], "train_images": n,
               "final_noisy_val_acc": history[-1]["noisy_val_acc"],
               "mean_images_per_s": round(sum(r["images_per_s"] for r in history) / len(history), 1),
               **provenance(config, device, wall)}
    write_json(metrics_json, summary)
    resume_path.unlink(missing_ok=True)  # the final checkpoint supersedes it
    return summary


def _write_history(path: str | Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buf.getvalue())
