"""Pyramid Vision GNN (pvig), registered with timm.

Paper: "Vision GNN: An Image is Worth Graph of Nodes", Kai Han, Yunhe Wang, Jianyuan Guo, Yehui Tang and Enhua Wu,
NeurIPS 2022, arXiv:2206.00272 (the pyramid architecture); code and weights: huawei-noah/Efficient-AI-Backbones.

One class, `PyramidVisionGNN`, builds every size; `SIZES` is the only size table. Its blocks are the
`Grapher` and `FFN` it shares with the isotropic model (`vig.models.vig_blocks`), the Grapher taking its
kNN keys from the map average-pooled by r and adding a frozen relative-position term to the distances.
``start_thresh`` / ``dec`` switch any size to the similarity-threshold graph over the same pooled keys and
relative-position term (the rectangular rule of `gcn_lib.graph.threshold_mask`), with the same weights and
keys. The module layout and parameter names are those of the published pyramid ViG, so its checkpoints load
unchanged: ``stem.convs.*``, ``pos_embed``, ``backbone.{i}.0`` (Grapher, with ``relative_pos``) / ``backbone.{i}.1``
(FFN), ``backbone.{i}.conv.{0,1}`` (Downsample between stages), ``prediction.{0,1,4}``. The published sizes,
relative-position term and quirks are written down in docs/model-notes.md ("Pyramid ViG").

Registered names: ``pvig_{ti,s,m,b}_224_gelu`` and ``pvig_ti_cifar`` (pyramid ViG-Ti for CIFAR-10: stem
stride 1 at 32 px, stage maps 32, 16, 8, 4; 10 classes). ``stem_stride`` (1, 2 or 4, default 4 as published)
keeps the first log2(stem_stride) of the stem's two downsampling convs at stride 2 and runs the other at
stride 1: the same parameters, a larger map.
"""

import logging
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function
from timm.models import generate_default_cfgs, register_model
from torch import nn

from gcn_lib import relative_position_table
from gcn_lib.shapes import shape_str
from vig.models.cifar import CIFAR_IMG_SIZE
from vig.models.factory_args import takes_device_and_dtype
from vig.models.pretrained import PVIG_RELEASE, VIG_PAPER, build_with_weights, weights_cfg
from vig.models.vig_blocks import (FFN, PUBLISHED_IMG_SIZE, SVIG_DEC, ConvStem, Downsample, Grapher, VisionGNNBase,
                                   check_pretrained_source, check_stem_stride, cifar_cfg, pair, published_cfg,
                                   resize_relative_pos, resolve_graph_kwargs, strided_grid, threshold_schedule,
                                   warn_cap_once)

_logger = logging.getLogger(__name__)

REDUCTIONS: tuple[int, ...] = (4, 2, 1, 1)  # r of each stage: keys are the map average-pooled by r
STEM_STRIDE = 4
STEM_STRIDES: tuple[int, ...] = (1, 2, 4)
# The published code caps the dilation at 49 // k: the node count of its last stage at 224 px.
PUBLISHED_DILATION_NODES = 49


@dataclass(frozen=True)
class PyramidSize:
    """Channels and number of (Grapher, FFN) blocks of each of the four stages."""

    channels: tuple[int, int, int, int]
    blocks: tuple[int, int, int, int]


SIZES: dict[str, PyramidSize] = {
    "ti": PyramidSize(channels=(48, 96, 240, 384), blocks=(2, 2, 6, 2)),
    "s": PyramidSize(channels=(80, 160, 400, 640), blocks=(2, 2, 6, 2)),
    "m": PyramidSize(channels=(96, 192, 384, 768), blocks=(2, 2, 16, 2)),
    "b": PyramidSize(channels=(128, 256, 512, 1024), blocks=(2, 2, 18, 2)),
}


def stage_grids(img_size: int | Sequence[int], stem_stride: int = STEM_STRIDE) -> list[tuple[int, int]]:
    """Map size (H_s, W_s) of each stage for an image (H, W): the stem's log2(stem_stride) stride-2 convs
    give stage 0, each stride-2 Downsample (3x3, padding 1) the next; sizes rounded up."""
    check_stem_stride(stem_stride, STEM_STRIDES)
    height, width = pair(img_size)
    if height < 1 or width < 1:
        raise ValueError(f"img_size must be positive, got {img_size}")
    grids = []
    for halvings in (stem_stride.bit_length() - 1, 1, 1, 1):
        for _ in range(halvings):
            height, width = (height + 1) // 2, (width + 1) // 2
        grids.append((height, width))
    return grids


def key_grids(img_size: int | Sequence[int], stem_stride: int = STEM_STRIDE) -> list[tuple[int, int]]:
    """Size (H_s // r_s, W_s // r_s) of each stage's pooled key map; ValueError where one is empty."""
    grids = stage_grids(img_size, stem_stride)
    keys = [(h // r, w // r) for (h, w), r in zip(grids, REDUCTIONS)]
    if min(min(grid) for grid in keys) < 1:
        minimum = 32 * stem_stride // STEM_STRIDE
        raise ValueError(f"img_size {img_size} is too small for pyramid ViG at stem stride {stem_stride}: the stage "
                         f"maps {grids} pooled by r = {REDUCTIONS} leave no key node; use {minimum} px or more")
    return keys


def pyramid_knn_schedule(num_knn: int, blocks: Sequence[int], num_keys: Sequence[int]) -> list[tuple[int, int]]:
    """(k_i, dilation_i) of the kNN graph of every block, counted over all stages.

    As published: k_i = k, d_i = min(i // 4 + 1, 49 // k). Where a stage has fewer than k * d_i keys
    (small ``img_size``), k is capped at its key count M_s and d_i at M_s // k_i, and a warning is
    logged (once per process for each distinct schedule).
    """
    if num_knn < 1:
        raise ValueError(f"num_knn must be >= 1, got {num_knn}")
    max_dilation = max(1, PUBLISHED_DILATION_NODES // num_knn)
    published, capped = [], []
    for count, keys in zip(blocks, num_keys):
        for _ in range(count):
            dilation = min(len(published) // 4 + 1, max_dilation)
            published.append((num_knn, dilation))
            k = min(num_knn, keys)
            capped.append((k, min(dilation, keys // k)))
    if capped != published:
        warn_cap_once(f"{list(num_keys)} key nodes per stage cap the pyramid kNN schedule: "
                      f"(k, dilation) {published} -> {capped}")
    return capped


def published_relative_pos(channels: int, side: int, r: int) -> torch.Tensor:
    """The frozen relative-position term of a 224-px stage block, as published: (1, N, N / r^2), float32.

    R = 2 P P^T / C for the 2-D sin-cos table P (N, C) of the side x side grid, resized bicubically to
    (N, N / r^2) and negated, so that nearby nodes look closer to the kNN rule.
    """
    table = relative_position_table(channels, side).float()
    num_nodes = side * side
    resized = F.interpolate(table[None, None], size=(num_nodes, num_nodes // (r * r)), mode="bicubic",
                            align_corners=False)
    return -resized[0]


@register_notrace_function
def check_pyramid_input(x: torch.Tensor, stem_stride: int) -> None:
    """ValueError unless x is images (B, C, H, W) whose stage maps leave key nodes (`key_grids`); a leaf of
    timm's fx tracing (the test depends on the input's shape)."""
    if x.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {shape_str(x.shape)}")
    if not torch.jit.is_scripting():
        key_grids(tuple(x.shape[-2:]), stem_stride)
    elif smallest_key_side(x.shape[-2], x.shape[-1], stem_stride) < 1:  # the same test in scriptable form
        raise ValueError(f"{x.shape[-2]}x{x.shape[-1]} images are too small for pyramid ViG at stem stride "
                         f"{stem_stride}: a stage's map pooled by r leaves no key node")


def smallest_key_side(height: int, width: int, stem_stride: int,
                      reductions: tuple[int, int, int, int] = REDUCTIONS) -> int:
    """The shortest side of the stages' pooled key maps (`key_grids`) for (height, width) images."""
    height, width = strided_grid(height, width, stem_stride)
    smallest = height
    for stage, r in enumerate(reductions):
        if stage > 0:
            height, width = (height + 1) // 2, (width + 1) // 2
        smallest = min(smallest, height // r, width // r)
    return smallest


@register_notrace_function
def pos_embed_for(pos_embed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The position embedding (1, C, h, w) for a stem map x (B, C, H, W): itself, or resized bicubically to
    (H, W); a leaf of timm's fx tracing (the choice depends on the input's shape)."""
    if x.shape[-2] == pos_embed.shape[-2] and x.shape[-1] == pos_embed.shape[-1]:
        return pos_embed
    return F.interpolate(pos_embed, size=(x.shape[-2], x.shape[-1]), mode="bicubic", align_corners=False)


class PyramidStem(ConvStem):
    """Stem: (B, in_chans, H, W) -> (B, C, H/s, W/s) for total stride s: 3x3 convs to C/2 and C (the first
    log2(s) at stride 2, the other at stride 1), each with BN and activation, then a 3x3 conv C -> C with BN."""

    def __init__(self, in_chans: int, channels: int, act: str, stride: int = STEM_STRIDE) -> None:
        widths = [in_chans, channels // 2, channels]
        super().__init__(widths, act, check_stem_stride(stride, STEM_STRIDES).bit_length() - 1)


class PyramidVisionGNN(VisionGNNBase):
    """Pyramid ViG: images (B, in_chans, H, W) -> logits (B, num_classes).

    The head, classifier, gradient-checkpointing, parameter-group and feature API are `VisionGNNBase`'s (as
    the isotropic model's); it builds its own stem, stages and feature pyramid.

    Args:
        channels, blocks: per-stage channels and block counts (see `SIZES`).
        num_classes: classifier outputs; 0 gives the pre-logits (B, 1024) from `forward`.
        in_chans: image channels.
        img_size: image size the position embedding and the ``relative_pos`` terms are sized for. Other
            sizes are 224-px tables resized bicubically; a forward pass on another size resizes them
            for that call (any input whose stage maps leave key nodes, odd and non-square sizes
            included; kNN graphs with fewer keys than k x dilation are capped in the forward pass).
        act: activation name (``gelu`` in the published models).
        num_knn: k of every block's kNN graph.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth of the last block (linear from 0 over all blocks).
        start_thresh, dec: with ``start_thresh`` set, block i (counted over all stages, Downsamples not
            counted) uses the similarity-threshold graph with t_i = start_thresh - i * dec instead of kNN,
            over the same pooled keys and with the same ``relative_pos`` term; parameters and state-dict
            keys are those of the kNN model.
        stem_stride: total stride of the stem, one of `STEM_STRIDES` (4 as published; 1 for 32-px images
            gives stage maps 32, 16, 8, 4). Parameters are the same for every stride.
        global_pool, device, dtype: as in `vig.models.isotropic.VisionGNN`.
    """

    @takes_device_and_dtype
    def __init__(
        self,
        channels: Sequence[int],
        blocks: Sequence[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int | Sequence[int] = PUBLISHED_IMG_SIZE,
        act: str = "gelu",
        num_knn: int = 9,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        start_thresh: float | None = None,
        dec: float = SVIG_DEC,
        stem_stride: int = STEM_STRIDE,
        global_pool: str = "avg",
    ) -> None:
        check_stem_stride(stem_stride, STEM_STRIDES)
        channels, blocks = tuple(channels), tuple(blocks)
        if len(channels) != len(REDUCTIONS) or len(blocks) != len(REDUCTIONS):
            raise ValueError(f"channels and blocks need one entry per stage ({len(REDUCTIONS)}), "
                             f"got {channels}, {blocks}")
        if min(channels) < 4 or any(c % 4 for c in channels) or min(blocks) < 1:
            raise ValueError(f"channels must be positive multiples of 4 and blocks >= 1, got {channels}, {blocks}")
        super().__init__(num_classes, in_chans, channels[-1], img_size, stem_stride, start_thresh, dec, global_pool)
        self.stage_grids = stage_grids(img_size, stem_stride)
        keys = key_grids(img_size, stem_stride)
        self.grid_size = self.stage_grids[0]

        self.stem = PyramidStem(in_chans, channels[0], act, stem_stride)
        published_grids = stage_grids(PUBLISHED_IMG_SIZE)
        self.pos_embed = nn.Parameter(torch.zeros(1, channels[0], *self.grid_size))
        depth = sum(blocks)
        drop_paths = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        if start_thresh is None:
            graphs = iter([dict(kernel_size=k, dilation=d)
                           for k, d in pyramid_knn_schedule(num_knn, blocks, [h * w for h, w in keys])])
        else:
            graphs = iter([dict(graph="threshold", threshold=t) for t in threshold_schedule(start_thresh, dec, depth)])
        layers: list[nn.Module] = []
        self.stage_ends: list[int] = []
        self.feature_info = []
        for stage, (width, count, r) in enumerate(zip(channels, blocks, REDUCTIONS)):
            if stage > 0:
                layers.append(Downsample(channels[stage - 1], width))
            relative_pos = published_relative_pos(width, published_grids[stage][0], r)
            (height, grid_width), (key_height, key_width) = self.stage_grids[stage], keys[stage]
            if tuple(self.stage_grids[stage]) != published_grids[stage]:
                relative_pos = resize_relative_pos(relative_pos, height * grid_width, key_height * key_width)
            for _ in range(count):
                rate = drop_paths[len(layers) - stage]
                layers.append(nn.Sequential(
                    Grapher(width, act, rate, relative_pos=relative_pos.clone(), r=r, **next(graphs)),
                    FFN(width, act, rate),
                ))
            self.stage_ends.append(len(layers) - 1)
            self.feature_info.append(dict(num_chs=width, reduction=stem_stride * 2**stage,
                                          module=f"backbone.{len(layers) - 1}"))
        self.backbone = nn.Sequential(*layers)
        self.prediction = self.build_prediction(channels[-1], act, drop_rate)
        self.reset_parameters()

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Stem plus position embedding: (B, in_chans, H, W) -> (B, C0, H/s, W/s), s = ``stem_stride``; the
        embedding is resized bicubically for the call when the map is not the size the model was built for."""
        check_pyramid_input(x, self.stem_stride)
        x = self.stem(x)
        return x + pos_embed_for(self.pos_embed, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> logits (B, num_classes). Defined here so that timm's fx tracing, which wraps the
        notrace functions in the globals of the root's forward, wraps this module's `check_pyramid_input` and
        `pos_embed_for`."""
        return self.forward_head(self.forward_features(x))

    def feature_ends(self) -> list[int]:
        """Index in ``backbone`` of the last block of each stage (its map is the stage's feature, strides
        4, 8, 16, 32 at the published stem stride), for `forward_intermediates` and `prune_intermediate_layers`."""
        return list(self.stage_ends)

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last one in ``indices`` (and the classifier); returns the kept indices."""
        take_indices = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        self.stage_ends = self.stage_ends[:len(self.feature_info)]
        return take_indices

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Resize a checkpoint's ``pos_embed`` and every ``relative_pos`` bicubically to this model's sizes
        (a 224-px checkpoint into a model of another ``img_size``); other keys unchanged."""
        adapted = dict(super().adapt_state_dict(state_dict))
        own = self.state_dict(keep_vars=True)
        resized = [key for key, value in adapted.items() if key.endswith(".relative_pos") and key in own
                   and value.dim() == 3 and value.shape != own[key].shape]
        for key in resized:
            adapted[key] = resize_relative_pos(adapted[key], *own[key].shape[-2:])
        if resized:
            _logger.info("resized %d relative_pos tables to img_size %s (bicubic)", len(resized), self.img_size)
        return adapted

    def extra_repr(self) -> str:
        return (f"img_size={self.img_size}, stem_stride={self.stem_stride}, stage_grids={self.stage_grids}, "
                f"graph={self.graph_repr()}")


def _create(variant: str, size: str, pretrained: bool = False, **kwargs: Any) -> PyramidVisionGNN:
    check_pretrained_source(variant, pretrained, kwargs)
    resolve_graph_kwargs(variant, kwargs, threshold_default=False)
    settings = {**asdict(SIZES[size]), **kwargs}
    feature_cfg = dict(out_indices=settings.pop("out_indices", len(settings["blocks"])), feature_cls="getter")
    return build_with_weights(PyramidVisionGNN, variant, pretrained, feature_cfg=feature_cfg, **settings)


# The authors' pyramid ViG weights (release `pyramid-vig`; B evaluated with crop 0.95) and the ImageNet-21k
# pyramid ViG-M, whose classifier is not published (its class count is unknown): that tag is a headless backbone
# (num_classes 0: `checkpoint_filter_fn` drops the file's classifier; give num_classes to train a new one).
_PVIG_WEIGHTS = {"ti": ("pvig_ti_78.5.pth.tar", 78.5, {}), "s": ("pvig_s_82.1.pth.tar", 82.1, {}),
                 "m": ("pvig_m_83.1.pth.tar", 83.1, {}), "b": ("pvig_b_83.66.pth.tar", 83.7, dict(crop_pct=0.95))}
_PVIG_BASE = dict(fixed_input_size=False, pool_size=(7, 7))  # any input size runs (pos_embed, relative_pos resized)

default_cfgs = generate_default_cfgs({
    **{f"pvig_{size}_224_gelu.in1k": weights_cfg(published_cfg(**_PVIG_BASE, **extra), url=PVIG_RELEASE + file,
                                                 top1=top1, **VIG_PAPER)
       for size, (file, top1, extra) in _PVIG_WEIGHTS.items()},
    "pvig_m_224_gelu.in21k": weights_cfg(published_cfg(**_PVIG_BASE), url=PVIG_RELEASE + "pvig_m_im21k_90e.pth",
                                         num_classes=0, **VIG_PAPER),
    "pvig_ti_cifar": cifar_cfg(fixed_input_size=False, pool_size=stage_grids(CIFAR_IMG_SIZE, 1)[-1]),
})


@register_model
def pvig_ti_224_gelu(pretrained: bool = False, **kwargs: Any) -> PyramidVisionGNN:
    """Pyramid ViG-Ti (channels 48 / 96 / 240 / 384, blocks 2 / 2 / 6 / 2), kNN graph with pooled keys."""
    return _create("pvig_ti_224_gelu", "ti", pretrained, **kwargs)


@register_model
def pvig_s_224_gelu(pretrained: bool = False, **kwargs: Any) -> PyramidVisionGNN:
    """Pyramid ViG-S (channels 80 / 160 / 400 / 640, blocks 2 / 2 / 6 / 2), kNN graph with pooled keys."""
    return _create("pvig_s_224_gelu", "s", pretrained, **kwargs)


@register_model
def pvig_m_224_gelu(pretrained: bool = False, **kwargs: Any) -> PyramidVisionGNN:
    """Pyramid ViG-M (channels 96 / 192 / 384 / 768, blocks 2 / 2 / 16 / 2), kNN graph with pooled keys."""
    return _create("pvig_m_224_gelu", "m", pretrained, **kwargs)


@register_model
def pvig_b_224_gelu(pretrained: bool = False, **kwargs: Any) -> PyramidVisionGNN:
    """Pyramid ViG-B (channels 128 / 256 / 512 / 1024, blocks 2 / 2 / 18 / 2), kNN graph with pooled keys."""
    return _create("pvig_b_224_gelu", "b", pretrained, **kwargs)


@register_model
def pvig_ti_cifar(pretrained: bool = False, **kwargs: Any) -> PyramidVisionGNN:
    """Pyramid ViG-Ti for CIFAR-10: stem stride 1 at 32 px (stage maps 32, 16, 8, 4), 10 classes, kNN graph."""
    settings = dict(img_size=CIFAR_IMG_SIZE, stem_stride=1, num_classes=10)
    return _create("pvig_ti_cifar", "ti", pretrained, **{**settings, **kwargs})
