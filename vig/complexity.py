"""Model size: parameter count and MACs (multiply-accumulates) of one image, counted by torchprofile."""
from __future__ import annotations

import warnings

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
