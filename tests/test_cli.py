"""The command line answers help at once and documents every subcommand and option."""
import argparse
import subprocess
import sys

from arq.cli import build_parser


def test_help_imports_neither_torch_nor_a_stage():
    code = ("import sys, contextlib, io\n"
            "from arq.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n"
            "        main(['--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "heavy = sorted(m for m in ('torch', 'pandas', 'matplotlib', 'snakemake', 'pulp', 'scipy') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"`arq --help` imports {out}"


def test_every_subcommand_and_option_has_a_help_text():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helped = {c.dest: c.help for c in sub._choices_actions}
    assert set(helped) == set(sub.choices)
    for name, p in sub.choices.items():
        assert helped[name], f"subcommand {name} has no help"
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"arq {name} {'/'.join(action.option_strings) or action.dest} has no help"
