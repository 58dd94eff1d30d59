"""Library messages name parameters (`percdamp`, `force=True`); the command line shows its flags instead.

The library writes a parameter in backticks, as a Python call spells it; the running command's own options say
which flag that is (``force`` is ``--force``, ``sparse=False`` is ``--no-sparse``), read from the command
function's typer options, so a message reads right in every command without a table per command. Only library
names that differ from the command's are listed here.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import typing
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

# library parameter (or parameter=value) -> the command's parameter (or parameter=value) where the two differ
ALIASES = {
    "shapes": "shape",  # calibrate/apply take --shape; build/bench take --shapes (found first, by its own name)
    "workspace_gb": "workspace",
    "gram_memory_gb": "gram_memory",
    "count": "windows",
    "dtype=float16": "fp16=True",
    "dtype=bfloat16": "bf16=True",
}

Flags = dict[str, tuple[str, str | None]]  # parameter -> (its flag, the flag that sets it False)

_PARAMETER = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)(?:=([^`]*))?`")
_running: ContextVar[Flags] = ContextVar("graphprune_running_command_flags", default={})  # noqa: B039


def command_flags(func: Callable[..., Any]) -> Flags:
    """The flag of every option of a typer command function, from its ``typer.Option`` declarations."""
    from typer.models import OptionInfo

    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception:  # an annotation that does not evaluate: no flags, the message stays as the library wrote it
        hints = {}
    flags: Flags = {}
    for name, parameter in inspect.signature(func).parameters.items():
        metadata = getattr(hints.get(name), "__metadata__", ())
        info = next((m for m in (*metadata, parameter.default) if isinstance(m, OptionInfo)), None)
        if info is None:
            continue
        declared = [*(info.param_decls or ())]
        if isinstance(info.default, str) and info.default.startswith("-"):  # Annotated: typer.Option("--x")
            declared.insert(0, info.default)
        decls = [part for decl in declared for part in decl.split("/")]
        positive = [d for d in decls if d.startswith("--") and not d.startswith("--no-")]
        negative = [d for d in decls if d.startswith("--no-")]
        flag = positive[0] if positive else "--" + name.replace("_", "-")
        flags[name] = (flag, negative[0] if negative else None)
    return flags


@contextlib.contextmanager
def running(flags: Flags) -> Iterator[None]:
    """While a command runs, :func:`as_flags` speaks of its flags (tables, warnings)."""
    token = _running.set(flags)
    try:
        yield
    finally:
        _running.reset(token)


def as_flags(text: str, flags: Flags | None = None) -> str:
    """``text`` with every backticked parameter of the command (default: the running one) shown as its flag;
    parameters the command does not have stay as they are."""
    flags = _running.get() if flags is None else flags

    def flag(match: re.Match[str]) -> str:
        name, value = match.group(1), match.group(2)
        if name not in flags:
            alias = ALIASES.get(match.group(0)[1:-1], ALIASES.get(name, name))
            name, _, aliased = alias.partition("=")
            value = aliased or value
        if name not in flags:
            return match.group(0)
        positive, negative = flags[name]
        if value == "True":
            return positive
        if value == "False":
            return negative or match.group(0)
        return positive if value is None else f"{positive} {value}"

    return _PARAMETER.sub(flag, text) if flags else text
