"""Isotropic Vision GNN (ViG) and its similarity-threshold variant (SViG), registered with timm.

Papers: "Vision GNN: An Image is Worth Graph of Nodes", Kai Han, Yunhe Wang, Jianyuan Guo, Yehui Tang and Enhua Wu,
NeurIPS 2022, arXiv:2206.00272 (code and weights: huawei-noah/Efficient-AI-Backbones); "SViG: A
Similarity-Thresholded Approach for Vision Graph Neural Networks", Ismael Elsharkawi, Hossam Sharara and Ahmed
Rafea, IEEE Access 2025 (no arXiv version found).

One class, `VisionGNN`, builds every size; `SIZES` is the only size table. The module layout and
parameter names are those of the published ViG code, so its checkpoints (and SViG's) load unchanged:
``stem.convs.*``, ``pos_embed``, ``backbone.{i}.0`` (Grapher) / ``backbone.{i}.1`` (FFN),
``prediction.{0,1,4}``. The exact graph rules, block layout and key names are written down in
docs/model-notes.md ("Isotropic ViG and SViG"). The blocks (`Grapher`, `FFN`), the head and the timm API are
shared with the pyramid model (`vig.models.vig_blocks`).

Registered names: ``vig_{ti,s,b}_224_gelu`` (dense dilated kNN graph) and ``svig_{ti,s,b}_224_gelu``
(similarity-threshold graph, start 0.89, decrement 0.03). ``start_thresh`` / ``dec`` (or the
published ``starting_threshold`` / ``decrement``) switch any of them to the threshold graph.

``stem_stride`` (1, 2, 4, 8 or 16, default 16 as published) sets the stem's total stride for small
images: the first log2(stem_stride) of its four downsampling convs keep stride 2, the others run at
stride 1, so parameter names and shapes do not change, only the map size. ``vig_ti_cifar`` and
``svig_ti_cifar`` are ViG-Ti / SViG-Ti for CIFAR-10: stride 2 at 32 px, a 16 x 16 map (256 nodes, about
the 196 of 224 px at stride 16), 10 classes.
"""

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from timm.layers import register_notrace_function
from timm.models import generate_default_cfgs, register_model
from torch import nn

from gcn_lib.shapes import shape_str
from vig.models.cifar import CIFAR_IMG_SIZE
from vig.models.factory_args import takes_device_and_dtype
from vig.models.pretrained import (SVIG_FOLDER, SVIG_PAPER, VIG_PAPER, VIG_RELEASE, build_with_weights,
                                   weights_cfg)
from vig.models.vig_blocks import (FFN, PUBLISHED_IMG_SIZE, SVIG_DEC, ConvStem, Grapher, VisionGNNBase,
                                   check_pretrained_source, check_stem_stride, cifar_cfg, pair, published_cfg,
                                   resolve_graph_kwargs, strided_grid, threshold_schedule, warn_cap_once)

STEM_STRIDE = 16
STEM_STRIDES: tuple[int, ...] = (1, 2, 4, 8, 16)
CIFAR_STEM_STRIDE = 2
ISOTROPIC_POOL_SIZE = (14, 14)  # the final map of the published models at 224 px


@dataclass(frozen=True)
class IsotropicSize:
    """Width C (channels of every block) and depth n (number of Grapher + FFN blocks)."""

    channels: int
    depth: int


SIZES: dict[str, IsotropicSize] = {
    "ti": IsotropicSize(channels=192, depth=12),
    "s": IsotropicSize(channels=320, depth=16),
    "b": IsotropicSize(channels=640, depth=16),
}


def stem_grid(img_size: int | Sequence[int], stride: int = STEM_STRIDE) -> tuple[int, int]:
    """Feature-map size (H', W') the stem gives for an image (H, W): log2(stride) stride-2 3x3 convs,
    padding 1 (the other downsampling convs of the four run at stride 1 and keep the size)."""
    check_stem_stride(stride, STEM_STRIDES)
    height, width = pair(img_size)
    if height < 1 or width < 1:
        raise ValueError(f"img_size must be positive, got {img_size}")
    return strided_grid(height, width, stride)


def knn_schedule(num_knn: int, depth: int, num_nodes: int) -> list[tuple[int, int]]:
    """(k_i, dilation_i) of the dense dilated kNN graph in each of ``depth`` blocks.

    As published: k_i = int(linspace(k, 2k, depth)[i]), d_i = min(i // 4 + 1, N // max_i k_i).
    With few nodes (small ``img_size``) k_i is capped at N, so that k_i * d_i <= N always holds,
    and a warning is logged (once per process for each distinct schedule) whenever the cap changes it.
    """
    if num_knn < 1:
        raise ValueError(f"num_knn must be >= 1, got {num_knn}")
    published = [int(k) for k in torch.linspace(num_knn, 2 * num_knn, depth, device="cpu").tolist()]
    ks = [min(k, num_nodes) for k in published]
    max_dilation = num_nodes // max(ks)
    uncapped = [i // 4 + 1 for i in range(depth)]
    dilations = [min(d, max_dilation) for d in uncapped]
    if ks != published or dilations != uncapped:
        warn_cap_once(f"{num_nodes} graph nodes cap the kNN schedule: k {published} -> {ks}, "
                      f"dilation {uncapped} -> {dilations}")
    return list(zip(ks, dilations))


class Stem(ConvStem):
    """Convolutional stem: (B, in_chans, H, W) -> (B, C, H/s, W/s) for total stride s (sizes rounded up).

    Four 3x3 convs widen in_chans -> C/8 -> C/4 -> C/2 -> C (the first log2(s) at stride 2, the rest at
    stride 1), each with BN and activation, then a 3x3 conv C -> C with BN. Every s gives the same parameters.
    """

    def __init__(self, in_chans: int, channels: int, act: str, stride: int = STEM_STRIDE) -> None:
        widths = [in_chans, channels // 8, channels // 4, channels // 2, channels]
        super().__init__(widths, act, check_stem_stride(stride, STEM_STRIDES).bit_length() - 1)


@register_notrace_function
def check_image_grid(x: torch.Tensor, pos_embed: torch.Tensor, stem_stride: int, img_size: tuple[int, int]) -> None:
    """ValueError unless images x (B, C, H, W) give, at ``stem_stride``, the grid of ``pos_embed`` (1, C, H', W').
    A leaf of timm's fx tracing (its test depends on the input's shape)."""
    if x.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {shape_str(x.shape)}")
    grid = strided_grid(x.shape[-2], x.shape[-1], stem_stride)
    if grid[0] != pos_embed.shape[-2] or grid[1] != pos_embed.shape[-1]:
        raise ValueError(
            f"{x.shape[-2]}x{x.shape[-1]} images give a {grid[0]}x{grid[1]} map at stem stride {stem_stride}, "
            f"but the position embedding is {pos_embed.shape[-2]}x{pos_embed.shape[-1]} "
            f"(img_size={img_size}); create the model with the img_size you feed it"
        )


class VisionGNN(VisionGNNBase):
    """Isotropic ViG: images (B, in_chans, H, W) -> logits (B, num_classes).

    The head, classifier, gradient-checkpointing, parameter-group and feature API are `VisionGNNBase`'s.

    Args:
        channels, depth: width C and number of blocks n (see `SIZES`).
        num_classes: classifier outputs; 0 gives the pre-logits (B, 1024) from `forward`.
        in_chans: image channels.
        img_size: training / evaluation image size; fixes the position-embedding grid.
        act: activation name (``gelu`` in the published models).
        num_knn: k of the first block's kNN graph (doubles linearly to the last block).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth of the last block (linear from 0).
        start_thresh, dec: with ``start_thresh`` set, block i uses the similarity-threshold graph with
            t_i = start_thresh - i * dec (SViG) instead of kNN.
        stem_stride: total stride of the stem, one of `STEM_STRIDES` (16 as published; 2 for 32-px
            images gives 16 x 16 nodes). Parameters are the same for every stride.
        global_pool: pooling before the head, a timm pool type (``'avg'`` as published, ``'max'``,
            ``'avgmax'``), or ``''`` for none: the head's 1x1 convs then act on every position and `forward`
            returns maps (B, num_classes or 1024, h, w).
        device, dtype: where and in what floating-point type the parameters are created (timm's factory
            arguments).
    """

    @takes_device_and_dtype
    def __init__(
        self,
        channels: int,
        depth: int,
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
        if channels % 8 or channels < 8 or depth < 1:
            raise ValueError(f"channels must be a positive multiple of 8 and depth >= 1, got {channels}, {depth}")
        super().__init__(num_classes, in_chans, channels, img_size, stem_stride, start_thresh, dec, global_pool)
        self.grid_size = stem_grid(img_size, stem_stride)
        if self.grid_size[0] * self.grid_size[1] == 1:
            raise ValueError(f"img_size {img_size} gives a single graph node at stem stride {stem_stride} (a graph "
                             f"without edges between nodes); use {stem_stride + 1} px or more")

        self.stem = Stem(in_chans, channels, act, stem_stride)
        self.pos_embed = nn.Parameter(torch.zeros(1, channels, *self.grid_size))
        drop_paths = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        if start_thresh is None:
            num_nodes = self.grid_size[0] * self.grid_size[1]
            graphs = [dict(kernel_size=k, dilation=d) for k, d in knn_schedule(num_knn, depth, num_nodes)]
        else:
            graphs = [dict(graph="threshold", threshold=t) for t in threshold_schedule(start_thresh, dec, depth)]
        self.backbone = nn.Sequential(*[
            nn.Sequential(Grapher(channels, act, rate, **graph), FFN(channels, act, rate))
            for rate, graph in zip(drop_paths, graphs)
        ])
        self.prediction = self.build_prediction(channels, act, drop_rate)
        self.feature_info = [
            dict(num_chs=channels, reduction=stem_stride, module=f"backbone.{i}") for i in range(depth)
        ]
        self.reset_parameters()

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Stem plus position embedding: (B, in_chans, H, W) -> (B, C, H', W')."""
        check_image_grid(x, self.pos_embed, self.stem_stride, self.img_size)
        return self.stem(x) + self.pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> logits (B, num_classes). Defined here so that timm's fx tracing, which wraps the
        notrace functions in the globals of the root's forward, wraps this module's `check_image_grid`."""
        return self.forward_head(self.forward_features(x))

    def feature_ends(self) -> list[int]:
        """Index in ``backbone`` of the last module of each feature level (here every block is one)."""
        return list(range(len(self.backbone)))

    def extra_repr(self) -> str:
        return (f"img_size={self.img_size}, stem_stride={self.stem_stride}, grid={self.grid_size}, "
                f"graph={self.graph_repr()}")


def _create(variant: str, size: str, threshold_default: bool, pretrained: bool = False, **kwargs: Any) -> VisionGNN:
    check_pretrained_source(variant, pretrained, kwargs)
    resolve_graph_kwargs(variant, kwargs, threshold_default)
    settings = {**asdict(SIZES[size]), **kwargs}  # channels / depth may be overridden, e.g. for tests
    feature_cfg = dict(out_indices=settings.pop("out_indices", settings["depth"]), feature_cls="getter")
    return build_with_weights(VisionGNN, variant, pretrained, feature_cfg=feature_cfg, **settings)


# The authors' ViG-Ti/S/B (bare state dicts; the file names carry the accuracy measured before publication, the
# README the published one) and SViG-Ti's eight threshold checkpoints (timm checkpoint-saver dicts; `use_ema`
# where the SViG readme says to evaluate with --model-ema). The first SViG tag, the model's defaults
# (start 0.89, decrement 0.03), is svig_ti_224_gelu's default tag.
_VIG_WEIGHTS = {"ti": ("vig_ti_74.5.pth", 73.9), "s": ("vig_s_80.6.pth", 80.4), "b": ("vig_b_82.6.pth", 82.3)}
# (start threshold, decrement, file in "SViG Model Checkpoints/", evaluated with EMA weights, published top-1)
SVIG_CHECKPOINTS: tuple[tuple[float, float, str, bool, float], ...] = (
    (0.89, 0.03, "_0_89_0_03_checkpoint-304.pth.tar", False, 74.6),
    (0.86, 0.03, "_0_86_0_03_checkpoint-306.pth.tar", False, 74.6),
    (0.89, 0.0, "_0_89_0_00_checkpoint-309.pth.tar", True, 74.1),
    (0.89, 0.02, "_0_89_0_02_checkpoint-309.pth.tar", True, 74.2),
    (0.89, 0.04, "_0_89_0_04_checkpoint-308.pth.tar", True, 74.0),
    (0.91, 0.03, "_0_91_0_03_checkpoint-308.pth.tar", True, 74.5),
    (0.93, 0.03, "_0_93_0_03_checkpoint-308.pth.tar", True, 74.4),
    (0.96, 0.03, "_0_96_0_03_checkpoint-308.pth.tar", True, 74.2),
)


def svig_tag(start_thresh: float, dec: float) -> str:
    """The pretrained tag of the SViG checkpoint trained with (start_thresh, dec): ``in1k_t089_d003``."""
    return f"in1k_t{round(start_thresh * 100):03d}_d{round(dec * 100):03d}"


default_cfgs = generate_default_cfgs({
    **{f"vig_{size}_224_gelu.in1k": weights_cfg(published_cfg(ISOTROPIC_POOL_SIZE), url=VIG_RELEASE + file, top1=top1,
                                                **VIG_PAPER)
       for size, (file, top1) in _VIG_WEIGHTS.items()},
    **{f"svig_ti_224_gelu.{svig_tag(start, dec)}": weights_cfg(
        published_cfg(ISOTROPIC_POOL_SIZE), url=SVIG_FOLDER + file, start_thresh=start, dec=dec, use_ema=ema,
        top1=top1, **SVIG_PAPER) for start, dec, file, ema, top1 in SVIG_CHECKPOINTS},
    **{f"svig_{size}_224_gelu": published_cfg(ISOTROPIC_POOL_SIZE) for size in ("s", "b")},
    **{f"{prefix}_ti_cifar": cifar_cfg(stem_grid(CIFAR_IMG_SIZE, CIFAR_STEM_STRIDE)) for prefix in ("vig", "svig")},
})


@register_model
def vig_ti_224_gelu(pretrained: bool = False, **kwargs: Any) -> VisionGNN:
    """ViG-Ti (C=192, 12 blocks), dense dilated kNN graph."""
    return _create("vig_ti_224_gelu", "ti", False, pretrained, **kwargs)


@register_model
def vig_s_224_gelu(pretrained: bool = False, **kwargs: Any) -> VisionGNN:
    """ViG-S (C=320, 16 blocks), dense dilated kNN graph."""
    return _create("vig_s_224_gelu", "s", False, pretrained, **kwargs)


@register_model
def vig_b_224_gelu(pretrained: bool = False, **kwargs: Any) -> VisionGNN:
    """ViG-B (C=640, 16 blocks), dense dilated kNN graph."""
    return _create("vig_b_224_gelu", "b", False, pretrained, **kwargs)


@register_model
def svig_ti_224_gelu(pretrained: bool = False, **kwargs: Any) -> VisionGNN:
    """SViG-Ti (C=192, 12 blocks), similarity-threshold graph (start 0.89, decrement 0.03)."""
    return _create("svig_ti_224_gelu", "ti", True, pretrained, **kwargs)


@register_model
def svig_s_224_gelu(pretrained: bool = False, **kwargs: Any) -> VisionGNN:
    """SViG-S (C=320, 16 blocks), similarity-threshold graph (start 0.89, decrement 0.03)."""
    return _create("svig_s_224_gelu", "s", True, pretrained, **kwargs)


@register_model
def svig_b_224_gelu(pretrained: bool = False, **kwargs: Any) -> VisionGNN:
    """SViG-B (C=640, 16 blocks), similarity-threshold graph (start 0.89, decrement 0.03)."""
    return _create("svig_b_224_gelu", "b", True, pretrained, **kwargs)


def _create_cifar(variant: str, threshold_default: bool, pretrained: bool, kwargs: dict[str, Any]) -> VisionGNN:
    """A Ti-width CIFAR-10 configuration: stem stride 2, 32 px, 10 classes unless ``kwargs`` say otherwise."""
    settings = dict(img_size=CIFAR_IMG_SIZE, stem_stride=CIFAR_STEM_STRIDE, num_classes=10)
    return _create(variant, "ti", threshold_default, pretrained, **{**settings, **kwargs})


@register_model
def vig_ti_cifar(pretrained: bool = False, **kwargs: Any) -> VisionGNN:
    """ViG-Ti for CIFAR-10: stem stride 2 at 32 px (16 x 16 = 256 nodes), 10 classes, dense dilated kNN graph."""
    return _create_cifar("vig_ti_cifar", False, pretrained, kwargs)


@register_model
def svig_ti_cifar(pretrained: bool = False, **kwargs: Any) -> VisionGNN:
    """SViG-Ti for CIFAR-10: stem stride 2 at 32 px (256 nodes), 10 classes, threshold graph (start 0.89, dec 0.03)."""
    return _create_cifar("svig_ti_cifar", True, pretrained, kwargs)
