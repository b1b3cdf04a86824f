"""The commands README.md and ARTIFACT.md give a reader, and a runner that executes one of them verbatim.

A test that runs a documented command calls ``run_documented("<the command as the docs spell it>", cwd)``; the
literal is checked against the docs when it runs, and ``tests/test_docs.py`` reads every such call statically, so a
command the docs give and no test runs (or a test runs and the docs no longer give) is a failing test.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "ARTIFACT.md")
# a code span is a command when its first word is one of these programs (and it has more than one word)
PROGRAMS = ("snakemake", "arq", "dvc", "python", "python3", "bash", "timeout", "git", "pip",
            ".venv/bin/snakemake", ".venv/bin/python")
# placeholders a reader fills in: <p>, σ, …, optional [--flag X], alternatives a|b, upper-case metavariables
PLACEHOLDER = re.compile(r"<[^>]*>|σ|…|\[|\||\b(?:P|M|B|NAME|ARCH)\b")


def documented_commands(root: Path = REPO) -> dict[str, list[str]]:
    """Every command in the docs' ``bash`` blocks (a line each, comments dropped) and in their inline code spans,
    mapped to where it is given (``README.md:32``)."""
    found: dict[str, list[str]] = {}
    for doc in DOCS:
        fenced = False
        for number, line in enumerate((root / doc).read_text().splitlines(), 1):
            fence = line.strip()
            if fence.startswith("```"):
                fenced = not fenced and fence in ("```bash", "```sh")
                continue
            if fenced:
                command = re.sub(r"\s+#.*$", "", line).strip()
                spans = [command] if command else []
            else:
                spans = [s.strip() for s in re.findall(r"`([^`\n]+)`", line)
                         if len(s.split()) > 1 and s.split()[0] in PROGRAMS]
            for command in spans:
                found.setdefault(command, []).append(f"{doc}:{number}")
    return found


def normalized(command: str) -> str:
    """The tests run with this interpreter's environment first on PATH, which is what README's ``.venv/bin/``
    names after its install step; both spellings are the same command."""
    return re.sub(r"(^|\s)\.venv/bin/", r"\1", command)


def filled(command: str, fill: dict[str, str] | None) -> str:
    for placeholder, value in (fill or {}).items():
        command = command.replace(placeholder, value)
    return command


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This interpreter's scripts (arq, snakemake, dvc) first on PATH, as after README's install."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def run_documented(command: str, cwd: Path, *, fill: dict[str, str] | None = None, dry_run: bool = False,
                   timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``command`` as the docs give it, in bash, in ``cwd``. ``fill`` replaces placeholders (``{"<p>":
    "smoke"}``); ``dry_run`` appends ``-n`` to a Snakemake call that runs for hours (the only change a test may
    make to a documented command)."""
    given = documented_commands()
    assert command in given, f"{command!r} is not given by {' or '.join(DOCS)}"
    line = filled(command, fill)
    if dry_run:
        assert "snakemake" in line.split()[:3] or ".venv/bin/snakemake" in line.split()[:1], line
        line += " -n"
    return subprocess.run(["bash", "-c", line], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=environment(env))


def link_beside(root: Path) -> None:
    """``root/../shared`` → the real shared folder (the profiles' relative data path), ``root/.venv`` → this
    interpreter's environment (README's ``.venv/bin/…``)."""
    shared = root.parent / "shared"
    if not shared.exists():
        shared.symlink_to((REPO / ".." / "shared").resolve(), target_is_directory=True)
    if not (root / ".venv").exists():
        (root / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)


def repository_copy(base: Path, name: str) -> Path:
    """The repository's files (tracked, and untracked but not ignored) under ``base/name``, linked as
    ``link_beside`` does: where a reader runs the docs' commands after README's install."""
    root = base / name
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split()
    for rel in listed:
        if (REPO / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    link_beside(root)
    return root
