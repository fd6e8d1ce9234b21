"""Mid-epoch checkpoints of a run stopped by a signal, and the choice of what ``--resume auto`` continues.

A stop after step s of epoch e writes interrupted.pth.tar: last.pth.tar's fields (weights, EMA,
optimizer, schedule, ``epoch`` = e - 1, the last finished epoch) plus ``position``: epoch e, step s, the
update count, and per rank the partial loss sums and the states of Python's, numpy's and torch's
generators (CPU and CUDA). Everything else random in an epoch (sampler order, loader worker seeds,
augmentation, mixup, repeated augmentation) is drawn from those generators after the per-epoch
reseed, so replaying the epoch's first s batches through the loader and then restoring the states
continues it bit for bit. The file is removed once epoch e is saved in last.pth.tar.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vig.trainer.saver import INTERRUPTED_NAME, LAST_NAME, atomic_write

_LOGGER = logging.getLogger(__name__)


def capture_generators() -> dict[str, Any]:
    """This process's generator states as plain tensors, lists and numbers (loadable with weights_only)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {"python": random.getstate(),
                             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                                       float(gauss)),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_generators(state: dict[str, Any]) -> None:
    """Put back the states of `capture_generators`."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_interrupted(folder: Path, state: dict[str, Any]) -> Path:
    """Write the mid-epoch checkpoint (atomically) and return its path."""
    path = folder / INTERRUPTED_NAME
    atomic_write(path, lambda handle: torch.save(state, handle))
    return path


def _epoch_of(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception as err:  # damaged: the caller falls back to last.pth.tar
        _LOGGER.warning("ignoring %s: unreadable (%s)", path, type(err).__name__)
        return None


def auto_resume_file(folder: Path) -> Path | None:
    """interrupted.pth.tar when it continues the epoch after last.pth.tar's, else last.pth.tar, else None.

    An interrupted.pth.tar that last.pth.tar has overtaken (a kill after the epoch was saved, before the
    file was removed) is removed here.
    """
    last, interrupted = folder / LAST_NAME, folder / INTERRUPTED_NAME
    last_epoch = _epoch_of(last) if last.is_file() else None
    if interrupted.is_file():
        stopped_epoch = _epoch_of(interrupted)
        if stopped_epoch is not None and (last_epoch is None or stopped_epoch >= last_epoch):
            return interrupted
        _LOGGER.info("removing %s: %s already holds that epoch", interrupted, last)
        interrupted.unlink(missing_ok=True)
    return last if last_epoch is not None else None


def remove_interrupted(folder: Path) -> None:
    """Remove interrupted.pth.tar once a later epoch is saved."""
    (folder / INTERRUPTED_NAME).unlink(missing_ok=True)
