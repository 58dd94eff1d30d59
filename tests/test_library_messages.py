"""The library speaks of parameters, the command line of flags: no message outside ``graphprune/cli`` names a flag,
and the command line shows each backticked parameter as the running command's own flag."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

import graphprune
from graphprune.cli.app import user_errors
from graphprune.cli.flags import as_flags, command_flags
from graphprune.errors import GraphpruneError

PACKAGE = Path(graphprune.__file__).parent
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*")  # --percdamp, --no-sparse
# Being rewritten by another branch (issue #20, item 3) at the time of writing: their messages move to parameter
# names there. Remove each entry once that branch has landed.
PENDING: set[str] = set()


def _docstrings(tree: ast.AST) -> set[int]:
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, nodes) and node.body and isinstance(node.body[0], ast.Expr):
            value = node.body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                found.add(id(value))
    return found


def _flag_strings(path: Path) -> list[str]:
    """Every string literal (f-string parts included) that names a flag, without docstrings and argv tokens
    (``"--no-deps"`` passed to pip is a flag of pip's, not a message)."""
    tree = ast.parse(path.read_text())
    skip = _docstrings(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            text = node.value
            if re.fullmatch(r"--[a-z][a-z-]*", text):  # one argv token of another program
                continue
            hits += [f"{path.relative_to(PACKAGE)}:{node.lineno}: {m.group(0)}" for m in FLAG.finditer(text)]
    return hits


def _library_files() -> list[Path]:
    files = [p for p in sorted(PACKAGE.rglob("*.py")) if "cli" not in p.relative_to(PACKAGE).parts]
    return [p for p in files if str(p.relative_to(PACKAGE)) not in PENDING]


def test_scanner_finds_a_flag_in_a_message(tmp_path: Path) -> None:
    sample = PACKAGE / "_probe_flag_scan.py"
    try:
        sample.write_text(
            '"""Docs may say --force."""\nraise ValueError(f"pass --force {1} or --no-sparse")\n'
            'ARGS = ["--no-deps"]\n'
        )
        assert [h.split(": ")[1] for h in _flag_strings(sample)] == ["--force", "--no-sparse"]
    finally:
        sample.unlink()


def test_no_library_message_names_a_flag() -> None:
    hits = [hit for path in _library_files() for hit in _flag_strings(path)]
    assert hits == []


def _command(
    force: Annotated[bool, typer.Option("--force")] = False,
    shape: Annotated[list[str] | None, typer.Option()] = None,
    sparse: Annotated[bool, typer.Option("--sparse/--no-sparse")] = True,
    include_head: bool = typer.Option(False),
    output: Annotated[str | None, typer.Option("-o", "--output")] = None,
    method: Annotated[str, typer.Option("--method")] = "wanda",
) -> None:
    """A command as the CLI declares them: Annotated options, a default-style option, a negative flag."""


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        ("out.onnx exists; pass `force=True` to overwrite it", "out.onnx exists; pass --force to overwrite it"),
        ("left dense; `include_head=True`", "left dense; --include-head"),
        ("build with `sparse=False`", "build with --no-sparse"),
        ("`shapes` names x: no such input", "--shape names x: no such input"),  # the library's name differs
        ("`method=magnitude` needs no data", "--method magnitude needs no data"),
        ("`percdamp` must be >= 0", "`percdamp` must be >= 0"),  # not an option of this command: left alone
        ("run `graphprune convert` first", "run `graphprune convert` first"),  # not a parameter at all
    ],
)
def test_parameters_are_shown_as_the_commands_flags(message: str, shown: str) -> None:
    assert as_flags(message, command_flags(_command)) == shown


def test_the_cli_prints_a_library_error_with_its_flags(tmp_path: Path) -> None:
    app = typer.Typer()

    @app.command()
    @user_errors
    def run(force: Annotated[bool, typer.Option("--force")] = False) -> None:
        raise GraphpruneError("x.onnx exists; pass `force=True` to overwrite it")

    result = CliRunner().invoke(app, [])
    assert result.exit_code == 2
    assert result.output.strip() == "error: x.onnx exists; pass --force to overwrite it"
