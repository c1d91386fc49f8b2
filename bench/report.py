"""Printing of benchmark tables and progress."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table


def progress_to_stderr(line: str) -> None:
    """The default progress sink of the benchmarks: a line on stderr, at once."""
    print(line, file=sys.stderr, flush=True)


def print_wide(table: Table) -> None:
    """Print a table; to a file or a pipe at 140 columns, not squeezed to 80."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)
    console.print(table)


def add_skipped(table: Table, skipped: dict[str, str], notes: list[str]) -> None:
    """A row, and a caption note, for each network that could not run."""
    for name, reason in skipped.items():
        table.add_row(name, "skipped", *[""] * (len(table.columns) - 2))
        notes.append(f"{name} skipped: {reason}")
