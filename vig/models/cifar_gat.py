"""CIFAR-10 CNN + graph-attention model, registered with timm as ``cnn_gat_cifar``.

Papers of its graph layers: "Graph Attention Networks", Petar Velickovic, Guillem Cucurull, Arantxa Casanova,
Adriana Romero, Pietro Lio and Yoshua Bengio, ICLR 2018, arXiv:1710.10903 (``gat``); "How Attentive are Graph
Attention Networks?", Shaked Brody, Uri Alon and Eran Yahav, ICLR 2022, arXiv:2105.14491 (``gatv2``); GCN (Kipf and
Welling, arXiv:1609.02907) and GraphSAGE (Hamilton, Ying and Leskovec, arXiv:1706.02216) as the other layer types.
The model itself is the published CIFAR-10 script's, described with its recipes in docs/CIFAR.md. `SIZES` is the
only size table.

A small CNN turns a (B, 3, 32, 32) image into a (B, D, 16, 16) map (D = ``embed_dim``):
3x3 convs 3 -> 32 -> 64 -> D (the third at stride 2), each with BatchNorm and ReLU, then a 3x3
conv D -> D with BatchNorm and no activation. Every map position becomes a node of its image's
graph, with its D features and, when ``use_xy``, its (y, x) position scaled to [0, 1]
(node features (B * H * W, D + 2)). Edges (built once per forward, shared by all graph layers):

- the directed 4-neighbour grid of the map (`gcn_lib.grid_edges`, built once per map size, batch size and
  device and then reused: `map_grid_edges`);
- when ``knn > 0``, each node's ``knn`` nearest other nodes of the same image by cosine distance
  of the CNN features (`gcn_lib.sparse_knn`, no gradient);
- in training only, DropEdge with probability ``edge_drop`` (`gcn_lib.drop_edge`).

No self loops are added (``add_self_loops=False`` for GAT, GATv2 and GCN; SAGE keeps its own
root weight). The graph part is: a first graph layer with ``heads`` heads of width ``hidden``,
concatenated, + ReLU; a projection block (graph layer to ``hidden``, BatchNorm, ReLU, dropout);
``num_blocks - 1`` residual blocks (graph layer, BatchNorm, ReLU, dropout, residual add); a global
mean over each image's nodes; an MLP head hidden -> 128 -> ReLU -> dropout -> classes.

Choices where the design text is silent:

- The kNN graph compares the CNN features only, not the (y, x) coordinates. Grid and kNN edges
  are merged as a set: an edge that is both a grid and a kNN edge is kept once.
- GCN and SAGE have no attention heads; their first layer is one layer of width
  ``heads * hidden``, the concatenated width of the attention variants, so all four types share
  every other shape. ``attn_drop`` and ``negative_slope`` only act on GAT / GATv2.
- Attention dropout is applied in the first (multi-head) layer only; the later layers have one
  head and no attention dropout. ``drop`` is the dropout of the projection and residual blocks and
  of the MLP head. timm's ``drop_rate`` (the ``--drop`` flag) is accepted as another name for it.
- CNN convs have no bias (BatchNorm follows) and Kaiming-normal (fan_out, ReLU) initial weights;
  the graph and linear layers keep their library initialisation.
- The graph size follows the CNN map, so other input sizes give (H / 2) x (W / 2) grids.

Unlike the published script, the CNN is an ordinary part of the model: ``eval()`` reaches its
BatchNorm layers, the state dict (checkpoints) holds it and an EMA copy averages it.

`predict_flip_tta` (defined in `vig.tta`, shared with the trainer's ``--tta``) gives the flip
test-time augmentation: the mean of the *logits* of an image batch and of its horizontal mirror.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any, Sequence

import torch
from torch import nn

from timm.layers import register_notrace_function, register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from gcn_lib import drop_edge, grid_edges, sparse_knn, to_pyg
from vig.checkpoint import checkpoint_filter_fn
from vig.models.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR_IMG_SIZE
from vig.models.factory_args import build_like, takes_device_and_dtype
from vig.models.features import check_feature_request
from vig.models.vig_blocks import MEAN_POOLS, check_pool
from vig.tta import predict_flip_tta

__all__ = ["SIZES", "CnnGatCifar", "CnnGatSize", "GRAPH_LAYERS", "cnn_gat_cifar", "map_grid_edges",
           "predict_flip_tta"]

GRAPH_LAYERS = ("gat", "gatv2", "gcn", "sage")
HEAD_WIDTH = 128
DEFAULT_BLOCKS = 3


@dataclass(frozen=True)
class CnnGatSize:
    """Graph layer type, CNN output channels D, graph width, attention heads of the first layer, graph blocks."""

    conv: str
    embed_dim: int
    hidden: int
    heads: int
    num_blocks: int


SIZES: dict[str, CnnGatSize] = {
    "gat": CnnGatSize(conv="gat", embed_dim=128, hidden=256, heads=8, num_blocks=DEFAULT_BLOCKS),
}


def _pyg(submodule: str) -> ModuleType:
    """``torch_geometric.<submodule>``, imported on first use: ``import vig`` stays fast, and
    torch_geometric's import-time FutureWarning about ``torch.jit.script`` stays off the CLIs' stderr."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        return importlib.import_module(f"torch_geometric.{submodule}")


def _graph_layer(conv: str, in_channels: int, out_channels: int, heads: int = 1, attn_drop: float = 0.0,
                 negative_slope: float = 0.2) -> nn.Module:
    """One torch_geometric layer without added self loops: (M, in) nodes -> (M, heads * out); a leaf of timm's
    fx tracing (its forward branches on its inputs)."""
    pyg_nn = _pyg("nn")
    if conv == "gat":
        layer = pyg_nn.GATConv(in_channels, out_channels, heads=heads, concat=True,
                               negative_slope=negative_slope, dropout=attn_drop, add_self_loops=False)
    elif conv == "gatv2":
        layer = pyg_nn.GATv2Conv(in_channels, out_channels, heads=heads, concat=True,
                                 negative_slope=negative_slope, dropout=attn_drop, add_self_loops=False)
    elif conv == "gcn":
        layer = pyg_nn.GCNConv(in_channels, out_channels * heads, add_self_loops=False)
    elif conv == "sage":
        layer = pyg_nn.SAGEConv(in_channels, out_channels * heads)
    else:
        raise ValueError(f"conv must be one of {', '.join(GRAPH_LAYERS)}; got {conv!r}")
    register_notrace_module(type(layer))
    return layer


@functools.lru_cache(maxsize=16)
def _cached_grid_edges(height: int, width: int, batch_size: int, device: torch.device) -> torch.Tensor:
    # a normal tensor even when first asked for under inference_mode, so that autograd may save it later
    with torch.inference_mode(False):
        return grid_edges(height, width, neighbours=4, batch_size=batch_size, device=device)


@register_notrace_function  # a leaf of fx tracing: the edge list follows the map's size
def map_grid_edges(feature_map: torch.Tensor) -> torch.Tensor:
    """Directed 4-neighbour grid (2, E) over the B * H * W nodes of a map (B, D, H, W), (centre, neighbour)
    rows on the map's device (`gcn_lib.grid_edges`).

    Built and copied to the device once per (H, W, B, device), then the same tensor is returned (callers must
    not modify it in place); maps on the meta device get a fresh one.
    """
    b, _, h, w = feature_map.shape
    if feature_map.is_meta:
        return grid_edges(h, w, neighbours=4, batch_size=b, device=feature_map.device)
    return _cached_grid_edges(h, w, b, feature_map.device)


@register_notrace_function  # a leaf of fx tracing: the scale follows the map's size
def map_positions(feature_map: torch.Tensor) -> torch.Tensor:
    """(y, x) of every node of a map (B, D, H, W), scaled to [0, 1]: (B * H * W, 2) in the map's dtype."""
    b, _, h, w = feature_map.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=feature_map.device, dtype=feature_map.dtype),
                            torch.arange(w, device=feature_map.device, dtype=feature_map.dtype), indexing="ij")
    yx = torch.stack((ys / max(h - 1, 1), xs / max(w - 1, 1)), dim=-1).reshape(h * w, 2)
    return yx.repeat(b, 1)


def _conv_bn(in_channels: int, out_channels: int, stride: int, relu: bool) -> nn.Sequential:
    """3x3 conv (padding 1, no bias) + BatchNorm2d (+ ReLU): (B, in, H, W) -> (B, out, H / stride, W / stride)."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                               nn.BatchNorm2d(out_channels)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class GraphBlock(nn.Module):
    """Graph layer, BatchNorm1d, ReLU, dropout, plus the input when ``residual``: (M, C_in) -> (M, C_out)."""

    def __init__(self, layer: nn.Module, channels: int, drop: float, residual: bool) -> None:
        super().__init__()
        self.conv = layer
        self.norm = nn.BatchNorm1d(channels)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop)
        self.residual = residual

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        out = self.drop(self.act(self.norm(self.conv(x, edge_index))))
        return x + out if self.residual else out


def _check_range(name: str, value: float, low: float, high: float | None = None) -> None:
    """ValueError unless low <= value (< high when given)."""
    if value < low or (high is not None and value >= high):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")


class CnnGatCifar(nn.Module):
    """CNN front end + graph layers over its 16x16 map: images (B, C_in, 32, 32) -> logits (B, num_classes).

    Args:
        num_classes: output classes; 0 gives the pre-logits (B, 128) of the MLP head from `forward`.
        in_chans: image channels.
        conv: graph layer type, one of ``gat``, ``gatv2``, ``gcn``, ``sage``.
        embed_dim: CNN output channels D (node features before the (y, x) columns).
        hidden: width of the projection and residual blocks; per-head width of the first layer.
        heads: attention heads of the first layer (concatenated).
        num_blocks: 1 projection block + ``num_blocks - 1`` residual blocks.
        knn: feature-space kNN edges per node added to the grid (0: grid only).
        edge_drop: DropEdge probability in training.
        drop: dropout of the graph blocks and the MLP head.
        attn_drop: dropout of the attention coefficients of the first GAT / GATv2 layer.
        negative_slope: LeakyReLU slope inside GAT / GATv2 attention.
        use_xy: append each node's (y, x) in [0, 1] to its features.
        drop_rate: timm's name for ``drop``; overrides it when given.
        global_pool: ``'avg'`` (mean over the nodes of each image, as published) or ``''`` (none: the MLP head
            acts on every node and `forward` returns maps (B, num_classes or 128, 16, 16)).
        device, dtype: where and in what floating-point type the parameters are created (timm's factory
            arguments).
    """

    @takes_device_and_dtype
    def __init__(self, num_classes: int = 10, in_chans: int = 3, conv: str = "gat", embed_dim: int = 128,
                 hidden: int = 256, heads: int = 8, num_blocks: int = DEFAULT_BLOCKS, knn: int = 0,
                 edge_drop: float = 0.0,
                 drop: float = 0.0, attn_drop: float = 0.0, negative_slope: float = 0.2, use_xy: bool = True,
                 drop_rate: float | None = None, global_pool: str = "avg") -> None:
        super().__init__()
        if conv not in GRAPH_LAYERS:
            raise ValueError(f"conv must be one of {', '.join(GRAPH_LAYERS)}; got {conv!r}")
        for name, value in (("in_chans", in_chans), ("embed_dim", embed_dim),
                            ("hidden", hidden), ("heads", heads), ("num_blocks", num_blocks)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        _check_classes(num_classes)
        if int(knn) != knn or knn < 0:
            raise ValueError(f"knn must be a non-negative integer, got {knn}")
        if drop_rate is not None:
            drop = drop_rate
        for name, value in (("edge_drop", edge_drop), ("drop", drop), ("attn_drop", attn_drop)):
            _check_range(name, value, 0.0, 1.0)
        _check_range("negative_slope", negative_slope, 0.0)

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = check_pool(global_pool, MEAN_POOLS)
        self.conv_type = conv
        self.embed_dim = embed_dim
        self.hidden = hidden
        self.knn = knn
        self.edge_drop = edge_drop
        self.use_xy = use_xy
        self.drop_rate = drop
        self.num_features = hidden
        self.head_hidden_size = HEAD_WIDTH
        self.grad_checkpointing = False

        self.stem = nn.Sequential(
            _conv_bn(in_chans, 32, 1, relu=True),
            _conv_bn(32, 64, 1, relu=True),
            _conv_bn(64, embed_dim, 2, relu=True),
            _conv_bn(embed_dim, embed_dim, 1, relu=False),
        )
        node_dim = embed_dim + (2 if use_xy else 0)
        self.input_layer = _graph_layer(conv, node_dim, hidden, heads=heads, attn_drop=attn_drop,
                                        negative_slope=negative_slope)
        self.input_act = nn.ReLU(inplace=True)
        blocks = [GraphBlock(_graph_layer(conv, heads * hidden, hidden, negative_slope=negative_slope),
                             hidden, drop, residual=False)]
        blocks += [GraphBlock(_graph_layer(conv, hidden, hidden, negative_slope=negative_slope),
                              hidden, drop, residual=True) for _ in range(num_blocks - 1)]
        self.blocks = nn.ModuleList(blocks)
        self.head = self._make_head(num_classes)
        # stem map, then the node features after the input layer and after each block, as (B, C, H/2, W/2)
        self.feature_info = [dict(num_chs=embed_dim, reduction=2, module="stem"),
                             dict(num_chs=heads * hidden, reduction=2, module="input_layer")]
        self.feature_info += [dict(num_chs=hidden, reduction=2, module=f"blocks.{i}") for i in range(num_blocks)]
        self._init_cnn()

    def _make_head(self, num_classes: int) -> nn.Sequential:
        return nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(self.hidden, HEAD_WIDTH)),
            ("act", nn.ReLU(inplace=True)),
            ("drop", nn.Dropout(self.drop_rate)),
            ("fc2", self._classifier(num_classes)),
        ]))

    def _init_cnn(self) -> None:
        for module in self.stem.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay (timm): the CNN stem, then the input graph layer
        with the first block and each further block (``coarse`` is the same: there are no stages); the head
        falls into the last group."""
        return dict(stem=r"^stem", blocks=[(r"^input_layer", (0,)), (r"^blocks\.(\d+)", None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the CNN stem and each graph block in the backward pass instead of keeping their activations;
        outputs and gradients are unchanged (BatchNorm running statistics see each batch twice in training)."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        """The last linear layer (timm convention); Identity for num_classes=0."""
        return self.head.fc2

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the last layer of the MLP head by a fresh one with ``num_classes`` outputs (0: none, the
        model then gives the pre-logits), on the model's device and dtype and in its train mode; the head's
        hidden layer keeps its weights, as in timm. ``global_pool`` (``'avg'`` or ``''``) replaces the
        pooling, None keeps it."""
        _check_classes(num_classes)
        if global_pool is not None:
            self.global_pool = check_pool(global_pool, MEAN_POOLS)
        self.num_classes = num_classes
        self.head.fc2 = build_like(self, lambda: self._classifier(num_classes))

    def _classifier(self, num_classes: int) -> nn.Module:
        """The last layer (N, head_hidden_size) -> (N, num_classes): a linear layer, or Identity for 0."""
        return nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def _checkpointed(self, module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(module, *inputs, use_reentrant=False)
        return module(*inputs)

    def nodes(self, feature_map: torch.Tensor) -> torch.Tensor:
        """CNN map (B, D, H, W) -> node features (B * H * W, D [+ 2]), image-major, row-major positions."""
        b, d, h, w = feature_map.shape
        x = feature_map.permute(0, 2, 3, 1).reshape(b * h * w, d)
        if not self.use_xy:
            return x
        return torch.cat((x, map_positions(feature_map)), dim=1)

    def edges(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Graph of a CNN map (B, D, H, W): torch_geometric (source, target) edge list (2, E) over B * H * W nodes.

        Grid edges, plus the feature-space kNN edges when ``knn > 0`` (duplicates merged), minus
        DropEdge's random share in training. Each edge stays inside its image.
        """
        b, d, h, w = feature_map.shape
        edge_index = map_grid_edges(feature_map)
        if self.knn > 0:
            features = feature_map.permute(0, 2, 3, 1).reshape(b * h * w, d)
            batch = torch.arange(b, device=feature_map.device).repeat_interleave(h * w)
            knn_edges = sparse_knn(features, self.knn, batch=batch, loop=False, cosine=True)
            edge_index = _pyg("utils").coalesce(torch.cat((edge_index, knn_edges), dim=1), num_nodes=b * h * w)
        edge_index = drop_edge(edge_index, self.edge_drop, training=self.training)
        return to_pyg(edge_index)

    def _stages(self, x: torch.Tensor, last: int) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """Node features of stages 0..``last`` (0: stem map as nodes, 1: input layer, 2 + i: block i), each
        (B * H * W, C), and the map size (H, W); images (B, C_in, H0, W0)."""
        feature_map = self._checkpointed(self.stem, x)
        b, _, h, w = feature_map.shape
        stages = [feature_map.permute(0, 2, 3, 1).reshape(b * h * w, -1)]
        if last >= 1:
            edge_index = self.edges(feature_map)
            nodes = self.input_act(self.input_layer(self.nodes(feature_map), edge_index))
            stages.append(nodes)
            for block in self.blocks[:last - 1]:
                nodes = self._checkpointed(block, nodes, edge_index)
                stages.append(nodes)
        return stages, (h, w)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C_in, H, W) -> the last block's node features as a map (B, hidden, H/2, W/2)."""
        stages, (h, w) = self._stages(x, len(self.feature_info) - 1)
        return stages[-1].view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Node-feature map (B, hidden, h, w) -> logits (B, num_classes) of the per-image mean, or the MLP's
        hidden layer (B, 128) with ``pre_logits``; without pooling (``global_pool=''``) the MLP acts on every
        node and the result is a map (B, num_classes or 128, h, w)."""
        layers = list(self.head)[:-1] if pre_logits else list(self.head)
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
            for layer in layers:
                x = layer(x)
            return x
        x = x.permute(0, 2, 3, 1)
        for layer in layers:
            x = layer(x)
        return x.permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C_in, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Feature maps (B, C, H/2, W/2) of the stages in `feature_info` (stem, input layer, each block),
        as timm's feature API asks for them; the final output is the map (B, hidden, H/2, W/2) of `forward_features`.

        Args:
            indices: stages to return: None all, an int the last n, a sequence those (negative from the end).
            norm: must be False (no final norm).
            stop_early: skip the stages after the last requested one.
            output_fmt: ``'NCHW'`` only.
            intermediates_only: return only the list.
        """
        check_feature_request(output_fmt, norm)
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        stages, (h, w) = self._stages(x, max_index if stop_early or intermediates_only else len(self.feature_info) - 1)
        b = x.shape[0]
        intermediates = [stages[i].view(b, h, w, -1).permute(0, 3, 1, 2) for i in take_indices]
        if intermediates_only:
            return intermediates
        return stages[-1].view(b, h, w, -1).permute(0, 3, 1, 2), intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last one in ``indices`` (the graph layers that follow it; the input graph layer
        too when only the stem is kept) and, with ``prune_head``, the MLP head, so that no parameter is left
        unused; returns the kept indices. `forward_features` then ends at that stage and, without the head,
        `forward` gives its map (B, C, H/2, W/2)."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        self.blocks = self.blocks[:max(max_index - 1, 0)]
        if max_index == 0:
            self.input_layer = nn.Identity()  # never called: the stem map is the last stage
        self.feature_info = self.feature_info[:max_index + 1]
        self.num_features = self.feature_info[-1]["num_chs"]
        if prune_head:
            self.head_hidden_size = self.num_features
            self.global_pool = ""
            self.head = nn.Sequential(OrderedDict(fc2=nn.Identity()))
            self.num_classes = 0
        return take_indices


def _check_classes(num_classes: int) -> None:
    if int(num_classes) != num_classes or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative integer, got {num_classes}")


default_cfgs = generate_default_cfgs({
    "cnn_gat_cifar": {
        "num_classes": 10,
        "input_size": (3, CIFAR_IMG_SIZE, CIFAR_IMG_SIZE),
        "pool_size": (CIFAR_IMG_SIZE // 2, CIFAR_IMG_SIZE // 2),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": "stem.0.0",
        "classifier": "head.fc2",
    },
})


@register_model
def cnn_gat_cifar(pretrained: bool = False, **kwargs) -> CnnGatCifar:
    """CIFAR-10 CNN + GAT (embed 128, hidden 256, 8 heads, 3 blocks); keyword arguments as `CnnGatCifar`."""
    if pretrained and not any(key in (kwargs.get("pretrained_cfg_overlay") or {}) for key in ("file", "state_dict")):
        raise ValueError("cnn_gat_cifar: no published weights; pass pretrained_cfg_overlay=dict(file=PATH)")
    settings = {**asdict(SIZES["gat"]), **kwargs}
    stages = settings["num_blocks"] + 2  # stem, input layer, blocks (see feature_info)
    feature_cfg = dict(feature_cls="getter", out_indices=settings.pop("out_indices", stages))
    return build_model_with_cfg(CnnGatCifar, "cnn_gat_cifar", pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=feature_cfg, **settings)
