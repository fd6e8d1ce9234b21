"""Shape formatting for error messages that TorchScript can compile (``tuple(x.shape)`` it cannot)."""
from __future__ import annotations

from typing import List


def shape_str(shape: List[int]) -> str:
    """``str(tuple(shape))``: ``(2, 3)``, ``(5,)``, ``()``; in eager code and in scripted code alike."""
    dims = [str(int(d)) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
