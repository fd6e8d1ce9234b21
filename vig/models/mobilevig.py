"""MobileViG (sparse vision graph attention, SVGA), registered with timm.

Paper: "MobileViG: Graph-Based Sparse Attention for Mobile Vision Applications", Mustafa Munir, William Avery and
Radu Marculescu, CVPR Workshops 2023, arXiv:2307.00395. Code and weights: SLDGroup/MobileViG.

One class, `MobileViG`, builds every size; `SIZES` is the only size table. The module layout and parameter names are
those of the published ``models/mobilevig.py``, so its checkpoints load strictly: ``stem.stem.*``,
``local_backbone.{i}`` (inverted residuals ``.mlp.*`` / ``.layer_scale_2`` and Downsamples ``.conv.*``),
``backbone.{i}`` (Downsample or ``Sequential(Grapher, FFN)``), ``prediction.{1,2}``, ``head``, ``dist_head``. The
stem, Downsample, inverted residual, FFN and the distilled head are the shared blocks of `vig.models.vig_blocks`.
The SVGA graph rule and the published quirks are written down in docs/model-notes.md ("MobileViG and GreedyViG").

Stage maps (`forward_intermediates`, ``features_only``) are at strides 4, 8, 16, 32: the ends of the three local
stages (before each Downsample) and the end of the global stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_module
from torch import nn

from gcn_lib import SVGA
from vig.models.features import check_feature_request, forward_taking
from vig.models.pretrained import MOBILEVIG_HUB, MOBILEVIG_PAPER, weights_cfg
from vig.models.vig_blocks import (FFN, DistilledConvNet, Downsample, EfficientStem, InvertedResidual, conv_bn,
                                   create_efficient, drop_path_layer, efficient_cfg)

register_notrace_module(SVGA)


@dataclass(frozen=True)
class MobileViGSize:
    """Blocks and channels of the three local (inverted residual) stages and of the global (SVGA) stage(s), and
    the width of the head's 1x1 conv before the classifiers."""

    local_blocks: tuple[int, ...]
    local_channels: tuple[int, ...]
    global_blocks: tuple[int, ...]
    global_channels: tuple[int, ...]
    emb_dims: int


SIZES: dict[str, MobileViGSize] = {
    "ti": MobileViGSize(local_blocks=(2, 2, 6), local_channels=(42, 84, 168), global_blocks=(2,),
                        global_channels=(256,), emb_dims=512),
    "s": MobileViGSize(local_blocks=(3, 3, 9), local_channels=(42, 84, 176), global_blocks=(3,),
                       global_channels=(256,), emb_dims=512),
    "m": MobileViGSize(local_blocks=(3, 3, 9), local_channels=(42, 84, 224), global_blocks=(3,),
                       global_channels=(400,), emb_dims=768),
    "b": MobileViGSize(local_blocks=(5, 5, 15), local_channels=(42, 84, 240), global_blocks=(5,),
                       global_channels=(464,), emb_dims=768),
}


class SVGAConv(nn.Module):
    """cat([x, SVGA(x)]) -> 1x1 conv 2C -> 2C, BN(2C), GELU: (B, C, H, W) -> (B, 2C, H, W)."""

    def __init__(self, dim: int, k: int = 2, **dd: Any) -> None:
        super().__init__()
        self.aggregate = SVGA(k)
        self.nn = nn.Sequential(nn.Conv2d(dim * 2, dim * 2, 1, **dd), nn.BatchNorm2d(dim * 2, **dd), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nn(torch.cat([x, self.aggregate(x)], 1))


class Grapher(nn.Module):
    """x + drop_path(fc2(SVGAConv(fc1(x)))): fc1 1x1 conv + BN, fc2 1x1 conv 2C -> C + BN; (B, C, H, W) -> same."""

    def __init__(self, dim: int, drop_path: float = 0.0, k: int = 2, **dd: Any) -> None:
        super().__init__()
        self.fc1 = conv_bn(dim, dim, **dd)
        self.graph_conv = SVGAConv(dim, k, **dd)
        self.fc2 = conv_bn(dim * 2, dim, **dd)
        self.drop_path = drop_path_layer(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.fc2(self.graph_conv(self.fc1(x))))


class MobileViG(DistilledConvNet):
    """MobileViG: images (B, in_chans, H, W) -> logits (B, num_classes).

    Args:
        local_blocks, local_channels: inverted-residual blocks and channels of the three local stages.
        global_blocks, global_channels: (Grapher, FFN) blocks and channels of the global stage(s).
        emb_dims: width of the head's 1x1 conv before the classifiers.
        k: SVGA stride K.
        num_classes, in_chans, drop_rate (before the classifiers), drop_path_rate (linear over blocks),
        global_pool ('avg' as published; '' keeps the map), device, dtype.
    """

    def __init__(self, local_blocks: Sequence[int], local_channels: Sequence[int], global_blocks: Sequence[int],
                 global_channels: Sequence[int], emb_dims: int = 512, k: int = 2, num_classes: int = 1000,
                 in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0, global_pool: str = "avg",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.in_chans = in_chans
        self.grad_checkpointing = False
        depth = sum(local_blocks) + sum(global_blocks)
        rates = iter(torch.linspace(0, drop_path_rate, depth, device="cpu").tolist())
        self.stem = EfficientStem(in_chans, local_channels[0], **dd)
        local: list[nn.Module] = []
        self.feature_info: list[dict[str, Any]] = []
        self.local_ends: list[int] = []
        for i, (count, width) in enumerate(zip(local_blocks, local_channels)):
            if i > 0:
                local.append(Downsample(local_channels[i - 1], width, **dd))
            local.extend(InvertedResidual(width, next(rates), **dd) for _ in range(count))
            self.local_ends.append(len(local) - 1)
            self.feature_info.append(dict(num_chs=width, reduction=4 * 2**i, module=f"local_backbone.{len(local) - 1}"))
        local.append(Downsample(local_channels[-1], global_channels[0], **dd))
        self.local_backbone = nn.ModuleList(local)
        blocks: list[nn.Module] = []
        for i, (count, width) in enumerate(zip(global_blocks, global_channels)):
            if i > 0:
                blocks.append(Downsample(global_channels[i - 1], width, **dd))
            for _ in range(count):
                rate = next(rates)
                blocks.append(nn.Sequential(Grapher(width, rate, k, **dd), FFN(width, "gelu", rate, **dd)))
        self.backbone = nn.ModuleList(blocks)
        self.feature_info.append(dict(num_chs=global_channels[-1], reduction=32, module=f"backbone.{len(blocks) - 1}"))
        self._build_head(global_channels[-1], emb_dims, num_classes, drop_rate, global_pool, **dd)
        self._init_convs()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^stem", blocks=[(r"^local_backbone\.(\d+)", None), (r"^backbone\.(\d+)", (1000,))])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> last map (B, C, H/32, W/32)."""
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq([*self.local_backbone, *self.backbone], x)
        for layer in self.local_backbone:
            x = layer(x)
        for layer in self.backbone:
            x = layer(x)
        return x

    def feature_ends(self) -> list[int]:
        """Index in local_backbone + backbone (one sequence) of the last layer of each stage map: the three
        local stage ends and, unless pruned away, the global stage's end."""
        layers = len(self.local_backbone) + len(self.backbone)
        return self.local_ends[:len(self.feature_info)] + ([layers - 1] if len(self.backbone) > 0 else [])

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Stage maps at strides 4, 8, 16, 32 (the local stage ends and the global end); ``stop_early`` runs no
        layer after the last requested one."""
        check_feature_request(output_fmt, norm)
        x, intermediates = forward_taking([*self.local_backbone, *self.backbone], self.stem(x), self.feature_ends(),
                                          indices, stop_early, self.grad_checkpointing)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the layers after the last stage in ``indices`` (and the head); returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        if max_index < len(self.local_ends):
            self.local_backbone = self.local_backbone[:self.local_ends[max_index] + 1]
            self.backbone = nn.ModuleList()
            self.num_features = self.feature_info[max_index]["num_chs"]
            self.feature_info = self.feature_info[:max_index + 1]
        if prune_head:
            self._prune_head()
        return take_indices


def _create(variant: str, size: str, pretrained: bool = False, **kwargs: Any) -> MobileViG:
    return create_efficient(MobileViG, variant, SIZES[size], pretrained, **kwargs)


# The authors' ImageNet-1k weights on the Hugging Face hub: their training script's checkpoints, whose
# `state_dict` (not `state_dict_ema`) is what their `--resume FILE --eval` evaluates. The file names are those the
# authors' README and detection backbones load from that repository's download; the Ti file's name is published
# nowhere, so mobilevig_ti has no tag.
_MOBILEVIG_WEIGHTS = {"mobilevig_s": ("MobileViG_S_78_2.pth.tar", 78.2), "mobilevig_m": ("MobileViG_M_80_7.pth.tar", 80.6),
                      "mobilevig_b": ("MobileViG_B_82_6.pth.tar", 82.6)}

default_cfgs = generate_default_cfgs({
    **{f"{name}.in1k": weights_cfg(efficient_cfg(), hf_hub_id=MOBILEVIG_HUB, hf_hub_filename=file, top1=top1,
                                   **MOBILEVIG_PAPER) for name, (file, top1) in _MOBILEVIG_WEIGHTS.items()},
    "mobilevig_ti": efficient_cfg(),
})


@register_model
def mobilevig_ti(pretrained: bool = False, **kwargs: Any) -> MobileViG:
    """MobileViG-Ti: local 2 / 2 / 6 blocks of 42 / 84 / 168, 2 SVGA blocks of 256, emb 512 (5.27 M)."""
    return _create("mobilevig_ti", "ti", pretrained, **kwargs)


@register_model
def mobilevig_s(pretrained: bool = False, **kwargs: Any) -> MobileViG:
    """MobileViG-S: local 3 / 3 / 9 blocks of 42 / 84 / 176, 3 SVGA blocks of 256, emb 512 (7.28 M)."""
    return _create("mobilevig_s", "s", pretrained, **kwargs)


@register_model
def mobilevig_m(pretrained: bool = False, **kwargs: Any) -> MobileViG:
    """MobileViG-M: local 3 / 3 / 9 blocks of 42 / 84 / 224, 3 SVGA blocks of 400, emb 768 (14.08 M)."""
    return _create("mobilevig_m", "m", pretrained, **kwargs)


@register_model
def mobilevig_b(pretrained: bool = False, **kwargs: Any) -> MobileViG:
    """MobileViG-B: local 5 / 5 / 15 blocks of 42 / 84 / 240, 5 SVGA blocks of 464, emb 768 (26.87 M)."""
    return _create("mobilevig_b", "b", pretrained, **kwargs)
