"""torchrun worker of tests/test_train_sources.py: train.py's main, recording the targets each rank's loaders give.

Usage: torchrun ... tests/stream_keys_worker.py OUT_DIR TRAIN_PY_ARGS...

Runs `train.main(TRAIN_PY_ARGS)` unchanged but for watching the loaders that vig.trainer.loop hands to
`train_one_epoch` and `validate`. With `--target-key index` (the shard writer's json field holding each
sample's position in its split) the targets are the samples' identities. Writes OUT_DIR/rank<RANK>.json:
{"train": [[targets of epoch 0], ...], "eval": [[targets of validation pass 0], ...]}.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import train
from vig.trainer import loop as trainer_loop


class _Recording:
    """Iterates `loader`, appending the targets of its batches to `seen`; len as the loader's."""

    def __init__(self, loader: Any, seen: list[int]) -> None:
        self.loader, self.seen = loader, seen

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for images, targets in self.loader:
            self.seen.extend(int(target) for target in targets)
            yield images, targets


def main(out_dir: Path, train_argv: list[str]) -> int:
    seen: dict[str, list[list[int]]] = {"train": [], "eval": []}
    original_train, original_validate = trainer_loop.train_one_epoch, trainer_loop.validate

    def train_one_epoch(epoch: int, loader: Iterable, *args: Any, **kwargs: Any) -> Any:
        seen["train"].append([])
        return original_train(epoch, _Recording(loader, seen["train"][-1]), *args, **kwargs)

    def validate(model: Any, loader: Iterable, *args: Any, **kwargs: Any) -> Any:
        seen["eval"].append([])
        return original_validate(model, _Recording(loader, seen["eval"][-1]), *args, **kwargs)

    trainer_loop.train_one_epoch, trainer_loop.validate = train_one_epoch, validate
    status = train.main(train_argv)
    (out_dir / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(seen))
    return status


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
