"""Mixed precision: the autocast settings of a run (`Precision`) and how --amp / --amp-dtype resolve to them."""
from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from timm.utils import NativeScaler
from torch import nn

_LOGGER = logging.getLogger(__name__)


@dataclass
class Precision:
    """Autocast settings: dtype None means float32; a gradient scaler with float16 only."""

    device_type: str
    dtype: torch.dtype | None
    scaler: NativeScaler | None

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)


def _cpu_bfloat16_works() -> bool:
    probe = nn.Conv2d(3, 4, 3)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = probe(torch.randn(1, 3, 5, 5))
        return out.dtype == torch.bfloat16
    except RuntimeError as err:
        _LOGGER.debug("bfloat16 autocast probe failed: %s", err)
        return False


def resolve_precision(amp: bool, amp_dtype: str | None, device: torch.device) -> Precision:
    """CUDA: bfloat16 autocast where supported, float16 + gradient scaler otherwise; CPU: bfloat16 (float32 where
    bfloat16 autocast fails). ``--amp-dtype`` named explicitly is used as named, float16 with a gradient scaler.

    Args:
        amp: --amp (an explicit --amp-dtype also turns AMP on).
        amp_dtype: None (choose), 'bfloat16' or 'float16'.
        device: the training device.
    """
    if not amp and amp_dtype is None:
        return Precision(device.type, None, None)
    if device.type == "cuda":
        if amp_dtype is None:
            amp_dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        dtype = getattr(torch, amp_dtype)
        scaler = NativeScaler(device="cuda") if dtype == torch.float16 else None
        _LOGGER.info("AMP: %s autocast on CUDA%s", amp_dtype, " with gradient scaler" if scaler else "")
        return Precision("cuda", dtype, scaler)
    if amp_dtype == "float16":  # asked for by name: float16 autocast, with a gradient scaler as on CUDA
        _LOGGER.info("AMP: float16 autocast on CPU with gradient scaler")
        return Precision("cpu", torch.float16, NativeScaler(device="cpu"))
    if _cpu_bfloat16_works():
        _LOGGER.info("AMP: bfloat16 autocast on CPU")
        return Precision("cpu", torch.bfloat16, None)
    _LOGGER.warning("AMP: bfloat16 autocast is not available on this CPU; falling back to float32")
    return Precision("cpu", None, None)
