"""torchrun worker of tests/test_train_distributed.py: start the process group, all-reduce, die once.

Usage: torchrun ... tests/restart_worker.py FOLDER [--die]

Every round: vig.trainer.distributed.init_distributed, then an all-reduce of ones, printed with this process's
TORCHELASTIC_RESTART_COUNT. In the first round (FOLDER/died absent when the process starts), a worker
given --die creates FOLDER/died and SIGKILLs itself; the others wait until their agent stops them to
start the next round. In later rounds the workers given --die start their process group 1 s after all
the others have started theirs (each announces it with FOLDER/started-<RANK>), so that those look for
them in the store before they write anything there; then every worker exits normally.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time
from pathlib import Path

import torch

# vig/trainer/distributed.py alone: importing the vig package also imports timm and the models, which would double
# the start-up time of every round of this worker
_SPEC = importlib.util.spec_from_file_location(
    "vig_distributed", Path(__file__).parents[1] / "vig" / "trainer" / "distributed.py")
distributed = sys.modules[_SPEC.name] = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(distributed)


def main(folder: Path, die: bool) -> None:
    died = folder / "died"
    first_round = not died.exists()
    if not first_round and die:
        others = int(os.environ["WORLD_SIZE"]) - int(os.environ["LOCAL_WORLD_SIZE"])
        while len(list(folder.glob("started-*"))) < others:
            time.sleep(0.05)
        time.sleep(1)
    elif not first_round:
        (folder / f"started-{os.environ['RANK']}").touch()
    ctx = distributed.init_distributed()
    total = distributed.all_reduce_sum(torch.ones(1, dtype=torch.float64), ctx)
    print(f"rank {ctx.rank} restart count {os.environ['TORCHELASTIC_RESTART_COUNT']}: sum {int(total.item())}",
          flush=True)
    if first_round:
        if die:
            died.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)
    distributed.shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--die" in sys.argv[2:])
