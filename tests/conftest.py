"""Test session set-up shared by all test modules."""
import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported (timm and torch_geometric import it), so
# it is set here, before any test module runs: without a GPU the fused kernel of gcn_lib.kernels
# then runs in Triton's CPU interpreter when a test calls it directly.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
