"""The main process's intra-op thread count on CPU, chosen from the cores it may use and its loader workers.

torch starts with one intra-op thread per physical core, whatever else runs beside it. Next to `-j`
loader workers, or on a machine that other jobs share, those threads wait for cores at every
parallel region (on a shared 2-core machine the main job ran about 5 times slower with torch's default
than with one thread; docs/training.md, "Threads on CPU"). So, unless the environment chooses (OMP_NUM_THREADS or
MKL_NUM_THREADS set: torch is left alone), each process takes the cores of its affinity mask, shared
evenly among the processes of its node (LOCAL_WORLD_SIZE, set by torchrun), less one per loader
worker, and at least one.
"""
from __future__ import annotations

import logging
import os
from typing import Mapping

import torch

_LOGGER = logging.getLogger(__name__)

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cores() -> int:
    """The number of cores this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def choose_threads(cores: int, workers: int, local_processes: int = 1) -> int:
    """Intra-op threads for a main process: its share of `cores` among `local_processes`, less `workers`, >= 1."""
    return max(1, cores // max(1, local_processes) - workers)


def set_cpu_threads(workers: int, environ: Mapping[str, str] = os.environ) -> int:
    """Set (or, when the environment names a count, keep) torch's intra-op thread count and log it in one line.

    Args:
        workers: the loader worker processes of this process (`-j`).
        environ: where OMP_NUM_THREADS, MKL_NUM_THREADS and LOCAL_WORLD_SIZE are read.

    Returns:
        the thread count torch uses from now on.
    """
    given = [f"{name}={environ[name]}" for name in THREAD_VARIABLES if environ.get(name)]
    if given:
        threads = torch.get_num_threads()
        _LOGGER.info("CPU threads: %d, as the environment sets (%s; the trainer leaves torch's count alone)",
                     threads, ", ".join(given))
        return threads
    cores = usable_cores()
    local_processes = int(environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = choose_threads(cores, workers, local_processes)
    torch.set_num_threads(threads)
    shared = f" shared by {local_processes} processes" if local_processes > 1 else ""
    _LOGGER.info("CPU threads: %d for the main process (%d cores usable%s, %d loader worker(s)); "
                 "OMP_NUM_THREADS=N sets another count", threads, cores, shared, workers)
    return threads
