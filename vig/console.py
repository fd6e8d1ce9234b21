"""What every command line of the project shares: one-line errors, plain-text tables, model-name hints.

Used by ``train.py`` (through `vig.trainer.cli`) and by the tools in ``vig.tools``; part of the base
layer so that both may import it.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from typing import Sequence

import timm

from vig.errors import UsageError


class OneLineErrorParser(argparse.ArgumentParser):
    """ArgumentParser whose mistakes raise `UsageError` (one line) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def fail(prog: str | None, error: BaseException | str) -> int:
    """Print ``prog: error: <message>`` (``error: ...`` without a prog) as one line on stderr; returns 2."""
    prefix = f"{prog}: error: " if prog else "error: "
    print(prefix + " ".join(str(error).split()), file=sys.stderr, flush=True)
    return 2


def format_table(rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces; the first row is the header."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells)


def require_model(name: str) -> None:
    """`UsageError` naming up to three close registered names when timm does not know ``name``."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UsageError(f"unknown model {name!r}{hint}")
