"""What the models share for timm's feature API (`forward_intermediates`, ``features_only=True``)."""
from __future__ import annotations

from typing import Sequence

import torch
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from torch import nn


def check_feature_request(output_fmt: str, norm: bool) -> None:
    """ValueError unless the request is what every model here gives: 'NCHW' maps, no final norm."""
    if output_fmt != "NCHW":
        raise ValueError(f"output_fmt={output_fmt!r} is not supported; the features are 'NCHW' maps")
    if norm:
        raise ValueError("norm=True is not supported: the model has no final norm layer")


def forward_taking(layers: Sequence[nn.Module], x: torch.Tensor, ends: Sequence[int],
                   indices: int | Sequence[int] | None, stop_early: bool = False,
                   grad_checkpointing: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run x (B, C, H, W) through ``layers`` in order and keep the feature levels timm's ``indices`` ask for.

    Args:
        layers: the modules after the stem, one map in and one map out each.
        ends: ``ends[j]`` is the index in ``layers`` of the last layer of feature level j.
        indices: levels to keep (timm's `feature_take_indices`: None all, an int the last n, a sequence those,
            negative from the end).
        stop_early: run no layer after the last requested level (the returned map is then that level's).
        grad_checkpointing: checkpoint each layer (timm's `checkpoint`; not under TorchScript).

    Returns:
        The last layer's map and the kept levels' maps, in layer order.
    """
    take_indices, max_index = feature_take_indices(len(ends), indices)
    taken = {ends[i] for i in take_indices}
    if stop_early:
        layers = layers[:ends[max_index] + 1]
    intermediates = []
    for i, layer in enumerate(layers):
        if grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint(layer, x)
        else:
            x = layer(x)
        if i in taken:
            intermediates.append(x)
    return x, intermediates
