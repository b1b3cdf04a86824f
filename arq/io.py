"""Atomic file output and run provenance.

Every artifact is written to a temporary file in the destination folder and renamed into place, so an
interrupted stage never leaves a truncated file under a finished name. Files get the user's umask (as a plain
``open`` would), not mkstemp's private 0600, so results on a shared cluster stay readable by the group.
Checkpoints are serialized in memory first: identical content gives identical bytes, which the sha256
fingerprints of later stages (and DVC) rely on.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import secrets
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from arq.config import config_hash


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:  # O_EXCL: never another writer's file; mode 0o666 minus the umask, like open()
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, atomically and byte-reproducibly.

    Saving to a path records that path's name inside the archive (a temporary name would make every save
    differ); a buffer is recorded under a fixed name."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getbuffer())


def set_aside(paths: Iterable[str | os.PathLike], why: str, log: Callable[[str], None] = print) -> None:
    """Move a corrupt resume file (and its companions) to ``<name>.corrupt`` so a stage can restart cleanly
    without destroying what may help to diagnose the problem."""
    paths = [Path(p) for p in paths]
    moved = []
    for p in paths:
        if p.exists():
            os.replace(p, p.with_name(p.name + ".corrupt"))
            moved.append(p.name + ".corrupt")
    log(f"setting {paths[0]} aside ({', '.join(moved) or 'nothing left to move'}): {why}; starting this stage afresh")


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks (md5 is what DVC records; sha256 everything else)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """The commit of the code that produced a result; '+dirty' marks uncommitted changes."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device, threads: bool = True) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = f"cpu ({platform.processor() or platform.machine()}"
    return name + (f", {torch.get_num_threads()} threads)" if threads else ")")


def origin(source: str | os.PathLike, record: dict) -> dict:
    """Who made an input: its path (or what made it) and the config hash and commit its record (checkpoint metadata
    or result JSON) carries. An input the workflow reused from an earlier run may come from an older config than the one now
    running; a stage records this beside its own ``config_hash`` so that both can be traced."""
    found = {k: record[k] for k in ("config_hash", "git_commit") if k in record}
    return {"source": str(source), **found}


def provenance(config: dict, device: torch.device, wall_seconds: float, upstream: dict | None = None) -> dict:
    """Fields every result file carries so a number can be traced to the run that made it; ``upstream`` names the
    ``origin`` of each input that another stage made (``{"model": origin(...), ...}``)."""
    return {
        "profile": config["profile"],
        "config_hash": config_hash(config),
        "git_commit": git_commit(),
        "device": device_name(device),
        "torch": str(torch.__version__),
        "wall_seconds": round(wall_seconds, 3),
        **({"upstream": upstream} if upstream else {}),
    }
