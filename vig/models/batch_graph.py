"""Batch-graph head on a timm backbone: a graph over the images of a batch, trained with an edge loss;
registered with timm as ``bgnn`` (any backbone) and ``bgnn_mobilenetv3_small_100`` (the seed configuration).

Paper: none is cited; the head is this project's seed configuration (semantics, trainer protocol and measured
figures in docs/BATCH_GRAPH.md). `SIZES` is the only size table. The model mixes the images of a batch, so it is no
dense per-image backbone: ``features_only`` is refused.

Each image of a batch is a node. With backbone features x (B, D):

- `EdgeNet` scores every pair: |x_i - x_j| (B, B, D), laid out as (1, D, B, B), passes 1x1 convs (no bias)
  + BatchNorm + LeakyReLU (slope 0.01), one per entry of ``ratio`` with ``edge_features * r`` channels,
  then a 1x1 conv to one channel (with bias) and a sigmoid: ``edge_sim`` (B, B) in (0, 1), symmetric.
  Its mixing weights are A = edge_sim + I + 1e-6 with each row divided by its sum.
- `NodeNet` zeroes A's diagonal, L1-normalises each row (a row of zeros stays zero), aggregates
  a = A x (B, D), concatenates [x, a] (B, 2D), laid out as (1, 2D, B, 1), and applies 1x1 convs (no bias)
  + BatchNorm with LeakyReLU between them: hidden layers of ``num_classes * r`` channels for the entries
  of ``ratio`` but the last, then the classifier (1x1 conv + BatchNorm) to ``num_classes`` logits.
  Because the zero-diagonal normalisation comes last, a row's first normalisation cancels: a_i is the
  edge_sim-weighted mean of the other samples' features.
- The edge loss is BCE(edge_sim, `edge_targets`): the probability that two samples share a class. The model
  gives it to the trainer as its ``edge`` term of the `vig.models.training_api.ExtraLosses` protocol
  (`BatchGraphNet.extra_losses`); it is also `vig.models.training_api.BatchDependent` (training batches of
  two images or more).

Features: the backbone's ``forward_features`` output; a (B, C, H, W) map is average-pooled to (B, C) (for
mobilenetv3_small_100 the 576-channel map, not its 1,024-wide ``conv_head``: the backbone's head layers are
removed), any other layout (ViT tokens) goes through the backbone's own ``forward_head(x, pre_logits=True)``.

Predictions are transductive: a sample's logits depend on the other images of its batch (eval mode too).
A batch of one has no neighbours: a = 0 and the logits come from [x, 0]. In training BatchNorm needs at
least two samples, so a training batch of one raises ValueError.
"""

import copy
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from gcn_lib.shapes import shape_str
from vig.checkpoint import checkpoint_filter_fn
from vig.errors import WeightsUnavailableError
from vig.models.factory_args import build_like, takes_device_and_dtype
from vig.models.training_api import EDGE_LOSS
from vig.models.vig_blocks import MEAN_POOLS, check_pool

__all__ = ["BatchGraphHead", "BatchGraphNet", "EdgeNet", "NodeNet", "aggregate_neighbours",
           "edge_targets", "label_to_edge"]

DEFAULT_BACKBONE = "mobilenetv3_small_100"


@dataclass(frozen=True)
class BatchGraphSize:
    """Backbone, base width of the EdgeNet layers and the width multipliers of the EdgeNet / NodeNet layers."""

    backbone: str
    edge_features: int
    ratio: tuple[int, ...]


SIZES: dict[str, BatchGraphSize] = {
    "mobilenetv3_small_100": BatchGraphSize(backbone=DEFAULT_BACKBONE, edge_features=256, ratio=(1,)),
}
_WEIGHT_SOURCES = ("file", "url", "hf_hub_id", "state_dict")


def label_to_edge(labels: torch.Tensor) -> torch.Tensor:
    """Same-class matrix of a batch: hard labels (B,) -> (B, B) float, 1 where two samples share a class;
    label vectors (B, C) (one-hot or mixed) -> Y Y^T (B, B), the probability that two samples drawn from
    the two label distributions share a class."""
    if labels.ndim == 1:
        return (labels[:, None] == labels[None, :]).float()
    if labels.ndim == 2:
        labels = labels.float()
        return labels @ labels.t()
    raise ValueError(f"labels must be (B,) class indices or (B, C) label vectors, got shape {tuple(labels.shape)}")


def edge_targets(targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Edge-loss target (B, B) in [0, 1] from the trainer's targets: class indices (B,), or label vectors
    (B, C) that timm's `Mixup` smoothed with ``smoothing`` (each vector is (1 - s) y + s / C for the mixed
    label vector y). The smoothing is undone exactly (it is affine) before `label_to_edge`, so the target
    is Y Y^T of the unsmoothed mixed labels; rounding is clamped to [0, 1]."""
    if targets.ndim == 2 and smoothing > 0:
        targets = (targets.float() - smoothing / targets.shape[1]) / (1.0 - smoothing)
    return label_to_edge(targets).clamp(0.0, 1.0)


def _conv_bn(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False), nn.BatchNorm2d(out_channels)]


@register_notrace_function  # a leaf of fx tracing: its tests depend on the input's shape
def require_head_batch(x: torch.Tensor, training: bool) -> None:
    """ValueError unless x is features (B, D), with B >= 2 in training (fx wraps only public names)."""
    if x.dim() != 2:
        raise ValueError(f"batch-graph head takes features (B, D), got shape {shape_str(x.shape)}")
    require_training_batch(x, training)


@register_notrace_function  # a leaf of fx tracing: its test depends on the input's shape
def require_training_batch(x: torch.Tensor, training: bool) -> None:
    """ValueError for a training batch x (B, ...) of one sample, which BatchNorm cannot normalise."""
    if training and x.shape[0] < 2:
        raise ValueError("batch-graph head: BatchNorm needs at least 2 samples per training batch, got 1")


@register_notrace_function  # a leaf of fx tracing, which sees return_edges as a traced input
def head_output(logits: torch.Tensor, edge_sim: torch.Tensor,
                return_edges: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(logits, edge_sim) with ``return_edges``, else logits."""
    if return_edges:
        return logits, edge_sim
    return logits


class EdgeNet(nn.Module):
    """Pair scores of a batch: features (B, D) -> (mixing weights A (B, B), edge_sim (B, B)).

    Args:
        in_features: D.
        edge_features: base width; hidden layer i has ``edge_features * ratio[i]`` channels.
        ratio: width multipliers, one 1x1 conv + BatchNorm + LeakyReLU layer each.
    """

    def __init__(self, in_features: int, edge_features: int, ratio: Sequence[int] = (1,)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for r in ratio:
            layers += [*_conv_bn(width, edge_features * r), nn.LeakyReLU(0.01)]
            width = edge_features * r
        layers.append(nn.Conv2d(width, 1, kernel_size=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        require_head_batch(x, self.training)
        batch = x.shape[0]
        pairs = (x[:, None, :] - x[None, :, :]).abs()  # (B, B, D), entry [i, j] = |x_i - x_j|
        scores = self.layers(pairs.permute(2, 0, 1).unsqueeze(0))  # (1, 1, B, B)
        edge_sim = torch.sigmoid(scores)[0, 0]
        weights = edge_sim + torch.eye(batch, dtype=edge_sim.dtype, device=edge_sim.device) + 1e-6
        return weights / weights.sum(dim=1, keepdim=True), edge_sim


def aggregate_neighbours(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """a = A x with A the weights (B, B) with a zero diagonal and L1-normalised rows: features (B, D) -> (B, D).
    A row without off-diagonal weight (a batch of one) stays zero, so its a is 0."""
    off_diagonal = weights * (1.0 - torch.eye(weights.shape[0], dtype=weights.dtype, device=weights.device))
    return F.normalize(off_diagonal, p=1.0, dim=-1) @ x


class NodeNet(nn.Module):
    """Node update: features (B, D) and mixing weights (B, B) -> logits (B, num_classes).

    Args:
        in_features: D; the first layer takes [x, a], 2D channels.
        num_classes: classifier outputs; 0 leaves the classifier out (the output is the hidden features).
        ratio: one layer per entry: hidden layers of ``num_classes * r`` channels for all entries but the
            last, whose layer is the classifier (``num_classes`` channels, as the published ratio (1,) has).
    """

    def __init__(self, in_features: int, num_classes: int, ratio: Sequence[int] = (1,)) -> None:
        super().__init__()
        if num_classes == 0 and len(ratio) > 1:
            raise ValueError("num_classes=0 needs a one-entry ratio: hidden widths are num_classes * r")
        layers: list[nn.Module] = []
        width = 2 * in_features
        for r in ratio[:-1]:
            layers += [*_conv_bn(width, num_classes * r), nn.LeakyReLU(0.01)]
            width = num_classes * r
        self.hidden = nn.Sequential(*layers)
        self.hidden_size = width
        self.classifier: nn.Module = nn.Identity()
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int, like: nn.Module | None = None) -> None:
        """A new classifier layer (1x1 conv + BatchNorm) with ``num_classes`` outputs, on the device and in the
        dtype and train mode of ``like`` (default: this net); 0 removes it."""
        self.num_classes = num_classes
        self.classifier = build_like(like if like is not None else self, lambda: nn.Sequential(*_conv_bn(self.hidden_size, num_classes))
                                     if num_classes else nn.Identity())

    def forward(self, x: torch.Tensor, weights: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        require_head_batch(x, self.training)
        nodes = torch.cat([x, aggregate_neighbours(x, weights)], dim=1)  # (B, 2D)
        nodes = self.hidden(nodes.t()[None, :, :, None])  # (1, 2D, B, 1) -> (1, hidden, B, 1)
        if not pre_logits:
            nodes = self.classifier(nodes)
        return nodes[0, :, :, 0].t()


class BatchGraphHead(nn.Module):
    """EdgeNet and NodeNet: features (B, D) -> (logits (B, num_classes), edge_sim (B, B))."""

    def __init__(self, in_features: int, num_classes: int, edge_features: int = 256,
                 ratio: Sequence[int] = (1,)) -> None:
        super().__init__()
        self.edge_net = EdgeNet(in_features, edge_features, ratio)
        self.node_net = NodeNet(in_features, num_classes, ratio)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        weights, edge_sim = self.edge_net(x)
        return self.node_net(x, weights, pre_logits=pre_logits), edge_sim


def _prefixed(pattern: Any) -> Any:
    """A backbone group_matcher pattern (regex string or timm's list of (regex, order) pairs) for the
    backbone's parameters inside this model (``backbone.`` prefix)."""
    if isinstance(pattern, str):
        return rf"^backbone\.(?:{pattern.removeprefix('^')})"
    return [(_prefixed(regex), order) for regex, order in pattern]


class BatchGraphNet(nn.Module):
    """A timm backbone with the batch-graph head: images (B, C, H, W) -> logits (B, num_classes), or with
    ``return_edges=True`` (logits, edge_sim (B, B)). Transductive: each image's logits depend on its batch.

    Args:
        backbone: timm model name.
        num_classes: classifier outputs; 0 gives the pre-logits (see `forward_head`).
        edge_features: base width of the EdgeNet layers.
        ratio: width multipliers of the EdgeNet and NodeNet layers (see `EdgeNet`, `NodeNet`).
        in_chans: image channels.
        backbone_pretrained: load the backbone's published weights (downloaded from the Hugging Face hub).
        backbone_file: a local file of backbone weights (a timm checkpoint or state dict), loaded by timm;
            the way to pretrained backbones without a network.
        global_pool: ``'avg'`` (the head pools the backbone's map before it mixes the batch) or ``''``: no
            pooling, and so no batch graph either: `forward_head` returns the backbone's features unchanged
            (like timm's early-pool heads, whose pooling cannot be removed without removing the head).
        device, dtype: where and in what floating-point type the parameters are created (timm's factory
            arguments).
        **backbone_kwargs: passed to ``timm.create_model(backbone, ...)`` (drop_rate, drop_path_rate, ...).
    """

    # the trainer's protocols (vig.models.training_api): the edge loss as an extra term, batches of two or more
    extra_forward_kwargs: Mapping[str, Any] = MappingProxyType({"return_edges": True})
    extra_loss_names: tuple[str, ...] = (EDGE_LOSS,)
    min_train_batch_size = 2

    @takes_device_and_dtype
    def __init__(self, backbone: str = DEFAULT_BACKBONE, num_classes: int = 1000, edge_features: int = 256,
                 ratio: Sequence[int] = (1,), in_chans: int = 3, backbone_pretrained: bool = False,
                 backbone_file: str | None = None, global_pool: str = "avg", **backbone_kwargs: Any) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.global_pool = check_pool(global_pool, MEAN_POOLS)
        ratio = tuple(ratio)
        if not ratio or any(int(r) != r or r < 1 for r in ratio):
            raise ValueError(f"ratio must be a non-empty sequence of positive integers, got {ratio}")
        if int(edge_features) != edge_features or edge_features < 1:
            raise ValueError(f"edge_features must be a positive integer, got {edge_features}")
        self.backbone = _create_backbone(backbone, in_chans, backbone_pretrained, backbone_file, backbone_kwargs)
        self.pools_map = self._probe_layout(in_chans, backbone_kwargs)
        if self.pools_map and hasattr(self.backbone, "prune_intermediate_layers"):
            self.backbone.prune_intermediate_layers(1, prune_norm=False, prune_head=True)  # unused head layers
        self.num_features = self.backbone.num_features if self.pools_map else self.backbone.head_hidden_size
        self.head = BatchGraphHead(self.num_features, num_classes, edge_features, ratio)
        self.num_classes = num_classes
        self.head_hidden_size = self.head.node_net.hidden_size
        self.feature_info = [dict(info, module=f"backbone.{info['module']}")
                             for info in getattr(self.backbone, "feature_info", [])]

    def _probe_layout(self, in_chans: int, backbone_kwargs: dict[str, Any]) -> bool:
        """Whether forward_features gives a (B, C, H, W) map, from a shape-only run on the meta device."""
        size = backbone_kwargs.get("img_size", self.backbone.pretrained_cfg.get("input_size", (3, 224, 224))[-2:])
        size = (size, size) if isinstance(size, int) else tuple(size)
        meta = copy.deepcopy(self.backbone).to("meta")
        with torch.no_grad():
            return meta.eval().forward_features(torch.empty(1, in_chans, *size, device="meta")).ndim == 4

    @property
    def grad_checkpointing(self) -> bool:
        return bool(getattr(self.backbone, "grad_checkpointing", False))

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """The backbone's gradient checkpointing (the head is small)."""
        self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The backbone's parameter groups (layer-wise lr decay); the head falls into the last group."""
        return {key: _prefixed(value) for key, value in self.backbone.group_matcher(coarse=coarse).items()}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.node_net.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New NodeNet classifier layer with ``num_classes`` outputs (0: none); the hidden layers stay.
        ``global_pool`` (``'avg'`` or ``''``) replaces the pooling, None keeps it."""
        if global_pool is not None:
            self.global_pool = check_pool(global_pool, MEAN_POOLS)
        self.num_classes = num_classes
        self.head.node_net.reset_classifier(num_classes, like=self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> the backbone's forward_features output (a map (B, C', H', W') or tokens)."""
        return self.backbone.forward_features(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features -> node features (B, num_features)."""
        return x.mean(dim=(2, 3)) if self.pools_map else self.backbone.forward_head(x, pre_logits=True)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False,
                     return_edges: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Backbone features -> logits (B, num_classes), or the classifier's input (B, head_hidden_size)
        with ``pre_logits``; with ``return_edges`` also edge_sim (B, B). Without pooling (``global_pool=''``)
        the features are returned unchanged (and ``return_edges`` is refused: there is no batch graph)."""
        if self.global_pool == "":
            if return_edges:
                raise ValueError("return_edges needs the batch graph, which global_pool='' leaves out")
            return x
        logits, edge_sim = self.head(self.pool(x), pre_logits=pre_logits)
        return head_output(logits, edge_sim, return_edges)

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              **kwargs: Any) -> Any:
        """The backbone's forward_intermediates (the head has no maps)."""
        return self.backbone.forward_intermediates(x, indices=indices, **kwargs)

    def extra_losses(self, extras: torch.Tensor, targets: torch.Tensor,
                     label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
        """The edge loss of a batch: ``{'edge': BCE(edge_sim, edge_targets(targets, label_smoothing))}``, in float32,
        from ``extras`` = edge_sim (B, B) of ``forward(x, return_edges=True)``. Call it outside autocast."""
        return {EDGE_LOSS: F.binary_cross_entropy(extras.float(), edge_targets(targets, label_smoothing))}

    def forward(self, x: torch.Tensor,
                return_edges: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) -> logits (B, num_classes); with ``return_edges`` (logits, edge_sim (B, B)).
        A training batch needs B >= 2 (ValueError)."""
        require_training_batch(x, self.training)
        return self.forward_head(self.forward_features(x), return_edges=return_edges)


def _create_backbone(name: str, in_chans: int, pretrained: bool, file: str | None,
                     kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model(name, num_classes=0)``, with published weights (hub) or a local file; a failed
    download raises `WeightsUnavailableError` (one line naming the ``backbone_file`` argument)."""
    options: dict[str, Any] = dict(num_classes=0, in_chans=in_chans, **kwargs)
    if file is not None:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **options)
    if not pretrained:
        return timm.create_model(name, **options)
    try:
        return timm.create_model(name, pretrained=True, **options)
    except OSError as err:  # huggingface_hub's offline / not-found errors and connection errors are OSErrors
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsUnavailableError(f"cannot download the pretrained {name} backbone ({reason}); without a "
                                      "network pass a local weights file: backbone_file=PATH",
                                      argument="backbone_file") from None


def _cfg(**kwargs: Any) -> dict[str, Any]:
    """No published weights of the whole model; preprocessing is the backbone's (filled in at creation)."""
    return {**dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                   interpolation="bilinear", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                   first_conv="backbone.conv_stem", classifier="head.node_net.classifier.0"), **kwargs}


# the configs describe the default backbone, mobilenetv3_small_100 (its 7 x 7 map at 224 px)
default_cfgs = generate_default_cfgs({
    "bgnn": _cfg(),
    "bgnn_mobilenetv3_small_100": _cfg(),
})

_PREPROCESSING = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a BatchGraphNet. ``pretrained`` with a whole-model source in ``pretrained_cfg_overlay`` (file,
    url, hub id) loads that checkpoint into the whole model (through `checkpoint_filter_fn`); otherwise it
    loads the backbone's published weights. ``features_only`` is refused (ValueError): the head mixes the images
    of a batch, so the model is no dense per-image backbone; the backbone itself is one."""
    backbone = kwargs.pop("backbone", DEFAULT_BACKBONE)
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    whole_model = bool(pretrained and any(overlay.get(key) for key in _WEIGHT_SOURCES))
    if kwargs.pop("features_only", False):
        raise ValueError(f"{variant}: features_only is not supported: the batch-graph head mixes the images of a "
                         f"batch, so it is no per-image dense backbone; build the backbone itself, "
                         f"timm.create_model({backbone!r}, features_only=True)")
    if whole_model and "num_classes" not in overlay:
        # a whole-model file is the user's own checkpoint: its classifier is taken to have the requested class
        # count (a mismatch is a strict-loading error), not the 1000 classes the default config describes
        kwargs["pretrained_cfg_overlay"] = dict(overlay, num_classes=kwargs.get("num_classes", 1000))
    model = build_model_with_cfg(BatchGraphNet, variant, pretrained=whole_model,
                                 pretrained_filter_fn=checkpoint_filter_fn, backbone=backbone,
                                 backbone_pretrained=pretrained and not whole_model, **kwargs)
    backbone_cfg = model.backbone.pretrained_cfg
    first_conv = backbone_cfg.get("first_conv")
    model.pretrained_cfg = dict(model.pretrained_cfg, backbone=backbone,
                                **{key: backbone_cfg[key] for key in _PREPROCESSING if key in backbone_cfg},
                                **(dict(first_conv=f"backbone.{first_conv}") if isinstance(first_conv, str) else {}))
    model.default_cfg = model.pretrained_cfg
    return model


@register_model
def bgnn(pretrained: bool = False, **kwargs: Any) -> BatchGraphNet:
    """Batch-graph head on any timm backbone (``backbone=NAME``, default mobilenetv3_small_100)."""
    return _create("bgnn", pretrained=pretrained, **kwargs)


@register_model
def bgnn_mobilenetv3_small_100(pretrained: bool = False, **kwargs: Any) -> BatchGraphNet:
    """The seed configuration: mobilenetv3_small_100, its pooled 576-channel map, ratio (1,)."""
    size = SIZES["mobilenetv3_small_100"]
    if kwargs.get("backbone", size.backbone) != size.backbone:
        raise ValueError("bgnn_mobilenetv3_small_100 has the mobilenetv3_small_100 backbone; use bgnn for others")
    return _create("bgnn_mobilenetv3_small_100", pretrained=pretrained, **{**asdict(size), **kwargs})
