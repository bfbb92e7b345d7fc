"""Tables as their reader gets them. Piped or redirected (`make demo > log`, `ekx compare |
less`), a table is printed whole, as Markdown, whatever the width. In a terminal no cell is
ever cut: figures keep every digit, a long name folds onto a second line, and the columns
that do not fit beside the first ones (the run's name) go to another block under the first,
which repeats the names - rich alone squeezes every column to `98…` and `transfo…`.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

GAP = 3  # characters a column takes beside its text: padding of 1 on each side, a divider


def markdown(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(columns), "|" + "---|" * len(columns), *map(line, rows)]) + "\n"


def _width(header: str, cells: list[str]) -> int:
    """The narrowest a column can be without cutting: its longest cell or header (neither wraps)."""
    return max([len(c) for c in cells] + [len(header)])


def blocks(columns: Sequence[str], rows: Sequence[Sequence[str]], width: int, keys: int = 1) -> list[list[int]]:
    """Column indices per block: the ``keys`` first columns in every block, then as many
    others as fit in ``width`` (at least one: a wider single column folds)."""
    widths = [_width(h, [r[i] for r in rows]) for i, h in enumerate(columns)]
    used_by_keys = sum(min(w, key_width(width)) + GAP for w in widths[:keys])
    out: list[list[int]] = []
    current: list[int] = []
    used = used_by_keys
    for i in range(keys, len(columns)):
        if current and used + widths[i] + GAP > width:
            out.append(current)
            current, used = [], used_by_keys
        current.append(i)
        used += widths[i] + GAP
    if current or not out:
        out.append(current)
    return [[*range(keys), *b] for b in out]


def key_width(width: int) -> int:
    """A name column's widest: half the line (a longer name folds onto a second line)."""
    return max(width // 2 - GAP, 8)


def show(
    console: Console,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    title: str = "",
    caption: str = "",
    keys: int = 1,
) -> None:
    """Print a table: Markdown when the console is no terminal, else folded blocks (above)."""
    rows = [[str(c) for c in r] for r in rows]
    if not console.is_terminal:
        text = (f"{title}\n\n" if title else "") + markdown(columns, rows) + (f"\n{caption}\n" if caption else "")
        console.print(text, soft_wrap=True, highlight=False, markup=False)  # and a blank line after it
        return
    parts = blocks(columns, rows, console.width, keys)
    for n, part in enumerate(parts):
        table = Table(
            title=title if n == 0 else None,
            caption=caption if n == len(parts) - 1 else None,
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        for i in part:
            # names may fold onto a second line, never lose a character; figures do not wrap
            fits = min(_width(columns[i], [r[i] for r in rows]), key_width(console.width))
            table.add_column(
                Text(columns[i]),
                overflow="fold",
                no_wrap=i >= keys and len(part) > keys + 1,  # a lone column wider than the line folds
                min_width=fits if i < keys else None,
                max_width=fits if i < keys else None,
            )
        for r in rows:
            table.add_row(*(Text(r[i]) for i in part))  # Text: a name's [brackets] are no markup
        console.print(table, highlight=False)
