"""The typer application that every command module registers on, and the one-line error handling."""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
import typer.main
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from graphprune import artifacts
from graphprune.cli.flags import as_flags, command_flags, running
from graphprune.errors import GraphpruneError

# Every command in the order a user needs them (prune or shrink, verify, measure; then deployment), with the module
# that registers it and the line `graphprune --help` shows for it. A module is imported only when its command
# runs: `graphprune --help` never loads onnx-ir, ONNX Runtime or numpy (tests check each line is the first line
# of the command's docstring). A command registered by a module imported some other way comes after these.
COMMANDS: dict[str, tuple[str, str]] = {
    "apply": (
        "graphprune.cli.prune",
        "Prune a model's weights (2:4 by default) and write a new model plus a JSON report.",
    ),
    "check": (
        "graphprune.cli.prune",
        "Verify every weight's N:M pattern along K and TensorRT's sparse eligibility; exit 1 on a violation.",
    ),
    "eval": (
        "graphprune.cli.evaluate",
        "Measure what pruning cost: the pruned model's outputs and perplexity next to the dense model's.",
    ),
    "calibrate": (
        "graphprune.cli.calibrate",
        "Measure activations once (Σx² per input channel of every weight) and save them for any number of prunes.",
    ),
    "shrink": (
        "graphprune.cli.shrink",
        "Remove whole neurons, heads, filters or blocks and write a smaller dense model plus a JSON report.",
    ),
    "quantize": (
        "graphprune.cli.quantize",
        "Quantize a (pruned) model to Q/DQ ONNX and write it plus a JSON report; the N:M pattern is kept and "
        "proved.",
    ),
    "convert": (
        "graphprune.cli.deploy",
        "Convert weights and computation to FP16 or BF16 for TensorRT, keeping every pruned zero.",
    ),
    "build": (
        "graphprune.cli.deploy",
        "Build a TensorRT or TensorRT-RTX engine with sparse weights and report what the builder said about "
        "sparsity.",
    ),
    "bench": (
        "graphprune.cli.deploy",
        "Measure what 2:4 sparsity gains: dense vs sparse, same shapes, one run, with the ratio (needs a GPU).",
    ),
}
COMMAND_ORDER = tuple(COMMANDS)


class _OrderedGroup(TyperGroup):
    """The command group: commands listed from :data:`COMMANDS` without importing them, each module imported
    when its command runs (or its own ``--help`` is asked for), and empty values refused before any command."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        """Refuse an empty value (``-o ""``) before any command sees it: as a path it would mean the current
        directory, and no option of graphprune takes an empty text."""
        for i, arg in enumerate(args):
            if arg == "" or (arg.startswith("-") and arg.endswith("=")):
                option = arg[:-1] if arg else (args[i - 1] if i and args[i - 1].startswith("-") else "")
                where = f"{option} was given an empty value" if option else "an argument is empty"
                console.print(f"[red]error:[/red] {where}: give a file name or value", highlight=False)
                sys.exit(2)
        return super().parse_args(ctx, args)

    def list_commands(self, ctx: Any) -> list[str]:
        registered = [name for name in super().list_commands(ctx) if name not in COMMANDS]
        return [*COMMANDS, *registered]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        """The command, or for the command list a stand-in that only knows its one line of help."""
        if cmd_name in self.commands or cmd_name not in COMMANDS:
            return super().get_command(ctx, cmd_name)
        summary = COMMANDS[cmd_name][1]
        return TyperCommand(cmd_name, help=summary, short_help=summary)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        """Import the module of the command about to run, and take its real command."""
        if args and args[0] in COMMANDS and args[0] not in self.commands:
            importlib.import_module(COMMANDS[args[0]][0])  # registers its commands on `app`
            self.commands[args[0]] = typer.main.get_group(app).commands[args[0]]
        return super().resolve_command(ctx, args)


app = typer.Typer(
    name="graphprune",
    cls=_OrderedGroup,
    help="Prune ONNX models for TensorRT: N:M (2:4) or unstructured sparsity by magnitude, Wanda, SparseGPT or "
    "ALPS (apply), or shrink them to a smaller dense model by removing neurons, heads, filters or blocks "
    "(shrink).\n\n"
    "Typical flow: apply or shrink -> check (verify 2:4) -> eval (quality vs dense) -> convert (FP16) -> build "
    "-> bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _group() -> None:
    """Keeps ``app`` a group of commands however many are registered yet (they are imported on first use)."""


class _FlagConsole(Console):
    """A console whose text shows the running command's flags where the library named parameters (warnings,
    skip reasons, notes: everything a command prints, also from modules that print library text as it is)."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(as_flags(o) if isinstance(o, str) else o for o in objects), **kwargs)


console = _FlagConsole(stderr=True)  # progress, warnings and errors
out = _FlagConsole()  # results: summaries, tables

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """Turn a GraphpruneError (and a few OS errors) into one red line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        flags = command_flags(func)  # library messages name parameters: show this command's flags instead
        try:
            with artifacts.command_scope(), running(flags):  # SIGTERM acts as SIGINT; the journal starts empty
                return func(*args, **kwargs)
        except GraphpruneError as exc:
            message = escape(as_flags(str(exc), flags))
            console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
            sys.exit(2)
        except KeyboardInterrupt as exc:
            signal = "terminated" if isinstance(exc, artifacts.Terminated) else "interrupted"
            console.print(
                f"[red]{signal}[/red]: {escape(artifacts.interruption_note())}", highlight=False, soft_wrap=True
            )
            sys.exit(143 if signal == "terminated" else 130)

    return wrapper  # type: ignore[return-value]  # wraps F with its signature (functools.wraps)
