"""Model size and cost: parameter count, MACs (multiply-accumulates) of one image counted by torchprofile,
and the activation memory autograd keeps for the backward pass."""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torchprofile import profile_macs


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (trainable or not), without a forward pass."""
    return sum(parameter.numel() for parameter in model.parameters())


def count_macs(model: nn.Module, img_size: int, in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward pass of a (1, in_chans, img_size, img_size) image in eval mode.

    torchprofile skips operators it has no rule for (graph construction's comparisons, max, ...);
    its warnings about them and the tracer's are silenced here.
    """
    image = torch.randn(1, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No handlers found")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            with torch.no_grad():
                return int(profile_macs(model, image))
    finally:
        model.train(was_training)


@dataclass
class SavedActivations:
    """Running total of what `count_saved_activations` saw."""

    bytes: int = 0


@contextmanager
def count_saved_activations(model: nn.Module) -> Iterator[SavedActivations]:
    """Count the bytes of the tensors autograd saves for backward while the block runs, ``model``'s own
    parameters excluded: the activation memory of a training step, which gradient checkpointing cuts
    (tensors saved inside checkpointed regions are dropped, so they are not counted)."""
    parameters = {param.data_ptr() for param in model.parameters()}
    saved = SavedActivations()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.data_ptr() not in parameters:
            saved.bytes += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved
