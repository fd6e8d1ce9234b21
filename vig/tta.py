"""Flip test-time augmentation, the one definition used by the trainer's `--tta` and by the models."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["predict_flip_tta"]


def predict_flip_tta(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Mean of the logits of images (B, C, H, W) and of their horizontal mirrors -> (B, classes)."""
    return 0.5 * (model(images) + model(images.flip(-1)))
