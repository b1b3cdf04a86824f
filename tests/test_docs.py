"""Documented commands are the tested ones: every command README.md and ARTIFACT.md give is run verbatim by a test,
run as a dry run where it takes hours, or (a synopsis with placeholders, or a name in a sentence) checked against
the parser of the program it names."""
from __future__ import annotations

import ast
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from documented import PLACEHOLDER, REPO, documented_commands, environment, filled, normalized, run_documented

TESTS = Path(__file__).resolve().parent

# Commands a test cannot run and that are not synopses: why, and what stands for them.
NAMED = {
    "bash .ci/run": "CI itself (it runs README's test command on a clean clone)",
    "bash .ci/slurm": "the Slurm tests' own runner (tests/test_slurm.py runs every command it documents)",
    ".venv/bin/pip install -e '.[slurm]'": "the plugin's install; README's test install (`.[test]`) includes it",
    "git log --follow": "a sentence about the history of the renamed cpu-v1 results",
    "git add …": "the line `arq artifacts push` prints; test_e2e's reviewer fixture runs the printed line verbatim",
    "git clone <repo> && cd <repo> && python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]'":
        "a clone, then README's install (CI runs that install on a clean clone)",
}
# Commands given in part (in a table of stages, in a sentence on what a tool runs, or needing what CI lacks): not
# run as they stand, but checked below like the synopses, against the parser of the program they name.
ABRIDGED = {
    "arq uniform --bits W4A4": "README's table of stages (the rule supplies --config and --out)",
    "arq artifacts pull": "a sentence: what it runs (the reviewer and published tests run it in full)",
    "snakemake --touch --forceall": "a sentence: what `arq artifacts pull` runs after verifying the files",
}
# Long benchmarks (minutes to an hour, some need a trained checkpoint): checked by their own parser.
BENCHMARKS = ("python benchmarks/",)


def _literal_calls() -> list[tuple[str, dict, bool, str]]:
    """Every ``run_documented("…", …)`` call in the tests: (command, fill, dry_run, where)."""
    calls = []
    for path in sorted(TESTS.glob("*.py")):
        tree = ast.parse(path.read_text())
        looped = {}  # a loop variable over a literal tuple of strings: `for command in ("…", "…"):`
        for node in ast.walk(tree):
            if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and isinstance(node.iter, ast.Tuple):
                values = [e.value for e in node.iter.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
                for inner in ast.walk(node):
                    looped[id(inner)] = (node.target.id, values)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_documented" and node.args):
                continue
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                commands = [first.value]
            elif isinstance(first, ast.Name) and looped.get(id(node), ("",))[0] == first.id:
                commands = looped[id(node)][1]
            else:
                continue  # a computed command is not counted as coverage
            kwargs = {k.arg: k.value for k in node.keywords}
            fill = ast.literal_eval(kwargs["fill"]) if "fill" in kwargs else {}
            dry = bool(ast.literal_eval(kwargs["dry_run"])) if "dry_run" in kwargs else False
            calls += [(command, fill, dry, f"{path.name}:{node.lineno}") for command in commands]
    return calls


def _install(ci_line: str) -> str:
    return ci_line.split(" && .venv/bin/python -m pytest", 1)[0]


def _ci_line() -> str:
    return [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")][0]


def test_every_run_documented_literal_is_still_documented():
    given = documented_commands()
    calls = _literal_calls()
    assert len(calls) >= 20, calls
    for command, _, _, where in calls:
        assert command in given, f"{where} runs {command!r}, which README.md and ARTIFACT.md no longer give"


def test_every_documented_command_is_run_or_checked():
    given = documented_commands()
    run, dry = set(), set()
    for command, fill, is_dry, _ in _literal_calls():
        for form in (command, filled(command, fill)):
            (dry if is_dry else run).add(normalized(form))
    install = _install(_ci_line())
    unchecked = []
    for command, where in given.items():
        plain = normalized(command)
        if plain in run or command in NAMED or command == _ci_line():  # CI runs README's test command
            continue
        if plain in dry:
            assert command.split()[0] in ("snakemake", ".venv/bin/snakemake", "timeout"), (command, where)
            continue
        if command.replace(" -q", "").startswith(install.replace(" -q", "")):
            rest = command.replace(" -q", "")[len(install.replace(" -q", "")):].removeprefix(" && ")
            assert not rest or normalized(rest) in run, (f"{where}: after the install, {rest!r} is run by no test")
            continue
        synopsis = (PLACEHOLDER.search(command) or len(command.split()) == 2 or command.startswith(BENCHMARKS)
                    or command in ABRIDGED)
        if not synopsis:
            unchecked.append(f"{', '.join(where)}: {command}")
    assert not unchecked, "documented commands no test runs:\n" + "\n".join(unchecked)
    assert set(NAMED) | set(ABRIDGED) <= set(given), (set(NAMED) | set(ABRIDGED)) - set(given)


def test_the_quickstart_test_command_is_what_ci_runs():
    given = documented_commands()
    ci = _ci_line()
    assert given[ci] == ["README.md:40"] or "README.md" in given[ci][0], given.get(ci)
    assert _install(ci) in given, "ARTIFACT.md's install line is CI's"


def test_remote_add_commands_run_as_given(tmp_path):
    """README's and ARTIFACT.md's remote lines, each in a repository whose default is then that remote."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    for command in ("dvc remote add -d store /mnt/shared/arq-dvc", "dvc remote add -d store s3://my-bucket/arq",
                    "dvc remote add -d store ssh://user@host/srv/arq", "dvc remote add -d store /path/to/dir"):
        subprocess.run([sys.executable, "-m", "dvc", "remote", "remove", "store"], cwd=tmp_path, capture_output=True)
        r = run_documented(command, tmp_path, timeout=120)
        assert r.returncode == 0, (command, r.stderr)
        shown = subprocess.run([sys.executable, "-m", "dvc", "remote", "default"], cwd=tmp_path,
                               capture_output=True, text=True, check=True)
        assert shown.stdout.strip() == "store"


# ------------------------------------------------------------------- synopses, checked by their program's parser

def _example(words: list[str]) -> list[str]:
    """A synopsis as a reader fills it in: brackets dropped, the first alternative of a|b, metavariables as text."""
    out = []
    for word in words:
        word = word.strip("[]")
        if "|" in word:
            word = word.split("|")[0]
        if word in ("…", ""):
            continue
        out.append(word.replace("<p>", "smoke").replace("σ", "0.25"))
    return out


def _flags(words: list[str]) -> list[str]:
    return [w.split("=")[0] for w in words if w.startswith("-")]


def _arq_subparser(words: list[str]):
    import argparse

    from arq.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert words[1] in sub.choices, f"arq has no subcommand {words[1]!r}"
    return sub.choices[words[1]]


def _synopses() -> list[str]:
    runs = {normalized(c) for c, *_ in _literal_calls()}
    return [c for c in documented_commands() if c not in NAMED and normalized(c) not in runs
            and not c.startswith(("python3 -m venv", "git "))]


@pytest.mark.parametrize("command", [c for c in _synopses() if c.split()[0] == "arq"])
def test_arq_synopses_name_real_subcommands_flags_and_choices(command):
    words = _example(shlex.split(command))
    parser = _arq_subparser(words)
    options = parser._option_string_actions
    for flag in _flags(words):
        assert flag in options, f"{command!r}: arq {words[1]} has no {flag}"
    for flag, value in zip(words, words[1:]):
        action = options.get(flag)
        if action is not None and action.choices and value.isidentifier() and not value.isupper():
            assert value in action.choices, f"{command!r}: {value!r} is not a choice of {flag}"
    positional = [a for a in parser._actions if not a.option_strings and a.choices]
    for action in positional:  # e.g. arq artifacts {add,push,pull,verify}
        named = [w for w in words[2:] if not w.startswith("-")]
        if named:
            assert named[0] in action.choices, f"{command!r}: {named[0]!r} not in {sorted(action.choices)}"


@pytest.mark.parametrize("command", [c for c in _synopses() if c.split()[0] in ("snakemake", "timeout")])
def test_snakemake_synopses_use_real_flags(command):
    from snakemake.cli import get_argument_parser

    options = get_argument_parser()._option_string_actions
    for flag in _flags(_example(shlex.split(command))):
        assert flag in options, f"{command!r}: snakemake has no {flag}"


@pytest.mark.parametrize("command", [c for c in _synopses() if c.split()[0] == "dvc"])
def test_dvc_synopses_name_real_subcommands(command):
    words = _example(shlex.split(command))
    argv = [sys.executable, "-m", "dvc", *[w for w in words[1:] if not w.startswith("-") and "." not in w][:2]]
    r = subprocess.run([*argv, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120, env=environment())
    assert r.returncode == 0, (command, r.stderr[-2000:])
    for flag in _flags(words):
        assert flag in r.stdout, f"{command!r}: {flag} is not an option of {' '.join(argv[1:])}"


@pytest.mark.parametrize("command", [c for c in _synopses() if c.split()[0] == "python"])
def test_benchmark_synopses_parse(command, capsys, monkeypatch):
    """The script's own parser, in this process (``--help`` after the documented subcommand)."""
    import runpy

    words = _example(shlex.split(command))
    script = REPO / words[1]
    assert script.is_file(), f"{command!r}: no {words[1]}"
    monkeypatch.syspath_prepend(str(script.parent))  # as Python runs a script: its folder first (benchmarks' helpers)
    monkeypatch.setattr(sys, "argv", [str(script), *[w for w in words[2:3] if not w.startswith("-")], "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    shown = capsys.readouterr().out
    assert done.value.code == 0, (command, shown[-2000:])
    for flag in _flags(words):
        assert flag in shown, f"{command!r}: {flag} is not an option of {words[1]}"
