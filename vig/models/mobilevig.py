"""MobileViG (sparse vision graph attention, SVGA), registered with timm.

Module layout and parameter names are those of the published MobileViG (SLDGroup/MobileViG
``models/mobilevig.py``), so its checkpoints load strictly: ``stem.stem.*``, ``local_backbone.{i}``
(inverted residuals ``.mlp.*`` / ``.layer_scale_2`` and Downsamples ``.conv.*``), ``backbone.{i}``
(Downsample or ``Sequential(Grapher, FFN)``), ``prediction.{1,2}``, ``head``, ``dist_head``.
See ``../shared/DESIGN.md`` ("Efficient ViG family").

Stage maps (`forward_intermediates`, ``features_only``) are at strides 4, 8, 16, 32: the ends of the three
local stages (before each Downsample) and the end of the global stage.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from timm.layers import DropPath, SelectAdaptivePool2d
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_module
from torch import nn

from gcn_lib import SVGA, DAGA
from vig.checkpoint import checkpoint_filter_fn
from vig.models.features import check_feature_request, forward_taking
from vig.models.pretrained import MOBILEVIG_HUB, MOBILEVIG_PAPER, build_with_weights, weights_cfg

register_notrace_module(SVGA)
register_notrace_module(DAGA)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLS = ("avg", "max", "avgmax", "")


def efficient_cfg(**kwargs: Any) -> dict[str, Any]:
    """Default cfg of the published MobileViG / GreedyViG ImageNet models."""
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.9,
                interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, first_conv="stem.stem.0",
                classifier=("head", "dist_head"), fixed_input_size=False, **kwargs)


class Stem(nn.Module):
    """3x3 stride-2 conv to C/2, BN, GELU, 3x3 stride-2 conv to C, BN, GELU: (B, in, H, W) -> (B, C, H/4, W/4)."""

    def __init__(self, in_chans: int, channels: int, **dd: Any) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, channels // 2, 3, stride=2, padding=1, **dd), nn.BatchNorm2d(channels // 2, **dd),
            nn.GELU(),
            nn.Conv2d(channels // 2, channels, 3, stride=2, padding=1, **dd), nn.BatchNorm2d(channels, **dd),
            nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)


class Downsample(nn.Module):
    """3x3 stride-2 conv + BN: (B, C_in, H, W) -> (B, C_out, H/2, W/2), rounded up."""

    def __init__(self, in_dim: int, out_dim: int, **dd: Any) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1, **dd),
                                  nn.BatchNorm2d(out_dim, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def conv_bn(in_dim: int, out_dim: int, **dd: Any) -> nn.Sequential:
    """1x1 conv + BN."""
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, 1, **dd), nn.BatchNorm2d(out_dim, **dd))


class InvertedMLP(nn.Module):
    """1x1 expand (4x), BN, GELU, 3x3 depthwise, BN, GELU, 1x1 project, BN; keys ``fc1 norm1 mid mid_norm fc2 norm2``."""

    def __init__(self, dim: int, hidden: int, **dd: Any) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1, **dd)
        self.norm1 = nn.BatchNorm2d(hidden, **dd)
        self.mid = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, **dd)
        self.mid_norm = nn.BatchNorm2d(hidden, **dd)
        self.fc2 = nn.Conv2d(hidden, dim, 1, **dd)
        self.norm2 = nn.BatchNorm2d(dim, **dd)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.fc1(x)))
        x = self.act(self.mid_norm(self.mid(x)))
        return self.norm2(self.fc2(x))


class InvertedResidual(nn.Module):
    """x + drop_path(layer_scale_2 * mlp(x)), layer scale of shape (C, 1, 1): (B, C, H, W) -> same."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale: float = 1e-5, **dd: Any) -> None:
        super().__init__()
        self.mlp = InvertedMLP(dim, dim * 4, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_scale_2 = nn.Parameter(torch.full((dim, 1, 1), layer_scale, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.layer_scale_2 * self.mlp(x))


class SVGAConv(nn.Module):
    """cat([x, SVGA(x)]) -> 1x1 conv 2C -> 2C, BN(2C), GELU: (B, C, H, W) -> (B, 2C, H, W)."""

    def __init__(self, dim: int, k: int = 2, **dd: Any) -> None:
        super().__init__()
        self.aggregate = SVGA(k)
        self.nn = nn.Sequential(nn.Conv2d(dim * 2, dim * 2, 1, **dd), nn.BatchNorm2d(dim * 2, **dd), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nn(torch.cat([x, self.aggregate(x)], 1))


class Grapher(nn.Module):
    """x + drop_path(fc2(SVGAConv(fc1(x)))): fc1 1x1 conv + BN, fc2 1x1 conv 2C -> C + BN."""

    def __init__(self, dim: int, drop_path: float = 0.0, k: int = 2, **dd: Any) -> None:
        super().__init__()
        self.fc1 = conv_bn(dim, dim, **dd)
        self.graph_conv = SVGAConv(dim, k, **dd)
        self.fc2 = conv_bn(dim * 2, dim, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.fc2(self.graph_conv(self.fc1(x))))


class FFN(nn.Module):
    """x + drop_path(fc2(GELU(fc1(x)))), 1x1 convs C -> 4C -> C, each with BN."""

    def __init__(self, dim: int, hidden: int, drop_path: float = 0.0, **dd: Any) -> None:
        super().__init__()
        self.fc1 = conv_bn(dim, hidden, **dd)
        self.act = nn.GELU()
        self.fc2 = conv_bn(hidden, dim, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.fc2(self.act(self.fc1(x))))


class DistilledConvNet(nn.Module):
    """Head, classifier and distillation API shared by MobileViG and GreedyViG.

    ``prediction`` is Sequential(pool, 1x1 conv to emb, BN, GELU, dropout) (published keys
    ``prediction.{1,2}``); ``head`` and ``dist_head`` are 1x1 convs emb -> classes. As timm's DeiT: in eval,
    and in train unless `set_distilled_training` (True), the output is the mean of both heads; distilled
    training returns the pair (head, dist_head).
    """

    def _build_head(self, in_dim: int, emb_dims: int, num_classes: int, drop_rate: float, global_pool: str,
                    **dd: Any) -> None:
        self._check_pool(global_pool)
        self.global_pool = global_pool
        self.num_features = in_dim
        self.head_hidden_size = emb_dims
        self.num_classes = num_classes
        self.distilled_training = False
        self.prediction = nn.Sequential(SelectAdaptivePool2d(pool_type=global_pool), nn.Conv2d(in_dim, emb_dims, 1, **dd),
                                        nn.BatchNorm2d(emb_dims, **dd), nn.GELU(), nn.Dropout(drop_rate))
        self.head = self._classifier(emb_dims, num_classes, **dd)
        self.dist_head = self._classifier(emb_dims, num_classes, **dd)

    @staticmethod
    def _check_pool(global_pool: str) -> None:
        if global_pool not in POOLS:
            raise ValueError(f"global_pool must be one of {POOLS}, got {global_pool!r}")

    @staticmethod
    def _classifier(emb_dims: int, num_classes: int, **dd: Any) -> nn.Module:
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        return nn.Conv2d(emb_dims, num_classes, 1, **dd) if num_classes > 0 else nn.Identity()

    def _init_convs(self) -> None:
        """As published: Kaiming-normal conv weights, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and module.weight.device.type != "meta":
                nn.init.kaiming_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def get_classifier(self) -> tuple[nn.Module, nn.Module]:
        return self.head, self.dist_head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New ``head`` / ``dist_head`` for ``num_classes`` (0: pre-logits), on the model's device and dtype;
        ``global_pool`` '' keeps the map (B, emb, H, W)."""
        reference = next(self.parameters())
        dd = dict(device=reference.device, dtype=reference.dtype)
        if global_pool is not None:
            self._check_pool(global_pool)
            self.global_pool = global_pool
            self.prediction[0] = SelectAdaptivePool2d(pool_type=global_pool)
        self.num_classes = num_classes
        self.head = self._classifier(self.head_hidden_size, num_classes, **dd).train(self.training)
        self.dist_head = self._classifier(self.head_hidden_size, num_classes, **dd).train(self.training)
        self.prediction.train(self.training)

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """(B, C, H, W) -> logits (B, classes), the pair in distilled training; pre-logits (B, emb)."""
        x = self.prediction(x)
        if self.global_pool:
            x_flat = x.flatten(1)
        else:
            x_flat = x
        if pre_logits:
            return x_flat
        head, dist = self.head(x), self.dist_head(x)
        if self.global_pool:
            head, dist = head.flatten(1), dist.flatten(1)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return head, dist
        return (head + dist) / 2

    def forward(self, x):  # unannotated: a string annotation would name no type in an fx graph's TorchScript
        return self.forward_head(self.forward_features(x))

    def _prune_head(self) -> None:
        """Drop prediction and classifiers (no parameters left): forward gives the last kept map."""
        self.prediction = nn.Sequential(nn.Identity())
        self.global_pool = ""
        self.head, self.dist_head = nn.Identity(), nn.Identity()
        self.num_classes = 0
        self.head_hidden_size = self.num_features


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
        self.stem = Stem(in_chans, local_channels[0], **dd)
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
                blocks.append(nn.Sequential(Grapher(width, rate, k, **dd), FFN(width, width * 4, rate, **dd)))
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


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> MobileViG:
    sizes = SIZES[variant]
    return build_with_weights(MobileViG, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=kwargs.pop("out_indices", (0, 1, 2, 3)),
                                                 feature_cls="getter"),
                                **{**sizes, **kwargs})


SIZES: dict[str, dict[str, Any]] = {
    "mobilevig_ti": dict(local_blocks=(2, 2, 6), local_channels=(42, 84, 168), global_blocks=(2,),
                         global_channels=(256,), emb_dims=512),
    "mobilevig_s": dict(local_blocks=(3, 3, 9), local_channels=(42, 84, 176), global_blocks=(3,),
                        global_channels=(256,), emb_dims=512),
    "mobilevig_m": dict(local_blocks=(3, 3, 9), local_channels=(42, 84, 224), global_blocks=(3,),
                        global_channels=(400,), emb_dims=768),
    "mobilevig_b": dict(local_blocks=(5, 5, 15), local_channels=(42, 84, 240), global_blocks=(5,),
                        global_channels=(464,), emb_dims=768),
}

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
    return _create("mobilevig_ti", pretrained, **{"drop_path_rate": 0.1, **kwargs})


@register_model
def mobilevig_s(pretrained: bool = False, **kwargs: Any) -> MobileViG:
    """MobileViG-S: local 3 / 3 / 9 blocks of 42 / 84 / 176, 3 SVGA blocks of 256, emb 512 (7.28 M)."""
    return _create("mobilevig_s", pretrained, **{"drop_path_rate": 0.1, **kwargs})


@register_model
def mobilevig_m(pretrained: bool = False, **kwargs: Any) -> MobileViG:
    """MobileViG-M: local 3 / 3 / 9 blocks of 42 / 84 / 224, 3 SVGA blocks of 400, emb 768 (14.08 M)."""
    return _create("mobilevig_m", pretrained, **{"drop_path_rate": 0.1, **kwargs})


@register_model
def mobilevig_b(pretrained: bool = False, **kwargs: Any) -> MobileViG:
    """MobileViG-B: local 5 / 5 / 15 blocks of 42 / 84 / 240, 5 SVGA blocks of 464, emb 768 (26.87 M)."""
    return _create("mobilevig_b", pretrained, **{"drop_path_rate": 0.1, **kwargs})
