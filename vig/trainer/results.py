"""--results-file: the result of `train.py --evaluate` written as JSON, or as CSV for a ``.csv`` name (timm
validate.py's habit)."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Mapping

from vig.errors import RunError

__all__ = ["RESULT_COLUMNS", "write_results"]

_LOGGER = logging.getLogger(__name__)

# the CSV's first columns, in this order; every other field of the result follows them
RESULT_COLUMNS = ("model", "checkpoint", "top1", "top5", "loss", "count", "img_size", "crop_pct")


def _cell(value: Any) -> Any:
    """A CSV cell: lists as their items joined by spaces, None as an empty cell."""
    if isinstance(value, (list, tuple)):
        return " ".join(str(item) for item in value)
    return "" if value is None else value


def write_results(path: str | Path, result: Mapping[str, Any]) -> Path:
    """Write ``result`` to ``path`` (its folder created): one header line and one row for a ``.csv`` name
    (columns `RESULT_COLUMNS` first), else one JSON object. A file that cannot be written is a RunError."""
    path = Path(path)
    columns = [*RESULT_COLUMNS, *(key for key in result if key not in RESULT_COLUMNS)]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="") as handle:
            if path.suffix.lower() == ".csv":
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerow({key: _cell(result.get(key)) for key in columns})
            else:
                json.dump({key: result.get(key) for key in columns}, handle, indent=2)
                handle.write("\n")
    except OSError as err:
        raise RunError(f"--results-file: cannot write {path}: {err.strerror or err}") from None
    _LOGGER.info("result written to %s", path)
    return path
