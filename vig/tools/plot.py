"""Training curves of one or more runs: ``vig-plot RUN_A/summary.csv RUN_B --out curves.png``.

A run folder stands for the summary.csv inside it.

Draws one figure with three panels (loss, top-1, learning rate against epoch) and overlays the runs,
each named after the folder that holds its CSV (`vig.trainer.curves`; the trainer draws the same
picture as ``curves.png`` in its run folder after every epoch).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from vig.console import OneLineErrorParser, fail
from vig.trainer.curves import plot_runs
from vig.trainer.saver import SUMMARY_NAME

PROG = "vig-plot"


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("summaries", nargs="+", type=Path, metavar="SUMMARY_CSV",
                        help="summary.csv files or run folders holding one; each run is named after its folder")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    try:
        args = parser.parse_args(argv)
        plot_runs([path / SUMMARY_NAME if path.is_dir() else path for path in args.summaries], args.out)
    except (ValueError, OSError) as error:
        return fail(PROG, error)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
