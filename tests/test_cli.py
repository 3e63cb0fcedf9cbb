"""The command line: `--help` for the app and every command, and a help that stays light (no heavy
library imported just to list the commands)."""

import json
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands)  # the names the CLI really answers to


def test_the_app_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    assert {"download", "mirror", "normalize"} <= set(COMMANDS)
    for name in COMMANDS:
        assert name in result.output


def test_no_arguments_shows_the_help():
    result = CliRunner().invoke(app, [])
    assert "Usage:" in result.output and "download" in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_help(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert f"Usage: " in result.output and command in result.output
    assert "--params" in result.output or command not in ("download", "mirror", "normalize")


def test_download_and_normalize_help_name_their_options():
    download = CliRunner().invoke(app, ["download", "--help"]).output
    assert "corpus" in download.lower() and "--out" in download and "prosocial_dialog" in download
    normalize = CliRunner().invoke(app, ["normalize", "--help"]).output
    assert "--raw" in normalize and "--out" in normalize
    mirror = CliRunner().invoke(app, ["mirror", "--help"]).output
    assert "--corpus" in mirror and "--out" in mirror


def test_help_does_not_import_heavy_libraries(repo_root):
    # A fresh interpreter: building the app (what `python -m pipeline --help` does) must not pull in
    # torch, transformers, pandas, pyarrow or datasets; those load inside the commands that need them.
    code = ("import sys, json; from pipeline.cli import app; "
            "from typer.testing import CliRunner; out = CliRunner().invoke(app, ['--help']); "
            "heavy = ['torch', 'transformers', 'pandas', 'pyarrow', 'datasets', 'sklearn']; "
            "print(json.dumps({'exit': out.exit_code, 'loaded': [m for m in heavy if m in sys.modules]}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"exit": 0, "loaded": []}


def test_python_dash_m_pipeline_help(repo_root):
    result = subprocess.run([sys.executable, "-m", "pipeline", "--help"], cwd=repo_root, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "python -m pipeline" in result.stdout
    for name in COMMANDS:
        assert name in result.stdout
