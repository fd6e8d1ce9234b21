"""GreedyViG (dynamic axial graph construction, DAGA), registered with timm.

Paper: "GreedyViG: Dynamic Axial Graph Construction for Efficient Vision GNNs", Mustafa Munir, William Avery,
Md Mostafijur Rahman and Radu Marculescu, CVPR 2024, arXiv:2405.06849. Code and weights: SLDGroup/GreedyViG.

One class, `GreedyViG`, builds every size; `SIZES` is the only size table. The module layout and parameter names are
those of the published ``models/greedyvig.py`` (``stem.stem.*``, ``backbone.{stage}.{i}``: Downsample ``.conv.*``,
graph block ``.mixer.*`` / ``.ffn.*`` / ``.layer_scale_{1,2}``, ``prediction.{1,2}``, ``head``, ``dist_head``)
except inside the inverted residuals, which are the one `vig.models.vig_blocks.InvertedResidual` MobileViG uses:
``.mlp.*`` and a (C, 1, 1) ``.layer_scale_2`` where the published files hold ``.dws.*`` and (C,).
`vig.checkpoint.checkpoint_filter_fn` (timm's ``pretrained=True`` path) and the trainer's loader rename them
(`vig.models.vig_blocks.remap_inverted_residuals`), so published checkpoints load strictly. Stage maps are the
ends of the four stages (strides 4, 8, 16, 32). The DAGA graph rule and the published quirks are written down in
docs/model-notes.md ("MobileViG and GreedyViG").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_module
from torch import nn

from gcn_lib import DAGA
from vig.models.features import check_feature_request, forward_taking
from vig.models.pretrained import GREEDYVIG_HUB, GREEDYVIG_PAPER, weights_cfg
from vig.models.vig_blocks import (DistilledConvNet, Downsample, EfficientStem, InvertedResidual, conv_bn,
                                   create_efficient, drop_path_layer, efficient_cfg)

register_notrace_module(DAGA)

STAGE_K: tuple[int, ...] = (8, 4, 2, 1)


@dataclass(frozen=True)
class GreedyViGSize:
    """(local, graph) block counts and channels of each of the four stages, and the head's width."""

    blocks: tuple[tuple[int, int], ...]
    channels: tuple[int, ...]
    emb_dims: int = 768


SIZES: dict[str, GreedyViGSize] = {
    "s": GreedyViGSize(blocks=((2, 2), (2, 2), (6, 2), (2, 2)), channels=(48, 96, 192, 384)),
    "m": GreedyViGSize(blocks=((3, 3), (3, 3), (9, 3), (3, 3)), channels=(56, 112, 224, 448)),
    "b": GreedyViGSize(blocks=((4, 4), (4, 4), (12, 4), (3, 3)), channels=(64, 128, 256, 512)),
}


class DAGAConv(nn.Module):
    """cat([x, DAGA(x)]) -> 1x1 conv 2C -> C, BN, GELU: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim: int, k: int, **dd: Any) -> None:
        super().__init__()
        self.aggregate = DAGA(k)
        self.nn = nn.Sequential(nn.Conv2d(dim * 2, dim, 1, **dd), nn.BatchNorm2d(dim, **dd), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nn(torch.cat([x, self.aggregate(x)], 1))


class ConditionalPositionEncoding(nn.Module):
    """x + depthwise 7x7 conv (x): (B, C, H, W) -> same."""

    def __init__(self, dim: int, kernel_size: int = 7, **dd: Any) -> None:
        super().__init__()
        self.pe = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pe(x) + x


class Grapher(nn.Module):
    """fc2(DAGAConv(fc1(cpe(x)))), fc1 / fc2 1x1 conv + BN; the residual is the block's. (B, C, H, W) -> same."""

    def __init__(self, dim: int, k: int, **dd: Any) -> None:
        super().__init__()
        self.cpe = ConditionalPositionEncoding(dim, **dd)
        self.fc1 = conv_bn(dim, dim, **dd)
        self.graph_conv = DAGAConv(dim, k, **dd)
        self.fc2 = conv_bn(dim, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.graph_conv(self.fc1(self.cpe(x))))


class GraphBlock(nn.Module):
    """x + dp(ls1 * mixer(x)), then + dp(ls2 * ffn(x)); ffn: 1x1 C -> 4C, BN, GELU, 1x1 4C -> C, BN. Layer scales
    of shape (C,) as published; (B, C, H, W) -> same."""

    def __init__(self, dim: int, drop_path: float = 0.0, k: int = 2, layer_scale: float = 1e-5, **dd: Any) -> None:
        super().__init__()
        self.mixer = Grapher(dim, k, **dd)
        self.ffn = nn.Sequential(nn.Conv2d(dim, dim * 4, 1, **dd), nn.BatchNorm2d(dim * 4, **dd), nn.GELU(),
                                 nn.Conv2d(dim * 4, dim, 1, **dd), nn.BatchNorm2d(dim, **dd))
        self.drop_path = drop_path_layer(drop_path)
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), layer_scale, **dd))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), layer_scale, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.mixer(x))
        return x + self.drop_path(self.layer_scale_2[:, None, None] * self.ffn(x))


class GreedyStage(nn.Sequential):
    """[Downsample,] local inverted residuals, then DAGA graph blocks; keys ``backbone.{stage}.{i}``."""


class GreedyViG(DistilledConvNet):
    """GreedyViG: images (B, in_chans, H, W) -> logits (B, num_classes).

    Args:
        blocks: (local, graph) block counts of each of the four stages.
        channels: channels of each stage.
        emb_dims, k (DAGA stride K per stage), num_classes, in_chans, drop_rate, drop_path_rate, global_pool,
        device, dtype: as `vig.models.mobilevig.MobileViG`.
    """

    def __init__(self, blocks: Sequence[Sequence[int]], channels: Sequence[int], emb_dims: int = 768,
                 k: Sequence[int] = STAGE_K, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, global_pool: str = "avg", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.in_chans = in_chans
        self.grad_checkpointing = False
        depth = sum(sum(b) for b in blocks)
        rates = iter(torch.linspace(0, drop_path_rate, depth, device="cpu").tolist())
        self.stem = EfficientStem(in_chans, channels[0], **dd)
        stages: list[nn.Module] = []
        self.feature_info: list[dict[str, Any]] = []
        for i, ((local, graph), width) in enumerate(zip(blocks, channels)):
            layers: list[nn.Module] = [Downsample(channels[i - 1], width, **dd)] if i > 0 else []
            layers.extend(InvertedResidual(width, next(rates), **dd) for _ in range(local))
            layers.extend(GraphBlock(width, next(rates), k[i], **dd) for _ in range(graph))
            stages.append(GreedyStage(*layers))
            self.feature_info.append(dict(num_chs=width, reduction=4 * 2**i, module=f"backbone.{i}"))
        self.backbone = nn.Sequential(*stages)
        self._build_head(channels[-1], emb_dims, num_classes, drop_rate, global_pool, **dd)
        self._init_convs()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        pattern = r"^backbone\.(\d+)" if coarse else r"^backbone\.(\d+)\.(\d+)"
        return dict(stem=r"^stem", blocks=[(pattern, None)])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> last map (B, C, H/32, W/32)."""
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.backbone, x)
        return self.backbone(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Stage maps at strides 4, 8, 16, 32 (the end of each stage); ``stop_early`` runs no stage after the
        last requested one."""
        check_feature_request(output_fmt, norm)
        x, intermediates = forward_taking(self.backbone, self.stem(x), range(len(self.backbone)), indices,
                                          stop_early, self.grad_checkpointing)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last one in ``indices`` (and the head); returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        self.backbone = self.backbone[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        self.num_features = self.feature_info[-1]["num_chs"]
        if prune_head:
            self._prune_head()
        return take_indices


def _create(variant: str, size: str, pretrained: bool = False, **kwargs: Any) -> GreedyViG:
    return create_efficient(GreedyViG, variant, SIZES[size], pretrained, **kwargs)


# The authors' ImageNet-1k weights on the Hugging Face hub (state dicts), as that repository lists them.
_GREEDYVIG_WEIGHTS = {"greedyvig_s": ("S_GreedyViG_81_1.pth", 81.1), "greedyvig_m": ("M_GreedyViG_82_9.pth", 82.9),
                      "greedyvig_b": ("B_GreedyViG_83_9.pth", 83.9)}

default_cfgs = generate_default_cfgs({
    f"{name}.in1k": weights_cfg(efficient_cfg(), hf_hub_id=GREEDYVIG_HUB, hf_hub_filename=file, top1=top1,
                                **GREEDYVIG_PAPER) for name, (file, top1) in _GREEDYVIG_WEIGHTS.items()
})


@register_model
def greedyvig_s(pretrained: bool = False, **kwargs: Any) -> GreedyViG:
    """GreedyViG-S: stages (2, 2) / (2, 2) / (6, 2) / (2, 2) blocks of 48 / 96 / 192 / 384, emb 768 (11.98 M)."""
    return _create("greedyvig_s", "s", pretrained, **kwargs)


@register_model
def greedyvig_m(pretrained: bool = False, **kwargs: Any) -> GreedyViG:
    """GreedyViG-M: stages (3, 3) / (3, 3) / (9, 3) / (3, 3) blocks of 56 / 112 / 224 / 448, emb 768 (21.93 M)."""
    return _create("greedyvig_m", "m", pretrained, **kwargs)


@register_model
def greedyvig_b(pretrained: bool = False, **kwargs: Any) -> GreedyViG:
    """GreedyViG-B: stages (4, 4) / (4, 4) / (12, 4) / (3, 3) blocks of 64 / 128 / 256 / 512, emb 768 (30.91 M)."""
    return _create("greedyvig_b", "b", pretrained, **kwargs)
