"""What a model tells a generic trainer beyond "images in, logits out", as two runtime-checkable protocols.

`ExtraLosses`: the training loss has named terms besides the classification loss (the batch-graph model's
``edge`` term). The trainer calls ``model(images, **model.extra_forward_kwargs)`` -> (logits, extras) in
training (through its DDP wrapper, so that gradients are synchronised), then, outside autocast,
``model.extra_losses(extras, targets, label_smoothing)`` -> {name: scalar loss} and adds each term, weighted,
to the classification loss. `vig.trainer` weighs the ``edge`` term by ``--edge-loss-weight``.

`BatchDependent`: a sample's prediction depends on the other images of its batch (a graph over the batch),
so training batches need at least ``min_train_batch_size`` images and evaluation runs in a fixed shuffled
order rather than a class-sorted one.

The trainer tests ``isinstance(model, ExtraLosses)`` / ``isinstance(model, BatchDependent)`` on the
unwrapped model; it never looks at a model's name or module.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import torch

EDGE_LOSS = "edge"  # the extra term of a batch-graph edge loss: `vig.trainer` weighs it by --edge-loss-weight


@runtime_checkable
class ExtraLosses(Protocol):
    """A model whose training loss has extra named terms (see the module docstring for the call order)."""

    extra_forward_kwargs: Mapping[str, Any]  # the training forward's keywords: it then returns (logits, extras)
    extra_loss_names: tuple[str, ...]  # the keys `extra_losses` returns

    def extra_losses(self, extras: Any, targets: torch.Tensor, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
        """The extra terms of a batch, each a 0-dim tensor, from the forward's ``extras`` and the trainer's
        targets: class indices (B,), or the (B, C) label vectors of timm's `Mixup`, smoothed by
        ``label_smoothing``. Called outside autocast."""
        ...


@runtime_checkable
class BatchDependent(Protocol):
    """A model whose predictions depend on the other images of the batch."""

    min_train_batch_size: int  # the fewest images a training batch may have
