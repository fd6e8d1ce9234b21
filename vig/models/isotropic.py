"""Isotropic Vision GNN (ViG) and its similarity-threshold variant (SViG), registered with timm.

One class, `VisionGNN`, builds every size; `SIZES` is the only size table. The module layout and
parameter names are those of the published ViG code, so its checkpoints (and SViG's) load unchanged:
``stem.convs.*``, ``pos_embed``, ``backbone.{i}.0`` (Grapher) / ``backbone.{i}.1`` (FFN),
``prediction.{0,1,4}``. See ``../shared/DESIGN.md`` ("Isotropic ViG model").

Registered names: ``vig_{ti,s,b}_224_gelu`` (dense dilated kNN graph) and ``svig_{ti,s,b}_224_gelu``
(similarity-threshold graph, start 0.89, decrement 0.03). ``start_thresh`` / ``dec`` (or the
published ``starting_threshold`` / ``decrement``) switch any of them to the threshold graph.

``stem_stride`` (1, 2, 4, 8 or 16, default 16 as published) sets the stem's total stride for small
images: the first log2(stem_stride) of its four downsampling convs keep stride 2, the others run at
stride 1, so parameter names and shapes do not change, only the map size. ``vig_ti_cifar`` and
``svig_ti_cifar`` are ViG-Ti / SViG-Ti for CIFAR-10: stride 2 at 32 px, a 16 x 16 map (256 nodes, about
the 196 of 224 px at stride 16), 10 classes.
"""

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, SelectAdaptivePool2d, register_notrace_function, register_notrace_module
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from gcn_lib import DynConv2d, act_layer, init_convs_
from gcn_lib.shapes import shape_str
from vig.checkpoint import checkpoint_filter_fn
from vig.models.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR_IMG_SIZE
from vig.models.factory_args import build_like, takes_device_and_dtype
from vig.models.features import check_feature_request

_logger = logging.getLogger(__name__)
_logged_caps: set[str] = set()  # kNN-cap warnings this process has logged: each distinct one is logged once

HEAD_HIDDEN = 1024
STEM_STRIDE = 16
STEM_STRIDES: tuple[int, ...] = (1, 2, 4, 8, 16)
CIFAR_STEM_STRIDE = 2
PUBLISHED_IMG_SIZE = 224
SVIG_START_THRESH = 0.89
SVIG_DEC = 0.03


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


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = (int(v) for v in size)
    return height, width


def check_stem_stride(stride: int, allowed: Sequence[int] = STEM_STRIDES) -> int:
    """``stride`` if it is one of ``allowed`` (an int, not a bool), else ValueError naming the allowed values."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride not in allowed:
        raise ValueError(f"stem_stride must be one of {', '.join(map(str, allowed))}, got {stride!r}")
    return stride


def stem_grid(img_size: int | Sequence[int], stride: int = STEM_STRIDE) -> tuple[int, int]:
    """Feature-map size (H', W') the stem gives for an image (H, W): log2(stride) stride-2 3x3 convs,
    padding 1 (the other downsampling convs of the four run at stride 1 and keep the size)."""
    check_stem_stride(stride)
    height, width = _pair(img_size)
    if height < 1 or width < 1:
        raise ValueError(f"img_size must be positive, got {img_size}")
    return _strided_grid(height, width, stride)


def _strided_grid(height: int, width: int, stride: int) -> tuple[int, int]:
    """`stem_grid` of checked arguments (a power-of-two stride): one halving, rounded up, per factor 2."""
    while stride > 1:
        height, width, stride = (height + 1) // 2, (width + 1) // 2, stride // 2
    return height, width


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


def warn_cap_once(message: str) -> None:
    """Log a kNN-cap warning unless this process has logged the same message before."""
    if message not in _logged_caps:
        _logged_caps.add(message)
        _logger.warning(message)


def threshold_schedule(start_thresh: float, dec: float, depth: int) -> list[float]:
    """Similarity threshold t_i = start_thresh - i * dec of each block (SViG)."""
    if not isinstance(start_thresh, (int, float)) or not start_thresh < 1:
        raise ValueError(f"start_thresh must be a number below 1, got {start_thresh!r}")
    if not isinstance(dec, (int, float)) or math.isnan(dec):
        raise ValueError(f"dec must be a number, got {dec!r}")
    thresholds = [start_thresh - i * dec for i in range(depth)]
    if max(thresholds) >= 1:
        raise ValueError(f"start_thresh={start_thresh}, dec={dec} give a threshold >= 1 in block "
                         f"{thresholds.index(max(thresholds))}")
    return thresholds


def _conv_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv with bias followed by BatchNorm: (B, C_in, H, W) -> (B, C_out, H, W)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), nn.BatchNorm2d(out_channels))


def _drop_path(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0 else nn.Identity()


class Stem(nn.Module):
    """Convolutional stem: (B, in_chans, H, W) -> (B, C, H/s, W/s) for total stride s (sizes rounded up).

    Four 3x3 convs widen in_chans -> C/8 -> C/4 -> C/2 -> C (the first log2(s) at stride 2, the rest at
    stride 1), each with BN and activation, then a 3x3 conv C -> C with BN. Every s gives the same parameters.
    """

    def __init__(self, in_chans: int, channels: int, act: str, stride: int = STEM_STRIDE) -> None:
        super().__init__()
        halvings = check_stem_stride(stride).bit_length() - 1
        widths = [in_chans, channels // 8, channels // 4, channels // 2, channels]
        layers: list[nn.Module] = []
        for index, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            conv_stride = 2 if index < halvings else 1
            layers += [nn.Conv2d(c_in, c_out, 3, stride=conv_stride, padding=1), nn.BatchNorm2d(c_out), act_layer(act)]
        layers += [nn.Conv2d(channels, channels, 3, stride=1, padding=1), nn.BatchNorm2d(channels)]
        self.convs = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


HEAD_POOLS: tuple[str, ...] = ("avg", "max", "avgmax", "")


def head_pool(pool_type: str) -> SelectAdaptivePool2d:
    """The pooling before the conv head (B, C, h, w) -> (B, C, 1, 1): a timm pool type of `HEAD_POOLS`, or
    ``''`` for none (maps pass through). ``catavgmax`` would double the channels the head's first conv takes."""
    if pool_type not in HEAD_POOLS:
        raise ValueError(f"global_pool must be one of {', '.join(map(repr, HEAD_POOLS))}, got {pool_type!r}")
    return SelectAdaptivePool2d(pool_type=pool_type, flatten=False)


def resize_relative_pos(relative_pos: torch.Tensor, num_nodes: int, num_keys: int) -> torch.Tensor:
    """Bicubic resize (align_corners=False) of a relative-position term (1, N, M) -> (1, num_nodes, num_keys),
    as the published pyramid ViG does when its input size changes; computed in float32 at least."""
    table = relative_pos if relative_pos.dtype == torch.float64 else relative_pos.float()
    resized = F.interpolate(table.unsqueeze(0), size=(num_nodes, num_keys), mode="bicubic", align_corners=False)
    return resized.squeeze(0).to(relative_pos.dtype)


@register_notrace_module
class Grapher(nn.Module):
    """Graph block: fc1, dynamic max-relative graph conv C -> 2C, fc2, drop path, residual. (B, C, H, W) -> same.

    ``graph`` holds the graph arguments of the `DynConv2d`, and only those that graph uses:
    ``kernel_size`` and ``dilation`` for kNN, ``graph='threshold'`` and ``threshold`` for SViG, and
    (pyramid ViG, either graph) ``r``.

    ``relative_pos`` (pyramid ViG): a (1, N, M) term added to the distances of the N = H W centres to
    the M = (H // r) (W // r) keys by either graph, kept as a persistent buffer (a checkpoint entry under
    the published key ``relative_pos``, never trained). On a map of another size it is resized bicubically
    to that map's (N, M) for the call.
    """

    def __init__(self, channels: int, act: str, drop_path: float, relative_pos: torch.Tensor | None = None,
                 **graph: Any) -> None:
        super().__init__()
        self.fc1 = _conv_bn(channels, channels)
        self.graph_conv = DynConv2d(channels, 2 * channels, conv="mr", act=act, norm="batch", bias=True, **graph)
        self.fc2 = _conv_bn(2 * channels, channels)
        self.drop_path = _drop_path(drop_path)
        if relative_pos is not None and (relative_pos.dim() != 3 or relative_pos.shape[0] != 1):
            raise ValueError(f"relative_pos must have shape (1, N, M), got {tuple(relative_pos.shape)}")
        self.register_buffer("relative_pos", relative_pos)

    def relative_pos_for(self, height: int, width: int) -> torch.Tensor | None:
        """The relative-position term (1, N, M) for an (height, width) map, resized if the stored one differs."""
        relative_pos = self.relative_pos
        if relative_pos is None:
            return None
        r = self.graph_conv.r
        num_nodes, num_keys = height * width, (height // r) * (width // r)
        if relative_pos.shape[-2] == num_nodes and relative_pos.shape[-1] == num_keys:
            return relative_pos
        return resize_relative_pos(relative_pos, num_nodes, num_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.fc1(x)
        x = self.graph_conv(x, self.relative_pos_for(x.shape[-2], x.shape[-1]))
        return self.drop_path(self.fc2(x)) + shortcut


class FFN(nn.Module):
    """Feed-forward block: 1x1 conv C -> 4C + BN, activation, 1x1 conv 4C -> C + BN, drop path, residual."""

    def __init__(self, channels: int, act: str, drop_path: float, expansion: int = 4) -> None:
        super().__init__()
        self.fc1 = _conv_bn(channels, expansion * channels)
        self.act = act_layer(act)
        self.fc2 = _conv_bn(expansion * channels, channels)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.fc2(self.act(self.fc1(x)))
        return self.drop_path(x) + shortcut


@register_notrace_function
def check_image_grid(x: torch.Tensor, pos_embed: torch.Tensor, stem_stride: int, img_size: tuple[int, int]) -> None:
    """ValueError unless images x (B, C, H, W) give, at ``stem_stride``, the grid of ``pos_embed`` (1, C, H', W').
    A leaf of timm's fx tracing (its test depends on the input's shape)."""
    if x.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {shape_str(x.shape)}")
    grid = _strided_grid(x.shape[-2], x.shape[-1], stem_stride)
    if grid[0] != pos_embed.shape[-2] or grid[1] != pos_embed.shape[-1]:
        raise ValueError(
            f"{x.shape[-2]}x{x.shape[-1]} images give a {grid[0]}x{grid[1]} map at stem stride {stem_stride}, "
            f"but the position embedding is {pos_embed.shape[-2]}x{pos_embed.shape[-1]} "
            f"(img_size={img_size}); create the model with the img_size you feed it"
        )


class VisionGNN(nn.Module):
    """Isotropic ViG: images (B, in_chans, H, W) -> logits (B, num_classes).

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
        super().__init__()
        check_stem_stride(stem_stride)
        if channels % 8 or channels < 8 or depth < 1:
            raise ValueError(f"channels must be a positive multiple of 8 and depth >= 1, got {channels}, {depth}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = channels
        self.head_hidden_size = HEAD_HIDDEN
        self.global_pool = head_pool(global_pool)
        self.img_size = _pair(img_size)
        self.stem_stride = stem_stride
        self.grid_size = stem_grid(img_size, stem_stride)
        self.start_thresh = start_thresh
        self.dec = dec if start_thresh is not None else None
        self.grad_checkpointing = False

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
        self.prediction = nn.Sequential(
            nn.Conv2d(channels, HEAD_HIDDEN, 1),
            nn.BatchNorm2d(HEAD_HIDDEN),
            act_layer(act),
            nn.Dropout(drop_rate),
            self._classifier(num_classes),
        )
        self.feature_info = [
            dict(num_chs=channels, reduction=stem_stride, module=f"backbone.{i}") for i in range(depth)
        ]
        self.reset_parameters()

    @staticmethod
    def _classifier(num_classes: int) -> nn.Module:
        return nn.Conv2d(HEAD_HIDDEN, num_classes, 1) if num_classes > 0 else nn.Identity()

    def reset_parameters(self) -> None:
        """As published: every conv weight kaiming-normal, every conv bias zero; pos_embed zero."""
        init_convs_(self)
        nn.init.zeros_(self.pos_embed)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters timm's optimizer factory keeps out of weight decay (besides norms and biases)."""
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay (timm): stem and pos_embed, then each block
        (``backbone.{i}``); the head falls into the last group."""
        return dict(stem=r"^stem|^pos_embed", blocks=r"^backbone\.(\d+)" if coarse else [(r"^backbone\.(\d+)", None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (less memory,
        one more forward per block). Outputs and gradients are unchanged; in training, BatchNorm running
        statistics see each batch twice (once more in the recomputation), as in every timm model."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        """The last layer of the head: Conv2d(1024, num_classes, 1), or Identity for num_classes=0."""
        return self.prediction[-1]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a freshly initialised one with ``num_classes`` outputs (0: none), on the
        model's device and dtype; ``global_pool`` (a timm pool type, ``''`` for none) replaces the pooling,
        None keeps it."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if global_pool is not None:
            self.global_pool = head_pool(global_pool).train(self.training)
        classifier = build_like(self, lambda: self._classifier(num_classes))
        if isinstance(classifier, nn.Conv2d):
            nn.init.kaiming_normal_(classifier.weight)
            nn.init.zeros_(classifier.bias)
        self.prediction[-1] = classifier
        self.num_classes = num_classes

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Stem plus position embedding: (B, in_chans, H, W) -> (B, C, H', W')."""
        check_image_grid(x, self.pos_embed, self.stem_stride, self.img_size)
        return self.stem(x) + self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> final feature map (B, C, H/s, W/s), s = ``stem_stride``."""
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.backbone, x)
        return self.backbone(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map (B, C, h, w) -> logits (B, num_classes), or (B, 1024) with ``pre_logits``; without
        global pooling (``global_pool=''``) the maps (B, num_classes or 1024, h, w)."""
        x = self.global_pool(x)
        # every layer but the classifier, then the classifier unless pre_logits: a loop over the Sequential itself,
        # which fx finds in the model (a sliced copy it would not) and TorchScript unrolls
        last = len(self.prediction) - 1
        for i, layer in enumerate(self.prediction):
            if i < last or not pre_logits:
                x = layer(x)
        return x if self.global_pool.is_identity() else x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def feature_ends(self) -> list[int]:
        """Index in ``backbone`` of the last module of each feature level (here every block is one)."""
        return list(range(len(self.backbone)))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The feature maps of the levels in `feature_ends` as timm's feature API asks for them: every block's
        (B, C, H/s, W/s) here (s = ``stem_stride``), the four stage maps in the pyramid model.

        Args:
            indices: levels to return: None all, an int the last n, a sequence those (negative from the end).
            norm: must be False (the model has no final norm).
            stop_early: skip the blocks after the last requested level.
            output_fmt: ``'NCHW'`` only.
            intermediates_only: return only the list, not (final map, list).
        """
        check_feature_request(output_fmt, norm)
        ends = self.feature_ends()
        take_indices, max_index = feature_take_indices(len(ends), indices)
        taken = {ends[i] for i in take_indices}
        blocks = self.backbone[:ends[max_index] + 1] if stop_early else self.backbone
        intermediates = []
        x = self._embed(x)
        for i, block in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in taken:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last level in ``indices`` (and the classifier); returns the kept indices."""
        ends = self.feature_ends()
        take_indices, max_index = feature_take_indices(len(ends), indices)
        self.backbone = self.backbone[:ends[max_index] + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_head:
            self.reset_classifier(0)
        return take_indices

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Resize a checkpoint's ``pos_embed`` (1, C, h, w) bicubically to this model's grid; other keys unchanged."""
        pos_embed = state_dict.get("pos_embed")
        target = self.pos_embed.shape
        if pos_embed is None or pos_embed.shape == target or pos_embed.dim() != 4 or pos_embed.shape[:2] != target[:2]:
            return state_dict
        _logger.info("resizing pos_embed %s -> %s (bicubic)", tuple(pos_embed.shape), tuple(target))
        resized = F.interpolate(pos_embed.float(), size=tuple(target[-2:]), mode="bicubic", align_corners=False)
        return {**state_dict, "pos_embed": resized.to(pos_embed.dtype)}

    def extra_repr(self) -> str:
        graph = "knn" if self.start_thresh is None else f"threshold start={self.start_thresh} dec={self.dec}"
        return f"img_size={self.img_size}, stem_stride={self.stem_stride}, grid={self.grid_size}, graph={graph}"


_THRESHOLD_ALIASES: dict[str, str] = {"starting_threshold": "start_thresh", "decrement": "dec"}


def _graph_kwargs(variant: str, kwargs: dict[str, Any], threshold_default: bool) -> None:
    """Resolve the graph arguments in place: published aliases, SViG defaults, and dec without start_thresh."""
    for alias, name in _THRESHOLD_ALIASES.items():
        if alias in kwargs:
            if kwargs.get(name) is not None:
                raise ValueError(f"{variant}: give either {name} or {alias}, not both")
            kwargs[name] = kwargs.pop(alias)
    if kwargs.get("start_thresh") is None:
        kwargs.pop("start_thresh", None)
        if threshold_default:
            kwargs["start_thresh"] = SVIG_START_THRESH
        elif kwargs.get("dec") is not None:
            raise ValueError(f"{variant}: dec={kwargs['dec']} needs start_thresh (the kNN graph has no threshold)")
    if kwargs.get("dec") is None:
        kwargs.pop("dec", None)


def check_pretrained_source(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> None:
    """ValueError for ``pretrained=True`` without a local file: the published weights have no download location."""
    if pretrained and not any(key in (kwargs.get("pretrained_cfg_overlay") or {}) for key in ("file", "state_dict")):
        raise ValueError(
            f"{variant}: no download location is configured; pass pretrained_cfg_overlay=dict(file=PATH) or "
            "load a published checkpoint with vig.load_checkpoint(model, path)"
        )


def _create(variant: str, size: str, threshold_default: bool, pretrained: bool = False, **kwargs: Any) -> VisionGNN:
    check_pretrained_source(variant, pretrained, kwargs)
    _graph_kwargs(variant, kwargs, threshold_default)
    dims = SIZES[size]
    channels = kwargs.pop("channels", dims.channels)  # a narrower / shallower copy of the size, e.g. for tests
    depth = kwargs.pop("depth", dims.depth)
    return build_model_with_cfg(
        VisionGNN,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=kwargs.pop("out_indices", depth), feature_cls="getter"),
        channels=channels,
        depth=depth,
        **kwargs,
    )


def published_cfg(**overrides: Any) -> dict[str, Any]:
    """Pretrained config as published (ViG and pyramid ViG): 224 px, crop 0.9, bicubic, mean = std = 0.5,
    final map 14 x 14 (the isotropic model's; pyramid configs override it); ``overrides`` replace entries."""
    return {
        **dict(url="", num_classes=1000, input_size=(3, PUBLISHED_IMG_SIZE, PUBLISHED_IMG_SIZE), pool_size=(14, 14),
               crop_pct=0.9, interpolation="bicubic", fixed_input_size=True, mean=(0.5, 0.5, 0.5),
               std=(0.5, 0.5, 0.5), first_conv="stem.convs.0", classifier="prediction.4"),
        **overrides,
    }


def cifar_cfg(**overrides: Any) -> dict[str, Any]:
    """Pretrained config of the CIFAR-10 configurations (no published weights): 32 px, crop 1.0, bicubic,
    CIFAR-10 mean / std, 10 classes; ``overrides`` replace entries."""
    return published_cfg(**{**dict(num_classes=10, input_size=(3, CIFAR_IMG_SIZE, CIFAR_IMG_SIZE), crop_pct=1.0,
                                   pool_size=stem_grid(CIFAR_IMG_SIZE, CIFAR_STEM_STRIDE),
                                   mean=CIFAR10_MEAN, std=CIFAR10_STD), **overrides})


default_cfgs = generate_default_cfgs({
    **{f"{prefix}_{size}_224_gelu": published_cfg() for prefix in ("vig", "svig") for size in SIZES},
    **{f"{prefix}_ti_cifar": cifar_cfg() for prefix in ("vig", "svig")},
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
