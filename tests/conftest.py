"""Test session set-up shared by all test modules."""
import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported (timm and torch_geometric import it), so
# it is set here, before any test module runs: without a GPU the fused kernel of gcn_lib.kernels
# then runs in Triton's CPU interpreter when a test calls it directly.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist every worker already occupies a core: one intra-op thread each avoids
# oversubscribing the machine (several threads per worker made small CPU passes 5-30x slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
