"""Small building blocks shared by the graph convolutions: activation and norm factories, BasicConv."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leakyrelu": lambda: nn.LeakyReLU(0.2, inplace=True),
    "prelu": lambda: nn.PReLU(),
    "gelu": lambda: nn.GELU(),
    "hswish": lambda: nn.Hardswish(inplace=True),
    "silu": lambda: nn.SiLU(inplace=True),
    "sigmoid": lambda: nn.Sigmoid(),
    "tanh": lambda: nn.Tanh(),
}

_NORMS: dict[str, Callable[[int], nn.Module]] = {
    "batch": lambda channels: nn.BatchNorm2d(channels, affine=True),
    "instance": lambda channels: nn.InstanceNorm2d(channels, affine=False),
}

ACTIVATIONS: tuple[str, ...] = tuple(_ACTIVATIONS)
NORMS: tuple[str, ...] = tuple(_NORMS)


def _is_none(name: str | None) -> bool:
    return name is None or name.lower() == "none"


def act_layer(name: str) -> nn.Module:
    """Return a fresh activation module for ``name`` (case-insensitive), e.g. ``'gelu'``."""
    key = name.lower()
    if key not in _ACTIVATIONS:
        raise ValueError(f"act={name!r} is not supported; accepted values: {', '.join(ACTIVATIONS)}, none")
    return _ACTIVATIONS[key]()


def norm_layer(name: str, channels: int) -> nn.Module:
    """Return a 2D normalisation over ``channels`` for ``name`` (``'batch'`` or ``'instance'``)."""
    key = name.lower()
    if key not in _NORMS:
        raise ValueError(f"norm={name!r} is not supported; accepted values: {', '.join(NORMS)}, none")
    return _NORMS[key](channels)


class BasicConv(nn.Sequential):
    """A chain of grouped 1x1 convolutions as the published graph convolutions use them.

    For each consecutive pair of ``channels`` it appends ``Conv2d(c_in, c_out, 1, groups=4)``, then
    the norm over the *last* width (as published), the activation and optional ``Dropout2d``.
    The child indices are part of the checkpoint layout (``nn.0`` conv, ``nn.1`` norm).

    Input (B, channels[0], N, 1) or (B, channels[0], H, W); output (B, channels[-1], same spatial).
    """

    def __init__(
        self,
        channels: Sequence[int],
        act: str | None = "relu",
        norm: str | None = None,
        bias: bool = True,
        drop: float = 0.0,
        groups: int = 4,
    ) -> None:
        if len(channels) < 2:
            raise ValueError(f"channels must list at least an input and an output width, got {list(channels)}")
        for width in channels:
            if width % groups:
                raise ValueError(f"channels must be divisible by groups={groups}, got {list(channels)}")
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers.append(nn.Conv2d(c_in, c_out, 1, bias=bias, groups=groups))
            if not _is_none(norm):
                layers.append(norm_layer(norm, channels[-1]))
            if not _is_none(act):
                layers.append(act_layer(act))
            if drop > 0:
                layers.append(nn.Dropout2d(drop))
        super().__init__(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal conv weights, zero biases, unit / zero affine norm parameters."""
        init_convs_(self)
        for module in self.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.InstanceNorm2d)) and module.affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


def init_convs_(root: nn.Module) -> None:
    """The published ViG initialisation of every Conv2d under ``root``: kaiming-normal weight, zero bias."""
    for module in root.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def interleave_channels(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Interleave two (B, C, N, 1) tensors channel by channel: [x_0, m_0, x_1, m_1, ...] -> (B, 2C, N, 1).

    The published models build this order with ``cat([x.unsqueeze(2), m.unsqueeze(2)], 2)``
    followed by a reshape; the grouped conv that follows depends on it.
    """
    b, c, n, w = x.shape
    return torch.stack((x, m), dim=2).reshape(b, 2 * c, n, w)
