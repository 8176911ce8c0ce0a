"""The CLI documents itself: every command has a description, every option and positional a help
text; --help is fast because building the parser imports no torch or ray; one URL variable."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from bark_serve.cli.common import DEFAULT_URL, server_url
from bark_serve.cli.main import build_parser

HEAVY = ("torch", "ray", "transformers", "bark_serve.bench.hf_runs")


def _walk(parser: argparse.ArgumentParser, path: str):
    """Yield (command path, parser) for the parser and every subcommand below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{path} {name}")


def test_every_command_option_and_positional_has_help():
    missing = []
    commands = list(_walk(build_parser(), "bark-serve"))
    assert len(commands) >= 12  # synth, make-checkpoint, voices, render-config, up, say, bench, batch x3 ...
    for path, parser in commands:
        if not parser.description:
            missing.append(f"{path}: no description")
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}: no help")
    assert not missing, "\n".join(missing)


def _imported_modules(*argv: str) -> set[str]:
    """Modules imported by `python -m bark_serve.cli ARGV` (from -X importtime)."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "bark_serve.cli", *argv],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage:" in res.stdout
    return {line.split("|")[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("argv", [["--help"], ["say", "--help"], ["batch", "status", "--help"],
                                  ["up", "--help"], ["bench", "--help"]])
def test_help_imports_no_torch_or_ray(argv):
    loaded = _imported_modules(*argv)
    assert not [m for m in HEAVY if m in loaded]


def test_up_imports_without_the_parser_module():
    """The command modules never import the parser (what they share lives in cli/common.py)."""
    code = "import bark_serve.cli.up, bark_serve.cli.batch, sys; assert 'bark_serve.cli.main' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_one_url_variable(monkeypatch, capsys):
    monkeypatch.delenv("BARK_URL", raising=False)
    monkeypatch.delenv("BARK_SERVE_URL", raising=False)
    assert server_url(None) == DEFAULT_URL
    assert server_url("http://x:1") == "http://x:1"
    monkeypatch.setenv("BARK_SERVE_URL", "http://old:2")
    assert server_url(None) == "http://old:2"
    assert "deprecated" in capsys.readouterr().err
    monkeypatch.setenv("BARK_URL", "http://new:3")
    assert server_url(None) == "http://new:3"


def test_batch_reads_bark_url(monkeypatch):
    """`batch status` with no --url goes to $BARK_URL (a closed port here): the error names it."""
    env = {**os.environ, "BARK_URL": "http://127.0.0.1:9"}
    env.pop("BARK_SERVE_URL", None)
    res = subprocess.run([sys.executable, "-m", "bark_serve.cli", "batch", "status", "b_" + "0" * 32],
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 1
    assert res.stderr.startswith("bark-serve batch status: error: cannot reach the server")
    assert "Traceback" not in res.stderr


def test_voices_without_model_is_a_usage_error():
    res = subprocess.run([sys.executable, "-m", "bark_serve.cli", "voices"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "--model" in res.stderr and "make-checkpoint" in res.stderr
