"""Test session set-up shared by all test modules, and fixtures more than one module uses."""
import os
from typing import Iterator

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported (timm and torch_geometric import it), so
# it is set here, before any test module runs: without a GPU the fused kernel of gcn_lib.kernels
# then runs in Triton's CPU interpreter when a test calls it directly.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist every worker already occupies a core: one intra-op thread each avoids
# oversubscribing the machine (several threads per worker made small CPU passes 5-30x slower).
# OMP_NUM_THREADS also tells the trainer's run (vig.trainer.threads) to keep that count.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def fast_in_process_runs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For modules that call train.main in-process: skip the MAC count (a model trace that other tests
    cover) and use one thread (with `pytest -n 2` on two cores, more threads per worker only make them
    wait for each other)."""
    import vig.trainer.setup

    monkeypatch.setattr(vig.trainer.setup, "log_model_size", lambda model, input_size: None)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the trainer then keeps torch's count (vig.trainer.threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
