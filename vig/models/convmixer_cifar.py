"""ConvMixer for CIFAR-10, with the optional inter-block skip of ConvMixer-XL; registered with timm as
``convmixer_cifar`` and ``convmixer_xl_cifar``.

Paper: "Patches Are All You Need?", Asher Trockman and J. Zico Kolter, TMLR 2023, arXiv:2201.09792. `SIZES` is the
only size table; the CIFAR recipes and the figures they gave are in docs/CIFAR.md ("ConvMixer and ConvMixer-XL").

The network is timm's `ConvMixer` (stem, blocks, head):

- stem: a ``patch_size`` x ``patch_size`` conv at stride ``patch_size`` (3 -> ``dim``, with bias), the
  activation, BatchNorm: (B, 3, H, W) -> (B, dim, H / p, W / p);
- ``depth`` blocks, each Residual(depthwise ``kernel_size`` conv with 'same' padding, activation,
  BatchNorm), then a 1x1 conv, activation, BatchNorm (shape kept);
- head: global average pool and a linear layer: (B, dim, h, w) -> (B, num_classes).

ConvMixer-XL adds the inter-block skip: with ``skip_period`` = n > 0 the block stack is split into n
consecutive groups of ``depth // n`` blocks and each group is wrapped in its own timm `Residual`
(group output = blocks(x) + x). ``skip_period`` 0 is the plain stack, with timm's state-dict keys
(``blocks.{i}.*``); with groups the keys are ``blocks.{g}.fn.{j}.*`` (group g, block j in it). The
skip adds no parameters: 594,186 for dim 256 / depth 8 and 4,855,562 for depth 66 (10 classes).

Stages, as `feature_info`, `forward_intermediates` and ``features_only`` see them: each block without
the skip, each group with it (a map inside a group lacks the group's residual), all at stride
``patch_size``. Gradient checkpointing recomputes every block (inside the groups too) in the backward
pass.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from timm.layers import get_act_layer
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models.convmixer import ConvMixer, Residual
from torch import nn

from vig.checkpoint import checkpoint_filter_fn
from vig.models.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR_IMG_SIZE
from vig.models.features import check_feature_request, forward_taking

__all__ = ["SIZES", "BlockSequence", "ConvMixerCifar", "ConvMixerSize", "convmixer_cifar", "convmixer_xl_cifar"]


@dataclass(frozen=True)
class ConvMixerSize:
    """Width, depth, depthwise kernel, patch size, activation and inter-block skip (residual groups) of a size."""

    dim: int
    depth: int
    kernel_size: int
    patch_size: int
    act: str
    skip_period: int


SIZES: dict[str, ConvMixerSize] = {
    "256_8": ConvMixerSize(dim=256, depth=8, kernel_size=5, patch_size=2, act="gelu", skip_period=0),
    "xl": ConvMixerSize(dim=256, depth=66, kernel_size=5, patch_size=2, act="silu", skip_period=3),
}

class BlockSequence(nn.Sequential):
    """Blocks run in order, (B, C, H, W) -> (B, C, H, W); with `grad_checkpointing` set, each block is
    recomputed in the backward pass instead of keeping its activations."""

    def __init__(self, *blocks: nn.Module) -> None:
        super().__init__(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint_seq(self, x, use_reentrant=False)
        for block in self:  # nn.Sequential's forward, which TorchScript cannot reach through super()
            x = block(x)
        return x


class ConvMixerCifar(ConvMixer):
    """timm's ConvMixer with CIFAR defaults, an activation chosen by name and the inter-block skip:
    images (B, C_in, H, W) -> logits (B, num_classes).

    Args:
        num_classes: classifier outputs; 0 gives the pooled (B, dim) features.
        in_chans: image channels.
        dim: channels of the stem and every block.
        depth: number of blocks.
        kernel_size: side of the depthwise convolution of each block.
        patch_size: side and stride of the stem convolution.
        act: activation, a timm name (``gelu``, ``relu``, ``silu``, ...) or a module class.
        skip_period: number of residual groups the blocks are split into (0: no inter-block skip); must
            divide ``depth``.
        global_pool: timm pool type of the head.
        drop_rate: dropout before the classifier.
        device, dtype: where and in what floating-point type the parameters are created (timm's factory
            arguments).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, dim: int = 256, depth: int = 8,
                 kernel_size: int = 5, patch_size: int = 2, act: str | type[nn.Module] = "gelu",
                 skip_period: int = 0, global_pool: str = "avg", drop_rate: float = 0.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        for name, value in (("dim", dim), ("depth", depth), ("kernel_size", kernel_size),
                            ("patch_size", patch_size)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if int(skip_period) != skip_period or skip_period < 0 or (skip_period and depth % skip_period):
            raise ValueError(f"skip_period must be 0 or a positive divisor of depth {depth}, got {skip_period}")
        try:
            act_layer = get_act_layer(act)
        except KeyError:
            raise ValueError(f"act: unknown activation {act!r}") from None
        super().__init__(dim, depth, kernel_size=kernel_size, patch_size=patch_size, in_chans=in_chans,
                         num_classes=num_classes, global_pool=global_pool, drop_rate=drop_rate,
                         act_layer=act_layer, device=device, dtype=dtype)
        self.skip_period = skip_period
        blocks = list(self.blocks)
        if skip_period:
            per_group = depth // skip_period
            self.blocks = nn.Sequential(*[Residual(BlockSequence(*blocks[g * per_group:(g + 1) * per_group]))
                                          for g in range(skip_period)])
        else:
            self.blocks = BlockSequence(*blocks)
        self.feature_info = [dict(num_chs=dim, reduction=patch_size, module=f"blocks.{i}")
                             for i in range(len(self.blocks))]

    def _sequences(self) -> list[BlockSequence]:
        return [self.blocks] if not self.skip_period else [group.fn for group in self.blocks]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay (timm): the stem, then each block (each
        residual group when ``coarse`` and the model has them); the head falls into the last group."""
        blocks = r"^blocks\.(\d+)\.fn\.(\d+)" if self.skip_period and not coarse else r"^blocks\.(\d+)"
        return dict(stem=r"^stem", blocks=blocks)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations; outputs and gradients
        are unchanged (BatchNorm running statistics see each batch twice in training)."""
        self.grad_checkpointing = enable
        for sequence in self._sequences():
            sequence.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C_in, H, W) -> last map (B, dim, H / patch_size, W / patch_size)."""
        return self.blocks(self.stem(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Maps (B, dim, H / patch_size, W / patch_size) of the stages in `feature_info` (each block, or each
        residual group with ``skip_period``); the final output is the last map, as `forward_features` gives.

        Args:
            indices: stages to return: None all, an int the last n, a sequence those (negative from the end).
            norm: must be False (no final norm).
            stop_early: skip the stages after the last requested one.
            output_fmt: ``'NCHW'`` only.
            intermediates_only: return only the list.
        """
        check_feature_request(output_fmt, norm)
        # the residual groups checkpoint their own blocks; without groups each block is checkpointed here
        checkpointed = not self.skip_period and self.grad_checkpointing and torch.is_grad_enabled()
        x, intermediates = forward_taking(self.blocks, self.stem(x), range(len(self.blocks)), indices,
                                          stop_early or intermediates_only, checkpointed)
        if intermediates_only:
            return intermediates
        return x, intermediates


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {"num_classes": 10, "input_size": (3, CIFAR_IMG_SIZE, CIFAR_IMG_SIZE), "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": CIFAR10_MEAN, "std": CIFAR10_STD, "first_conv": "stem.0",
            "classifier": "head", **kwargs}


default_cfgs = generate_default_cfgs({"convmixer_cifar": _cfg(), "convmixer_xl_cifar": _cfg()})


def _create(variant: str, size: str, pretrained: bool, **kwargs: Any) -> ConvMixerCifar:
    if pretrained and not any(key in (kwargs.get("pretrained_cfg_overlay") or {}) for key in ("file", "state_dict")):
        raise ValueError(f"{variant}: no published weights; pass pretrained_cfg_overlay=dict(file=PATH)")
    settings = {**asdict(SIZES[size]), **kwargs}
    stages = settings["skip_period"] or settings["depth"]  # blocks, or residual groups (see feature_info)
    feature_cfg = dict(feature_cls="getter", out_indices=settings.pop("out_indices", stages))
    return build_model_with_cfg(ConvMixerCifar, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=feature_cfg, **settings)


@register_model
def convmixer_cifar(pretrained: bool = False, **kwargs: Any) -> ConvMixerCifar:
    """ConvMixer-256/8 for CIFAR (GELU, kernel 5, patch 2, no inter-block skip); keyword arguments as
    `ConvMixerCifar`."""
    return _create("convmixer_cifar", "256_8", pretrained, **kwargs)


@register_model
def convmixer_xl_cifar(pretrained: bool = False, **kwargs: Any) -> ConvMixerCifar:
    """ConvMixer-XL for CIFAR (SiLU, dim 256, depth 66, kernel 5, patch 2, 3 residual groups of 22 blocks);
    keyword arguments as `ConvMixerCifar`."""
    return _create("convmixer_xl_cifar", "xl", pretrained, **kwargs)
