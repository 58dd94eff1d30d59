"""The typer application that every command module registers on, and the one-line error handling."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from graphprune import artifacts
from graphprune.cli.flags import as_flags, command_flags, running
from graphprune.errors import GraphpruneError

# The order a user needs the commands in: prune, verify, measure; then the optional steps, then deployment.
# A command that is not listed (yet) comes after these, in registration order.
COMMAND_ORDER = ("apply", "check", "eval", "calibrate", "shrink", "convert", "build", "bench")


class _OrderedGroup(TyperGroup):
    def list_commands(self, ctx: click.Context) -> list[str]:
        names = list(super().list_commands(ctx))
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(names, key=lambda name: (rank.get(name, len(rank)), names.index(name)))


app = typer.Typer(
    name="graphprune",
    cls=_OrderedGroup,
    help="Prune ONNX models (Wanda, magnitude, SparseGPT; 2:4 or unstructured) for TensorRT deployment.\n\n"
    "Typical flow: apply (prune) -> check (verify 2:4) -> eval (quality vs dense) -> convert (FP16) -> build.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



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

    return wrapper  # type: ignore[return-value]
