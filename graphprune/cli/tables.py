"""Tables that fit the terminal: one flexible column whose cells are shortened from the middle, nothing wrapped.

Weight names are long and distinctive at both ends (``model.layers.12.mlp.down_proj.weight``), so the flexible
column keeps the start and the end of each name and drops the middle; every other column keeps its natural width.
The full names are in each command's ``--json`` output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from graphprune.cli.flags import as_flags

ELLIPSIS = "…"
MIN_FLEX = 12  # below this a name says nothing; the table may then be wider than the terminal


def shorten(text: str, width: int, head: int | None = None) -> str:
    """``text`` in at most ``width`` cells: its first ``head`` characters (default: two fifths), an ellipsis and
    its end."""
    if len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    head = (width - 1) * 2 // 5 if head is None else min(head, width - 1)
    tail = width - 1 - head
    return text[:head] + ELLIPSIS + text[len(text) - tail :]


def shorten_all(texts: Sequence[str], width: int) -> list[str]:
    """:func:`shorten` with one cut for all, chosen so that distinct texts stay distinct where some cut can.

    ``model.layers.12.mlp.down_proj.weight`` and ``model.layers.13.mlp.down_proj.weight`` differ in the middle:
    the default cut hides the layer number, a cut nearer the start keeps it.
    """
    default = (width - 1) * 2 // 5
    for head in [default, *range(default - 1, -1, -1), *range(default + 1, width)]:
        short = [shorten(t, width, head) for t in texts]
        if len(set(short)) == len(set(texts)):
            return short
    return [shorten(t, width) for t in texts]


@dataclass(frozen=True)
class Col:
    header: str
    justify: str = "left"  # "right" for numbers


def fitted_table(
    console: Console,
    columns: Sequence[Col],
    rows: Sequence[Sequence[str]],
    flex: int = 0,
    title: str | None = None,
    show_header: bool = True,
) -> Table:
    """A borderless table no wider than ``console``: column ``flex`` (plain text) is shortened to fit. Library
    reasons in cells (`include_head=True`) show the running command's flags."""
    rows = [[as_flags(cell) for cell in row] for row in rows]
    header = _cell_width(columns[flex].header) if show_header else 0
    natural = max([header] + [_cell_width(r[flex]) for r in rows])
    table = _table(columns, rows, flex, natural, title, show_header)
    unbounded = console.options.update_width(1 << 16)
    excess = Measurement.get(console, unbounded, table).maximum - console.width
    if excess > 0:  # only the flexible column gives way; the others keep their natural width
        table = _table(columns, rows, flex, max(natural - excess, MIN_FLEX), title, show_header)
    return table


def _table(
    columns: Sequence[Col],
    rows: Sequence[Sequence[str]],
    flex: int,
    flex_width: int,
    title: str | None,
    show_header: bool,
) -> Table:
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD if show_header else None,
        show_header=show_header,
        pad_edge=False,
        show_edge=False,
        title_justify="left",
    )
    for col in columns:
        table.add_column(col.header, justify=col.justify, no_wrap=True)  # type: ignore[arg-type]  # rich wants a Literal; Col.justify is left/right
    names = shorten_all([row[flex] for row in rows], flex_width)
    for row, name in zip(rows, names, strict=True):
        cells: list[str | Text] = list(row)
        cells[flex] = Text(name)  # names are plain text, never markup
        table.add_row(*cells)
    return table


def _cell_width(cell: str) -> int:
    return Text.from_markup(cell).cell_len
