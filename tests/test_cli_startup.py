"""``graphprune --help`` lists every command without importing any command module (no onnx-ir, ONNX Runtime or
numpy at start), and the lines it shows are the commands' own docstrings."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import typer.main
from typer.testing import CliRunner

from graphprune.cli import app
from graphprune.cli.app import COMMANDS


def test_help_imports_no_command_module() -> None:
    probe = (
        "import sys; from typer.testing import CliRunner; from graphprune.cli import app; "
        "result = CliRunner().invoke(app, ['--help']); assert result.exit_code == 0, result.output; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnx_ir', 'onnxruntime', 'numpy') "
        "or m.startswith('graphprune.cli.') and m not in ('graphprune.cli.app', 'graphprune.cli.flags')))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_help_lists_every_command_in_order_with_its_docstring_line() -> None:
    listed = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).stdout
    rows = [line.strip("│ ").split(None, 1) for line in listed.splitlines() if line.startswith("│ ")]
    shown = {row[0]: row[1].strip(" │") for row in rows if row[0] in COMMANDS}
    assert list(shown) == list(COMMANDS)
    for name, (module, summary) in COMMANDS.items():
        importlib.import_module(module)
        real = typer.main.get_group(app).commands[name]
        first = inspect.getdoc(real.callback).split("\n\n")[0].replace("\n", " ")  # type: ignore[union-attr]
        assert summary == first, name
        assert shown[name] == summary


def test_a_command_runs_after_the_list_was_shown() -> None:
    runner = CliRunner()
    assert "Usage: graphprune check" in runner.invoke(app, ["check", "--help"]).stdout
    result = runner.invoke(app, ["nosuch"])
    assert result.exit_code == 2 and "No such command 'nosuch'" in result.output
