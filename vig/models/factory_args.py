"""timm's factory keyword arguments that every model here takes: ``device`` and ``dtype``."""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, TypeVar

import torch
from torch import nn

Init = TypeVar("Init", bound=Callable[..., None])


def takes_device_and_dtype(init: Init) -> Init:
    """Decorate a model's ``__init__`` so that it takes timm's ``device=`` / ``dtype=`` (timm >= 1.0.20 passes
    them to every model): the parameters and buffers are created on ``device`` (the constructor runs under
    ``torch.device(device)``), then the floating-point ones are cast to ``dtype``."""

    @functools.wraps(init)
    def wrapped(self: nn.Module, *args: Any, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        with torch.device(device) if device is not None else contextlib.nullcontext():
            init(self, *args, **kwargs)
        if dtype is not None:
            self.to(dtype=dtype)

    return wrapped  # type: ignore[return-value]


def build_like(model: nn.Module, factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` built on the device of ``model``'s first floating-point parameter, cast to its dtype and
    set to its train mode: for layers replaced after construction (a classifier reset). A model without
    parameters yet (inside its constructor) builds on the current default device."""
    first = next((param for param in model.parameters() if param.is_floating_point()), None)
    with torch.device(first.device) if first is not None else contextlib.nullcontext():
        layer = factory()
    if first is not None:
        layer = layer.to(dtype=first.dtype)
    return layer.train(model.training)
