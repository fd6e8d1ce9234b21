"""The blocks that two or more model families share (no model file imports another; each builds on this one).

For the isotropic (`vig.models.isotropic`) and pyramid (`vig.models.pyramid`) ViG:

- the blocks: `ConvStem`, `Grapher` (graph conv with residual) and `FFN`, and their 1x1 conv + BN pieces;
- the graph schedules and arguments: `threshold_schedule` (SViG), `resolve_graph_kwargs` (published
  aliases and SViG defaults), the kNN-cap warning (`warn_cap_once`), `resize_relative_pos`;
- the head: `head_pool` and the 1024-wide conv head ``prediction.{0,1,4}``;
- `VisionGNNBase`, the timm API both models give: classifier reset, head, gradient checkpointing,
  parameter groups, `forward_intermediates` / `prune_intermediate_layers`, and the checkpoint-time
  ``pos_embed`` resize;
- the pretrained configs (`published_cfg`, `cifar_cfg`) and the factory check `check_pretrained_source`.

For MobileViG (`vig.models.mobilevig`) and GreedyViG (`vig.models.greedyvig`): `EfficientStem`, the one
`InvertedResidual` (with `remap_inverted_residuals` for GreedyViG's published names), `DistilledConvNet` (head,
distillation and pruning API) and `efficient_cfg`; `FFN` (MobileViG) and `Downsample` (pyramid ViG too).
For every family: `check_pool` (the one check of ``global_pool``) and `conv_bn`.

The module and parameter names are those of the published code, so that published checkpoints load unchanged
(GreedyViG's inverted residuals through the rename). The semantics are written down in docs/model-notes.md.
"""
import dataclasses
import logging
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, SelectAdaptivePool2d, register_notrace_function, register_notrace_module
from timm.models import checkpoint_seq, resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from torch import nn

from gcn_lib import DynConv2d, act_layer, init_convs_
from vig.models.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR_IMG_SIZE
from vig.models.factory_args import build_like
from vig.models.features import check_feature_request, forward_taking
from vig.models.pretrained import build_with_weights, tag_settings

_logger = logging.getLogger(__name__)
_logged_caps: set[str] = set()  # kNN-cap warnings this process has logged: each distinct one is logged once

HEAD_HIDDEN = 1024
PUBLISHED_IMG_SIZE = 224
SVIG_START_THRESH = 0.89
SVIG_DEC = 0.03


def pair(size: int | Sequence[int]) -> tuple[int, int]:
    """An image size as (height, width): an int is square."""
    if isinstance(size, int):
        return size, size
    height, width = (int(v) for v in size)
    return height, width


def check_stem_stride(stride: int, allowed: Sequence[int]) -> int:
    """``stride`` if it is one of ``allowed`` (an int, not a bool), else ValueError naming the allowed values."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride not in allowed:
        raise ValueError(f"stem_stride must be one of {', '.join(map(str, allowed))}, got {stride!r}")
    return stride


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


def conv_bn(in_channels: int, out_channels: int, **dd: Any) -> nn.Sequential:
    """1x1 conv with bias followed by BatchNorm: (B, C_in, H, W) -> (B, C_out, H, W); ``dd``: device / dtype."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, **dd), nn.BatchNorm2d(out_channels, **dd))


class Downsample(nn.Module):
    """Between stages (pyramid ViG, MobileViG, GreedyViG): 3x3 conv stride 2 (padding 1) + BN,
    (B, C_in, H, W) -> (B, C_out, H/2, W/2) (rounded up); keys ``conv.{0,1}``."""

    def __init__(self, in_channels: int, out_channels: int, **dd: Any) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, **dd),
                                  nn.BatchNorm2d(out_channels, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def drop_path_layer(rate: float) -> nn.Module:
    """Stochastic depth with ``rate``, or Identity for 0."""
    return DropPath(rate) if rate > 0 else nn.Identity()


class ConvStem(nn.Module):
    """Convolutional stem (the published ViG stems): (B, widths[0], H, W) -> (B, C, H / 2^h, W / 2^h), sizes
    rounded up, for C = widths[-1] and h = ``halvings``.

    A 3x3 conv (padding 1) with BN and activation for each step widths[i] -> widths[i + 1], the first
    ``halvings`` at stride 2 and the rest at stride 1, then a 3x3 conv C -> C with BN; parameters
    ``convs.{i}.*``, the same for every ``halvings``.
    """

    def __init__(self, widths: Sequence[int], act: str, halvings: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for index, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            conv_stride = 2 if index < halvings else 1
            layers += [nn.Conv2d(c_in, c_out, 3, stride=conv_stride, padding=1), nn.BatchNorm2d(c_out), act_layer(act)]
        layers += [nn.Conv2d(widths[-1], widths[-1], 3, stride=1, padding=1), nn.BatchNorm2d(widths[-1])]
        self.convs = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


HEAD_POOLS: tuple[str, ...] = ("avg", "max", "avgmax", "")
MEAN_POOLS: tuple[str, ...] = ("avg", "")  # models that pool by a mean of their own (graph nodes, batch features)


def check_pool(global_pool: str, allowed: Sequence[str] = HEAD_POOLS) -> str:
    """``global_pool`` if it is one of ``allowed`` (``''``: no pooling), else ValueError naming them. The conv
    heads take `HEAD_POOLS`; ``catavgmax`` would double the channels the head's first conv takes."""
    if global_pool not in allowed:
        raise ValueError(f"global_pool must be one of {', '.join(map(repr, allowed))}, got {global_pool!r}")
    return global_pool


def head_pool(pool_type: str) -> SelectAdaptivePool2d:
    """The pooling before the conv head (B, C, h, w) -> (B, C, 1, 1): a timm pool type of `HEAD_POOLS`, or
    ``''`` for none (maps pass through)."""
    return SelectAdaptivePool2d(pool_type=check_pool(pool_type), flatten=False)


def strided_grid(height: int, width: int, stride: int) -> tuple[int, int]:
    """The map (H', W') that a stride-``stride`` stack of stride-2 3x3 convs (padding 1) makes of an
    (height, width) image: one halving, rounded up, per factor 2 of a power-of-two ``stride``."""
    while stride > 1:
        height, width, stride = (height + 1) // 2, (width + 1) // 2, stride // 2
    return height, width


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
        self.fc1 = conv_bn(channels, channels)
        self.graph_conv = DynConv2d(channels, 2 * channels, conv="mr", act=act, norm="batch", bias=True, **graph)
        self.fc2 = conv_bn(2 * channels, channels)
        self.drop_path = drop_path_layer(drop_path)
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

    def graph_relative_pos(self) -> torch.Tensor | None:
        """The stored term as the graph takes it: the graph resizes it block by block of centres to the map it
        meets (`gcn_lib.graph.relative_rows`), so that no (N, M) copy is made at another input size."""
        return self.relative_pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.fc1(x)
        x = self.graph_conv(x, self.graph_relative_pos())
        return self.drop_path(self.fc2(x)) + shortcut


class FFN(nn.Module):
    """Feed-forward block: 1x1 conv C -> 4C + BN, activation, 1x1 conv 4C -> C + BN, drop path, residual
    (ViG, pyramid ViG and MobileViG); ``dd``: device / dtype."""

    def __init__(self, channels: int, act: str, drop_path: float, expansion: int = 4, **dd: Any) -> None:
        super().__init__()
        self.fc1 = conv_bn(channels, expansion * channels, **dd)
        self.act = act_layer(act)
        self.fc2 = conv_bn(expansion * channels, channels, **dd)
        self.drop_path = drop_path_layer(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.fc2(self.act(self.fc1(x)))
        return self.drop_path(x) + shortcut


class VisionGNNBase(nn.Module):
    """The timm model API of the isotropic and pyramid ViG: images (B, in_chans, H, W) -> logits (B, num_classes).

    A subclass calls ``super().__init__(...)`` (which sets the attributes below and the head pooling), then
    builds ``stem``, ``pos_embed`` (1, C0, h, w), ``backbone`` (an nn.Sequential of blocks),
    ``prediction = self.build_prediction(...)`` and ``feature_info``, and calls `reset_parameters`. It
    defines `feature_ends` (the ``backbone`` index ending each feature level), ``_embed`` (stem plus position
    embedding) and ``forward`` (in its own module: timm's fx tracing wraps the notrace functions in the
    globals of the root's forward).

    Args:
        num_classes: classifier outputs; 0 gives the pre-logits (B, 1024).
        in_chans: image channels.
        num_features: channels of the final feature map.
        img_size: the image size the model is built for.
        stem_stride: total stride of the stem.
        start_thresh, dec: the similarity-threshold graph's schedule (None: kNN).
        global_pool: pooling before the head (see `head_pool`).
    """

    def __init__(self, num_classes: int, in_chans: int, num_features: int, img_size: int | Sequence[int],
                 stem_stride: int, start_thresh: float | None, dec: float, global_pool: str) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = num_features
        self.head_hidden_size = HEAD_HIDDEN
        self.global_pool = head_pool(global_pool)
        self.img_size = pair(img_size)
        self.stem_stride = stem_stride
        self.start_thresh = start_thresh
        self.dec = dec if start_thresh is not None else None
        self.grad_checkpointing = False

    def build_prediction(self, channels: int, act: str, drop_rate: float) -> nn.Sequential:
        """The published conv head: 1x1 conv C -> 1024, BN, activation, dropout, classifier (``prediction.4``)."""
        return nn.Sequential(
            nn.Conv2d(channels, HEAD_HIDDEN, 1),
            nn.BatchNorm2d(HEAD_HIDDEN),
            act_layer(act),
            nn.Dropout(drop_rate),
            self._classifier(self.num_classes),
        )

    def _classifier(self, num_classes: int) -> nn.Module:
        """The classifier (B, head_hidden_size, h, w) -> (B, num_classes, h, w): a 1x1 conv, or Identity for 0."""
        return nn.Conv2d(self.head_hidden_size, num_classes, 1) if num_classes > 0 else nn.Identity()

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
        """The last layer of the head: Conv2d(head_hidden_size, num_classes, 1), or Identity for num_classes=0."""
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

    def feature_ends(self) -> list[int]:
        """Index in ``backbone`` of the last module of each feature level; every subclass gives its own."""
        raise NotImplementedError(f"{type(self).__name__} does not define its feature levels")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> final feature map (B, C, H', W') (stem and position embedding, then the blocks)."""
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
        (B, C, H/s, W/s) in the isotropic model (s = ``stem_stride``), the four stage maps in the pyramid model.

        Args:
            indices: levels to return: None all, an int the last n, a sequence those (negative from the end).
            norm: must be False (the model has no final norm).
            stop_early: skip the blocks after the last requested level.
            output_fmt: ``'NCHW'`` only.
            intermediates_only: return only the list, not (final map, list).
        """
        check_feature_request(output_fmt, norm)
        x, intermediates = forward_taking(self.backbone, self._embed(x), self.feature_ends(), indices, stop_early,
                                          self.grad_checkpointing)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last level in ``indices`` and, with ``prune_head``, the whole conv head (no
        parameter is left unused, as a detector's DDP needs); returns the kept indices. The model's forward then
        gives the last kept map (B, C, h, w); `reset_classifier` puts a 1x1 conv classifier on it."""
        ends = self.feature_ends()
        take_indices, max_index = feature_take_indices(len(ends), indices)
        self.backbone = self.backbone[:ends[max_index] + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        self.num_features = self.feature_info[-1]["num_chs"]
        if prune_head:
            self.head_hidden_size = self.num_features
            self.global_pool = head_pool("").train(self.training)
            self.prediction = nn.Sequential(nn.Identity())
            self.num_classes = 0
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

    def graph_repr(self) -> str:
        """The graph of the blocks, for ``extra_repr``: ``knn`` or the threshold schedule."""
        return "knn" if self.start_thresh is None else f"threshold start={self.start_thresh} dec={self.dec}"


_THRESHOLD_ALIASES: dict[str, str] = {"starting_threshold": "start_thresh", "decrement": "dec"}


def resolve_graph_kwargs(variant: str, kwargs: dict[str, Any], threshold_default: bool) -> None:
    """Resolve the graph arguments of a factory call in place: published aliases (``starting_threshold``,
    ``decrement``), the SViG default start with ``threshold_default``, and a refused ``dec`` without
    ``start_thresh``."""
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
    """Prepare a factory call's ``kwargs`` for its pretrained tag, in place.

    A tag of published SViG weights carries the threshold schedule they were trained with (`VigPretrainedCfg`):
    it becomes ``start_thresh`` / ``dec`` unless the call gives either (or a published alias). ``pretrained=True``
    where neither the tag nor ``pretrained_cfg_overlay`` names weights is a ValueError (one line).
    """
    given = [key for key in ("start_thresh", "dec", *_THRESHOLD_ALIASES) if kwargs.get(key) is not None]
    settings = tag_settings(variant, kwargs.get("pretrained_cfg"))
    if settings and not given:
        kwargs.update(settings)
    if not pretrained:
        return
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if any(overlay.get(key) for key in ("file", "state_dict", "url", "hf_hub_id")):
        return
    config = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"))
    if not (config.url or config.hf_hub_id):
        raise ValueError(
            f"{variant}: no published weights (see timm.list_pretrained('*vig*')); pass "
            "pretrained_cfg_overlay=dict(file=PATH) or load a checkpoint with vig.load_checkpoint(model, path)"
        )


def published_cfg(pool_size: tuple[int, int], **overrides: Any) -> dict[str, Any]:
    """Pretrained config as published (ViG and pyramid ViG): 224 px, crop 0.9, bicubic, mean = std = 0.5,
    final map ``pool_size``; ``overrides`` replace entries."""
    return {
        **dict(url="", num_classes=1000, input_size=(3, PUBLISHED_IMG_SIZE, PUBLISHED_IMG_SIZE), pool_size=pool_size,
               crop_pct=0.9, interpolation="bicubic", fixed_input_size=True, mean=(0.5, 0.5, 0.5),
               std=(0.5, 0.5, 0.5), first_conv="stem.convs.0", classifier="prediction.4"),
        **overrides,
    }


def cifar_cfg(pool_size: tuple[int, int], **overrides: Any) -> dict[str, Any]:
    """Pretrained config of the CIFAR-10 configurations (no published weights): 32 px, crop 1.0, bicubic,
    CIFAR-10 mean / std, 10 classes, final map ``pool_size``; ``overrides`` replace entries."""
    return published_cfg(pool_size, **{**dict(num_classes=10, input_size=(3, CIFAR_IMG_SIZE, CIFAR_IMG_SIZE),
                                              crop_pct=1.0, mean=CIFAR10_MEAN, std=CIFAR10_STD), **overrides})


# --- MobileViG and GreedyViG --------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def efficient_cfg(**overrides: Any) -> dict[str, Any]:
    """Pretrained config of the published MobileViG / GreedyViG ImageNet models: 224 px, crop 0.9, bicubic,
    ImageNet mean / std, both classifiers; ``overrides`` replace entries."""
    return {**dict(url="", num_classes=1000, input_size=(3, PUBLISHED_IMG_SIZE, PUBLISHED_IMG_SIZE),
                   pool_size=(7, 7), crop_pct=0.9, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   first_conv="stem.stem.0", classifier=("head", "dist_head"), fixed_input_size=False),
            **overrides}


# drop-path rate of the published MobileViG / GreedyViG recipes, the factories' default
EFFICIENT_DROP_PATH = 0.1


def create_efficient(model_cls: type, variant: str, size: Any, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a MobileViG / GreedyViG variant: its size table entry (a dataclass of constructor arguments), the
    published drop-path rate, ``kwargs`` over both, stage maps 0-3 for ``features_only``, and the weights of
    ``pretrained`` through `vig.models.pretrained.build_with_weights`."""
    settings = {**dataclasses.asdict(size), "drop_path_rate": EFFICIENT_DROP_PATH, **kwargs}
    feature_cfg = dict(out_indices=settings.pop("out_indices", (0, 1, 2, 3)), feature_cls="getter")
    return build_with_weights(model_cls, variant, pretrained, feature_cfg=feature_cfg, **settings)


@register_notrace_function  # a leaf of fx tracing: the layout follows the dtype
def efficient_layout(x: torch.Tensor) -> torch.Tensor:
    """The images in the channels-last memory layout, except in float64 (see `EfficientStem`): (B, C, H, W)."""
    if x.dtype == torch.float64:
        return x
    return x.contiguous(memory_format=torch.channels_last)


class EfficientStem(nn.Module):
    """Stem of MobileViG and GreedyViG: 3x3 stride-2 conv to C/2, BN, GELU, 3x3 stride-2 conv to C, BN, GELU:
    (B, in_chans, H, W) -> (B, C, H/4, W/4) (rounded up); keys ``stem.{0,1,3,4}``.

    The images enter in the channels-last memory layout, so every convolution, norm and axial graph after
    it runs channels-last: on the CPU these models' depthwise and 1x1 convolutions run faster so
    (docs/BENCHMARKS.md, "Side by side on the CPU"). Float64, the dtype that checks the published weights
    bit for bit, stays in the contiguous layout: the published code's order of summation."""

    def __init__(self, in_chans: int, channels: int, **dd: Any) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, channels // 2, 3, stride=2, padding=1, **dd), nn.BatchNorm2d(channels // 2, **dd),
            nn.GELU(),
            nn.Conv2d(channels // 2, channels, 3, stride=2, padding=1, **dd), nn.BatchNorm2d(channels, **dd),
            nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(efficient_layout(x))


class InvertedMLP(nn.Module):
    """1x1 expand, BN, GELU, 3x3 depthwise, BN, GELU, 1x1 project, BN: (B, C, H, W) -> (B, C, H, W); keys
    ``fc1 norm1 mid mid_norm fc2 norm2`` (MobileViG's; GreedyViG's ``pw1 norm1 dw norm2 pw2 norm3`` are renamed
    by `remap_inverted_residuals`)."""

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
    """The local block of MobileViG and GreedyViG: x + drop_path(layer_scale_2 * mlp(x)), the `InvertedMLP`
    expanding 4x; (B, C, H, W) -> same. The layer scale has shape (C, 1, 1) (MobileViG's; GreedyViG publishes it
    as (C,) under another module tree: `remap_inverted_residuals`)."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale: float = 1e-5, expansion: int = 4,
                 **dd: Any) -> None:
        super().__init__()
        self.mlp = InvertedMLP(dim, dim * expansion, **dd)
        self.drop_path = drop_path_layer(drop_path)
        self.layer_scale_2 = nn.Parameter(torch.full((dim, 1, 1), layer_scale, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.layer_scale_2 * self.mlp(x))


# GreedyViG's published names inside an inverted residual -> the names of `InvertedMLP`
_GREEDY_INVERTED_NAMES: dict[str, str] = {"pw1": "fc1", "norm1": "norm1", "dw": "mid", "norm2": "mid_norm",
                                          "pw2": "fc2", "norm3": "norm2"}


def remap_inverted_residuals(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GreedyViG's published inverted residuals in `InvertedResidual`'s layout: ``P.dws.{pw1,norm1,dw,norm2,pw2,
    norm3}.*`` -> ``P.mlp.{fc1,norm1,mid,mid_norm,fc2,norm2}.*`` and ``P.layer_scale_2`` (C,) -> (C, 1, 1), for each
    block prefix P that holds ``dws`` keys. Other keys, and a state dict already in this layout, pass unchanged."""
    prefixes = {key.split(".dws.")[0] for key in state_dict if ".dws." in key}
    remapped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        prefix, dws, rest = key.partition(".dws.")
        if dws and prefix in prefixes:
            module, _, leaf = rest.partition(".")
            key = f"{prefix}.mlp.{_GREEDY_INVERTED_NAMES.get(module, module)}.{leaf}"
        elif key.endswith(".layer_scale_2") and key[:-len(".layer_scale_2")] in prefixes and value.dim() == 1:
            value = value[:, None, None]
        remapped[key] = value
    return remapped


class DistilledConvNet(nn.Module):
    """Head, classifier, distillation and pruning API of MobileViG and GreedyViG.

    ``prediction`` is Sequential(pool, 1x1 conv to emb, BN, GELU, dropout) (published keys ``prediction.{1,2}``);
    ``head`` and ``dist_head`` are 1x1 convs emb -> classes. As timm's DeiT: in eval, and in training unless
    `set_distilled_training` (True), the output is the mean of both heads; distilled training returns the pair
    (head, dist_head). `adapt_state_dict` (applied by `vig.checkpoint.checkpoint_filter_fn` and the trainer's
    loader) brings published GreedyViG inverted residuals into the shared layout.
    """

    def _build_head(self, in_dim: int, emb_dims: int, num_classes: int, drop_rate: float, global_pool: str,
                    **dd: Any) -> None:
        self.global_pool = check_pool(global_pool)
        self.num_features = in_dim
        self.head_hidden_size = emb_dims
        self.num_classes = num_classes
        self.distilled_training = False
        self.prediction = nn.Sequential(SelectAdaptivePool2d(pool_type=global_pool),
                                        nn.Conv2d(in_dim, emb_dims, 1, **dd), nn.BatchNorm2d(emb_dims, **dd),
                                        nn.GELU(), nn.Dropout(drop_rate))
        self.head = self._classifier(emb_dims, num_classes, **dd)
        self.dist_head = self._classifier(emb_dims, num_classes, **dd)

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
            self.global_pool = check_pool(global_pool)
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

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A published or own checkpoint's weights in this model's layout (`remap_inverted_residuals`)."""
        return remap_inverted_residuals(state_dict)
