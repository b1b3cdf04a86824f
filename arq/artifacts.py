"""DVC as the artifact store of a Snakemake workflow: binary files (prepared data, checkpoints, IRS caches, search
states) are tracked by DVC, text results by git, and Snakemake alone decides what runs.

Neither git nor DVC keeps modification times, so files restored by ``git clone`` and ``dvc pull`` come back in
arbitrary time order, and Snakemake's mtime trigger would rerun the whole DAG (in Snakemake 9 that trigger
cannot be switched off: ``--rerun-triggers`` without ``mtime`` still compares times). ``pull`` therefore restores
and verifies every tracked file, stamps the outputs in DAG order with ``snakemake --touch`` (which also records
each job's parameters, so a later config change still reruns what it affects), and then requires a dry run to
find nothing to do: a missing output is an error, not a job. ``add`` requires the same of the finished run before
``dvc add`` rewrites the files it tracks, and restamps after it. Nothing is ever recomputed to paper over a
missing or corrupt artifact.

A profile with ``artifacts.prepared_data: false`` (the cpu study, whose remote lives inside the repository) leaves
the prepared dataset out: ``pull`` rebuilds it from ``data.path`` with the workflow's own ``prepare_data`` job and
refuses a rebuild whose sha256 differs from the committed manifest's, so every pulled checkpoint still meets the
data it was made from. A run done in pieces publishes each finished piece with ``--partial``: the outputs present
are tracked and stamped, and the jobs still to run are listed instead of refused.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from arq import layout
from arq.config import split
from arq.io import file_digest


class ArtifactError(RuntimeError):
    pass


def _run(cmd: list[str], root: Path, what: str) -> str:
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    out = p.stdout + p.stderr
    if p.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-15:])
        raise ArtifactError(f"{what} failed (exit {p.returncode}):\n{tail}")
    return out


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def snakemake(configfiles: list[str], *args: str) -> list[str]:
    # targets and flags first: --configfile takes every argument after it
    return [sys.executable, "-m", "snakemake", "--cores", "1", *args, "--configfile", *configfiles]


def record(dvc_file: Path) -> dict:
    """The md5 and size a ``.dvc`` file records for its one output."""
    try:
        out = yaml.safe_load(dvc_file.read_text())["outs"][0]
        return {"md5": str(out["md5"]), "size": int(out["size"])}
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{dvc_file}: not a readable DVC file with one output ({exc})") from exc


def tracked(config: dict, root: str | Path = ".") -> list[Path]:
    """The profile's files that DVC tracks (each has a ``<file>.dvc`` record committed to git), for every architecture
    it runs (``arq.config.split``), as are the functions below."""
    root = Path(root)
    found = []
    for base in (d for part in split(config) for d in (layout.prepared_dir(part), layout.results_dir(part))):
        for p in sorted((root / base).rglob("*.dvc")):
            try:
                found.append(layout.inside(p, root).with_suffix(""))
            except ValueError as exc:
                raise ArtifactError(str(exc)) from None
    return found


def missing(config: dict, root: str | Path = ".") -> list[Path]:
    root = Path(root)
    return [p for p in tracked(config, root) if not (root / p).exists()]


def _records(config: dict, root: Path, what: str) -> list[Path]:
    """``tracked``, where a profile without any record is an error (there is nothing to ``what``)."""
    files = tracked(config, root)
    if not files:
        raise ArtifactError(f"profile {config['profile']!r} has no DVC records (*.dvc) under "
                            f"{layout.prepared_dir(config)} or {layout.results_dir(config)}: nothing to {what}")
    return files


def verify(config: dict, root: str | Path = ".") -> list[Path]:
    """Check every tracked file against its ``.dvc`` record (size, then md5). ``dvc checkout`` restores a corrupt
    cache object without a word, so this is what catches one. Returns the files checked."""
    root = Path(root)
    files, problems = _records(config, root, "verify"), []
    for rel in files:
        rec, path = record(root / f"{rel}.dvc"), root / rel
        if not path.exists():
            problems.append(f"{rel}: missing (tracked by {rel}.dvc)")
            continue
        digest = file_digest(path, "md5") if path.stat().st_size == rec["size"] else "(size differs)"
        if digest != rec["md5"]:
            problems.append(f"{rel}: content differs from {rel}.dvc (md5 {digest}, recorded {rec['md5']}); "
                            f"if it came from `dvc pull`, the cache object .dvc/cache/files/md5/{rec['md5'][:2]}/"
                            f"{rec['md5'][2:]} is corrupt: delete it and pull again")
    if problems:
        raise ArtifactError(f"{len(problems)} DVC-tracked file(s) of profile {config['profile']!r} do not match "
                            f"their records:\n  " + "\n  ".join(problems))
    return files


def pending(configfiles: list[str], root: str | Path = ".") -> str | None:
    """The jobs ``snakemake --dry-run`` would run, as it prints them (the Job stats table and the first reasons);
    None when it has nothing to do."""
    out = _run(snakemake(configfiles, "--dry-run"), Path(root), "snakemake --dry-run")
    if "Nothing to be done" in out:
        return None
    lines = out.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Job stats")), 0)
    return "\n".join(lines[start:start + 40])


def restamp(configfiles: list[str], root: str | Path = ".") -> None:
    """Mark every job of the workflow as done, in DAG order (``snakemake --touch --forceall``). It skips a job
    whose outputs are absent, so ``_require_done`` must follow; before it, it hides what would have rerun."""
    _run(snakemake(configfiles, "--touch", "--forceall", "--quiet", "all"), Path(root), "snakemake --touch")


def _require_done(configfiles: list[str], root: Path, when: str) -> None:
    jobs = pending(configfiles, root)
    if jobs:
        raise ArtifactError(f"{when}, the workflow still has jobs to run, so its results are incomplete or out of "
                            f"date:\n{jobs}")


def _refuse_ignored_records(files: list[Path], root: Path) -> None:
    """DVC refuses to write a record git would ignore (`dvc add` stops half-way). Say which .gitignore lines to
    drop before anything is touched: the smoke and short CPU profiles are ignored so that CI runs leave no trace."""
    p = subprocess.run(["git", "check-ignore", "--verbose", *[f"{f}.dvc" for f in files]], cwd=root,
                       capture_output=True, text=True)
    # "<source>:<line>:<pattern>\t<path>"; a negated pattern ("!…") is the rule that keeps a path in git
    matches = [line.split("\t", 1)[0] for line in p.stdout.splitlines() if line.strip()]
    rules = sorted({m for m in matches if not m.split(":", 2)[-1].startswith("!")})
    if rules:
        raise ArtifactError("git ignores the DVC records this profile needs (file:line:pattern): " + ", ".join(rules)
                            + ". Drop those lines from .gitignore to publish the profile, then run this again.")


def prepared_data(config: dict) -> Path:
    return Path(layout.prepared_data(config))


def published(config: dict, root: str | Path = ".") -> list[Path]:
    """The binary outputs present under ``root`` that the profile publishes: all of them, less the prepared data
    where ``artifacts.prepared_data`` is false."""
    files = []
    for part in split(config):
        try:
            outputs = layout.binary_outputs(part, root)
        except ValueError as exc:
            raise ArtifactError(str(exc)) from None
        files += [f for f in outputs if part["artifacts"]["prepared_data"] or f != prepared_data(part)]
    return files


def _report_pending(configfiles: list[str], root: Path, log) -> None:
    jobs = pending(configfiles, root)
    log("the workflow is complete" if jobs is None else f"a partial run: these jobs are still to run\n{jobs}")


def add(config: dict, configfiles: list[str], root: str | Path = ".", log=print, partial: bool = False) -> list[Path]:
    """Track the binary outputs of a finished profile with DVC (``dvc add``; ``published``), then restamp the outputs
    so that Snakemake does not take the rewritten files for new inputs. Refuses a workflow with jobs still to run,
    unless ``partial`` (one finished piece of a run: what is there is tracked, and the jobs left are listed)."""
    root = Path(root)
    files = published(config, root)
    if not files:
        raise ArtifactError(f"profile {config['profile']!r} has no binary outputs under {root}: run its workflow")
    _refuse_ignored_records(files, root)
    if not partial:
        _require_done(configfiles, root, "Before tracking (nothing was added; a piece of a run: --partial)")
    log(f"dvc add: {len(files)} file(s) of profile {config['profile']!r}")
    _run(dvc("add", *map(str, files)), root, "dvc add")
    restamp(configfiles, root)
    if partial:
        _report_pending(configfiles, root, log)
    else:
        _require_done(configfiles, root, "After dvc add")
    return files


def push(config: dict, configfiles: list[str], remote: str | None = None, root: str | Path = ".",
         log=print, partial: bool = False) -> list[Path]:
    """``add``, then upload the tracked files to the DVC remote (the default one unless named)."""
    root = Path(root)
    files = add(config, configfiles, root, log, partial)
    _run(dvc("push", *(["--remote", remote] if remote else []), *[f"{f}.dvc" for f in files]), root, "dvc push")
    text = [t for part in split(config) for t in (layout.results_dir(part), layout.figures_dir(part),
                                                   f"{layout.prepared_dir(part)}/manifest.json")
            if (root / t).exists()]  # a piece may lack some
    text += _remote_inside(root, remote)
    log(f"pushed {len(files)} file(s). Commit their records with the text results (a git-ignored profile needs its "
        f"lines dropped from .gitignore first): git add {' '.join(f'{f}.dvc' for f in files)} {' '.join(text)}")
    return files


def _remote_inside(root: Path, remote: str | None) -> list[str]:
    """The remote's directory, relative to ``root``, where the remote lives inside the repository (its objects are
    committed with the records); nothing for any other remote. A relative url in DVC's config is relative to
    ``.dvc/`` (``dvc remote list`` wraps long paths, so the config is read instead)."""
    try:
        name = remote or _run(dvc("remote", "default"), root, "dvc remote default").strip()
        url = _run(dvc("config", f"remote.{name}.url"), root, "dvc config").strip() if name else ""
    except ArtifactError:  # no such remote: dvc push has already said so
        return []
    if not url or "://" in url:
        return []
    try:
        return [str(layout.inside(root / ".dvc" / url, root))]
    except ValueError:
        return []


def _manifest_sha(config: dict, root: Path) -> str:
    manifest = prepared_data(config).parent / "manifest.json"
    try:
        return json.loads((root / manifest).read_text())["file_sha256"]
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"{manifest}: cannot read the sha256 of the prepared data ({exc}); it is committed with "
                            "the profile's results and names the data the models were made from") from None


def _check_data(config: dict, root: Path) -> None:
    """An unpublished prepared dataset already on disk must be the one the committed manifest names."""
    data = prepared_data(config)
    have = file_digest(root / data, "sha256")
    if have != _manifest_sha(config, root):
        raise ArtifactError(f"{data} (sha256 {have}) is not the data the published models were made from "
                            f"({data.parent / 'manifest.json'}); delete it and pull again to rebuild it")


def rebuild_data(config: dict, configfiles: list[str], root: Path, log=print) -> None:
    """Rebuild an unpublished prepared dataset from ``data.path`` (the workflow's ``prepare_data`` job) and require
    it to be the one the committed manifest describes; the manifest itself is kept as committed."""
    data = prepared_data(config)
    manifest = data.parent / "manifest.json"
    want = _manifest_sha(config, root)
    committed = (root / manifest).read_text()
    log(f"rebuilding {data} from {config['data']['path']} (not published: artifacts.prepared_data is false)")
    try:
        _run([sys.executable, "-m", "snakemake", "--cores", str(config["resources"]["prepare"]["threads"]),
              str(data), "--configfile", *configfiles], root, "rebuilding the prepared data")
        have = json.loads((root / manifest).read_text())["file_sha256"]
    finally:
        (root / manifest).write_text(committed)
    if have != want:
        (root / data).unlink()
        raise ArtifactError(f"the data rebuilt from {config['data']['path']} (sha256 {have}) is not the data the "
                            f"published models were made from ({manifest}: {want}); it was removed. Check data.path "
                            "and the archive's checksum")


def pull(config: dict, configfiles: list[str], remote: str | None = None, root: str | Path = ".",
         log=print, partial: bool = False) -> list[Path]:
    """Download the profile's tracked files, verify each against its record (rebuild the prepared data where it is
    not published), stamp the outputs in DAG order and require the workflow to be complete: ``snakemake -n`` then
    has nothing to do. With ``partial`` (a run published piece by piece), the jobs left are listed instead."""
    root = Path(root)
    files = _records(config, root, "pull")
    log(f"dvc pull: {len(files)} file(s) of profile {config['profile']!r}")
    _run(dvc("pull", *(["--remote", remote] if remote else []), *[f"{f}.dvc" for f in files]), root, "dvc pull")
    verify(config, root)
    for part in split(config):
        if part["artifacts"]["prepared_data"]:
            continue
        if (root / prepared_data(part)).exists():
            _check_data(part, root)
        else:
            rebuild_data(part, configfiles, root, log)
    restamp(configfiles, root)
    if partial:
        _report_pending(configfiles, root, log)
    else:
        _require_done(configfiles, root, "After the pull (a run published in pieces: --partial)")
    log(f"verified {len(files)} file(s) against their records; outputs stamped in DAG order")
    return files
