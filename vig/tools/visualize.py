"""Draw the graph a ViG / SViG model builds on an image: the neighbours of one patch per block.

``vig-visualize --model vig_ti_224_gelu --image cat.png --out graph.png`` runs the model
once in eval mode on the image (through the model's own preprocessing), records the graph that
each chosen block builds, and draws the neighbours of one centre patch on the image. With
``--start-thresh T --dec D`` the model uses the similarity-threshold graph (SViG); ``--graph both``
draws the kNN graph and the threshold graph of the same weights side by side (one row each).
Threshold graphs also get a histogram of the node degrees of each block.

MobileViG (``mobilevig_*``) and GreedyViG (``greedyvig_*``) blocks build axial graphs: MobileViG's SVGA
links a node to every K-th node of its row and column (fixed); GreedyViG's DAGA keeps those axial
candidates whose L1 distance to the node is below the image's mean - std (`gcn_lib.daga_threshold`), and
its picture also marks the candidates it dropped and has the degree histograms.

Graphs are recorded by forward pre-hooks on the blocks' dynamic graph convolutions, which call the
convolution's own ``build_graph`` on the features it receives, or on the SVGA / DAGA aggregations,
whose graphs `gcn_lib.svga_mask` / `gcn_lib.daga_edges` give for the map they receive; the model's
forward is not copied.
"""
from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import timm
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_data_config
from torch import nn

from gcn_lib import (DAGA, SVGA, DynConv2d, daga_edges, daga_threshold, edge_index_to_mask, reduced_keys,
                     svga_mask)
from vig.checkpoint import ModelSettings, extract_state_dict, load_state_dict_into, read_checkpoint, recorded_settings
from vig.console import OneLineErrorParser, fail
from vig.graph_info import describe_conv
from vig.models.factory import create_model
from vig.trainer.cli import merge_flag_settings

PROG = "vig-visualize"
GRAPH_CHOICES: tuple[str, ...] = ("knn", "threshold", "both")
GRAPH_TITLES: dict[str, str] = {"knn": "kNN graph (ViG)", "threshold": "threshold graph (SViG)",
                                 "svga": "SVGA axial graph (MobileViG)", "daga": "DAGA axial graph (GreedyViG)"}
AXIAL_KINDS = ("svga", "daga")
HISTOGRAM_KINDS = ("threshold", "daga")  # graphs whose degrees vary from node to node
# Layout in pixels: one column per block, one image row per graph kind, a histogram row under
# each threshold or DAGA row; a band on the left names the rows and a header holds the title and legend.
PANEL_PX = 300  # column width and image-row height
IMAGE_PX = 240  # side of the square image inside its panel (the rest holds its title)
HISTOGRAM_PX = 190  # height of a degree-histogram row
HISTOGRAM_AXES_PX = (120, 55)  # histogram axes height and the room below it for the labels
LEFT_PX = 40
HEADER_PX = 80
DPI = 100
PALETTE_COLOURS = 256
CENTRE_COLOUR = "red"
NEIGHBOUR_COLOUR = "deepskyblue"
DROPPED_COLOUR = "orange"


@dataclass(frozen=True)
class BlockGraph:
    """The graph one block built for one image.

    neighbours: bool (N, M); ``neighbours[i, j]`` is True when key j is a neighbour of node i.
    grid: (h, w) of the feature map, N = h * w. key_grid: (h', w') of the keys, M = h' * w': the map
    itself (M = N), or the map average-pooled by r (pyramid ViG stages 0 and 1, each key an r x r block
    of patches). label: how the graph was built (k, dilation or t). candidates: for DAGA, bool (N, N), the
    axial candidates the distance rule chose from (``neighbours`` is a subset); None for other graphs.
    """

    block: int
    kind: str
    neighbours: torch.Tensor
    grid: tuple[int, int]
    label: str
    key_grid: tuple[int, int] | None = None  # None: the keys are the nodes (key_grid = grid)
    candidates: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.key_grid is None:
            object.__setattr__(self, "key_grid", self.grid)

    @property
    def degrees(self) -> torch.Tensor:
        """Neighbour count of every node (self loop included when keys are the nodes, except in the axial
        graphs, which have none), shape (N,)."""
        return self.neighbours.sum(dim=1)


def graph_convs(model: nn.Module) -> list[DynConv2d]:
    """The dynamic graph convolution of each graph block of ``model.backbone``, in block order (entries
    without one, such as the pyramid's Downsamples, are not blocks)."""
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        raise ValueError(f"{type(model).__name__} has no backbone of graph blocks")
    convs = []
    for index, block in enumerate(backbone):
        found = [m for m in block.modules() if isinstance(m, DynConv2d)]
        if len(found) > 1:
            raise ValueError(f"backbone entry {index} holds {len(found)} dynamic graph convolutions, expected 1")
        convs.extend(found)
    return convs


def axial_graphs(model: nn.Module) -> list[SVGA | DAGA]:
    """The SVGA / DAGA aggregation of each graph block of a MobileViG / GreedyViG model, in block order
    (empty for other models)."""
    return [module for module in model.modules() if isinstance(module, (SVGA, DAGA))]


def graph_modules(model: nn.Module) -> list[nn.Module]:
    """The module that builds each graph block's graph, in block order: `axial_graphs` where the model
    has them, else `graph_convs`."""
    return axial_graphs(model) or graph_convs(model)


def axial_block_graph(block: int, op: SVGA | DAGA, x: torch.Tensor) -> BlockGraph:
    """The graph ``op`` builds on the map x (1, C, H, W) it receives, without self loops.

    SVGA: `gcn_lib.svga_mask` (H W, H W). DAGA: the mask of `gcn_lib.daga_edges` less its diagonal
    (offset 0, which adds nothing to the aggregation), with the axial candidates (`svga_mask` at DAGA's
    K: the same offsets but 0) in ``candidates``.
    """
    height, width = x.shape[-2:]
    axial = svga_mask(height, width, op.k)
    if isinstance(op, SVGA):
        return BlockGraph(block, "svga", axial, (height, width), f"SVGA, K = {op.k}")
    threshold = float(daga_threshold(x[:1]).item())
    kept = edge_index_to_mask(daga_edges(x[:1], op.k), 1, height * width)[0] & axial
    return BlockGraph(block, "daga", kept, (height, width), f"DAGA, K = {op.k}, t = {threshold:.3g}",
                      candidates=axial)


def default_blocks(num_blocks: int) -> list[int]:
    """First, middle and last block (e.g. 0, 5, 11 of 12)."""
    return sorted({0, (num_blocks - 1) // 2, num_blocks - 1})


def _as_neighbour_mask(graph: torch.Tensor, num_keys: int) -> torch.Tensor:
    """(N, M) bool mask from kNN indices (N, k) into M keys or a threshold mask (N, M)."""
    if graph.dtype == torch.bool:
        return graph
    mask = torch.zeros(graph.shape[0], num_keys, dtype=torch.bool)
    mask.scatter_(1, graph.long(), True)
    return mask


@torch.no_grad()
def capture_graphs(model: nn.Module, image: torch.Tensor, blocks: Sequence[int]) -> list[BlockGraph]:
    """Run ``model`` once in eval mode on ``image`` (1, 3, H, W) and return the graphs of ``blocks``
    (numbered as `graph_modules` lists them)."""
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must have shape (1, 3, H, W), got {tuple(image.shape)}")
    convs = graph_modules(model)
    bad = [b for b in blocks if not 0 <= b < len(convs)]
    if bad:
        raise ValueError(f"block(s) {bad} out of range: the model has blocks 0..{len(convs) - 1}")
    captured: dict[int, BlockGraph] = {}

    def recorder(block: int) -> Callable[[DynConv2d, tuple[Any, ...], dict[str, Any]], None]:
        def hook(conv: DynConv2d, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0]
            relative_pos = args[1] if len(args) > 1 else kwargs.get("relative_pos")
            keys = reduced_keys(x, conv.r)  # None when the keys are the nodes themselves (r = 1)
            key_grid = tuple((keys if keys is not None else x).shape[-2:])
            graph = conv.build_graph(x, keys, relative_pos)[0].cpu()
            label = describe_conv(conv) + (f", r = {conv.r}" if conv.r > 1 else "")  # keys pooled by r
            captured[block] = BlockGraph(block, conv.graph, _as_neighbour_mask(graph, key_grid[0] * key_grid[1]),
                                         tuple(x.shape[-2:]), label, key_grid)
        return hook

    def axial_recorder(block: int) -> Callable[[SVGA | DAGA, tuple[torch.Tensor]], None]:
        def hook(op: SVGA | DAGA, args: tuple[torch.Tensor]) -> None:
            captured[block] = axial_block_graph(block, op, args[0].cpu())
        return hook

    handles = [convs[b].register_forward_pre_hook(axial_recorder(b)) if isinstance(convs[b], (SVGA, DAGA))
               else convs[b].register_forward_pre_hook(recorder(b), with_kwargs=True) for b in blocks]

    was_training = model.training
    try:
        model.eval()
        model(image)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [captured[b] for b in blocks]


def preprocess(model: nn.Module, image_path: Path, img_size: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """The model's eval transform (at ``img_size`` when given) applied to the image file.

    Returns the model input (1, 3, S, S) and the same pixels as the model sees them, un-normalised
    for display: float array (S, S, 3) in [0, 1].
    """
    image_path = Path(image_path)
    if not image_path.is_file():
        raise ValueError(f"image not found: {image_path}")
    try:
        with Image.open(image_path) as file:
            picture = file.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read image {image_path}: {error}") from None
    config = resolve_data_config({} if img_size is None else {"img_size": img_size}, model=model)
    tensor = create_transform(**config)(picture)
    mean = torch.tensor(config["mean"]).view(3, 1, 1)
    std = torch.tensor(config["std"]).view(3, 1, 1)
    shown = (tensor * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return tensor.unsqueeze(0), shown


def parse_node(text: str) -> tuple[int, int]:
    """'Y,X' -> (Y, X), the row and column of a patch on the feature grid."""
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise ValueError(f"node must be 'Y,X' (two integers), got {text!r}")
    return int(parts[0]), int(parts[1])


def parse_blocks(text: str) -> list[int]:
    """'0,5,11' -> [0, 5, 11] (order kept, repeats dropped)."""
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"blocks must be comma-separated block numbers like 0,5,11, got {text!r}")
    return list(dict.fromkeys(int(p) for p in parts))


def graph_figure_size_px(num_blocks: int, kinds: Sequence[str]) -> tuple[int, int]:
    """(width, height) in pixels of the picture for ``num_blocks`` blocks and graph kinds."""
    histogram_rows = sum(kind in HISTOGRAM_KINDS for kind in kinds)
    return LEFT_PX + PANEL_PX * num_blocks, HEADER_PX + PANEL_PX * len(kinds) + HISTOGRAM_PX * histogram_rows


def _draw_neighbours(ax: Any, shown: np.ndarray, graph: BlockGraph, node: tuple[int, int], title: str) -> None:
    size_y, size_x = shown.shape[:2]
    h, w = graph.grid
    key_h, key_w = graph.key_grid
    cell_y, cell_x = size_y / h, size_x / w
    key_cell_y, key_cell_x = size_y / key_h, size_x / key_w  # an r x r block of patches for pooled keys
    ax.imshow(shown, extent=(0, size_x, size_y, 0), interpolation="nearest")
    for row in range(1, h):
        ax.axhline(row * cell_y, color="white", linewidth=0.3, alpha=0.5)
    for col in range(1, w):
        ax.axvline(col * cell_x, color="white", linewidth=0.3, alpha=0.5)
    centre = node[0] * w + node[1]
    keys_are_nodes = graph.key_grid == graph.grid
    for j in torch.nonzero(graph.neighbours[centre]).flatten().tolist():
        if keys_are_nodes and j == centre:
            continue
        y, x = divmod(j, key_w)
        ax.add_patch(Rectangle((x * key_cell_x, y * key_cell_y), key_cell_x, key_cell_y, facecolor=NEIGHBOUR_COLOUR,
                               alpha=0.45, edgecolor=NEIGHBOUR_COLOUR, linewidth=1.0))
    if graph.candidates is not None:
        dropped = graph.candidates[centre] & ~graph.neighbours[centre]
        for j in torch.nonzero(dropped).flatten().tolist():
            y, x = divmod(j, key_w)
            ax.add_patch(Rectangle((x * key_cell_x + 1, y * key_cell_y + 1), key_cell_x - 2, key_cell_y - 2,
                                   fill=False, edgecolor=DROPPED_COLOUR, linewidth=1.5, linestyle="--"))
    ax.add_patch(Rectangle((node[1] * cell_x, node[0] * cell_y), cell_x, cell_y, fill=False,
                           edgecolor=CENTRE_COLOUR, linewidth=2.5))
    ax.set_xlim(0, size_x)
    ax.set_ylim(size_y, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize="medium")


def _draw_degrees(ax: Any, graph: BlockGraph, node: tuple[int, int]) -> None:
    degrees = graph.degrees.numpy()
    if graph.candidates is None:
        num_keys, of = graph.neighbours.shape[1], f"of {graph.neighbours.shape[1]} keys"
    else:  # an axial graph: at most the candidates of a node
        num_keys = max(int(graph.candidates.sum(dim=1).max()), 1)
        of = f"of {num_keys} axial candidates"
    ax.hist(degrees, bins=np.linspace(0, num_keys, min(num_keys, 28) + 1), color="0.55")
    node_degree = int(degrees[node[0] * graph.grid[1] + node[1]])
    ax.axvline(node_degree, color=CENTRE_COLOUR, linewidth=2)
    ax.set_xlim(0, num_keys)
    ax.set_xlabel(f"degree ({of}); mean {degrees.mean():.1f}", fontsize="small")
    ax.set_ylabel("nodes", fontsize="small")
    ax.tick_params(labelsize="small")


def draw_graphs(graphs: dict[str, list[BlockGraph]], shown: np.ndarray, node: tuple[int, int] | None,
                title: str) -> Figure:
    """Picture of the graphs: one row of image panels per graph kind, one column per block.

    graphs: kind ('knn', 'threshold', 'svga' or 'daga') -> the captured blocks (same blocks for every kind).
    shown: the model's view of the image (S, S, 3) in [0, 1]. node: (Y, X) on the feature grid of
    every drawn block; None picks the middle patch of each block's grid (the pyramid's stages differ).
    Threshold and DAGA rows are followed by a row of degree histograms; DAGA panels also outline the
    axial candidates the distance rule dropped.
    """
    kinds = list(graphs)
    blocks = [g.block for g in graphs[kinds[0]]]
    for graph in graphs[kinds[0]]:
        h, w = graph.grid
        if node is not None and not (0 <= node[0] < h and 0 <= node[1] < w):
            raise ValueError(f"node {node[0]},{node[1]} is off the {h}x{w} patch grid of block {graph.block} "
                             f"(Y in 0..{h - 1}, X in 0..{w - 1})")
    width, height = graph_figure_size_px(len(blocks), kinds)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)

    def axes_at(left: float, top: float, box_width: float, box_height: float) -> Any:
        """Axes placed by pixels measured from the figure's top-left corner."""
        return fig.add_axes((left / width, 1 - (top + box_height) / height, box_width / width, box_height / height))

    top = HEADER_PX
    for kind in kinds:
        for col, graph in enumerate(graphs[kind]):
            left = LEFT_PX + col * PANEL_PX
            centre = node if node is not None else (graph.grid[0] // 2, graph.grid[1] // 2)
            centre_index = centre[0] * graph.grid[1] + centre[1]
            centre_degree = int(graph.degrees[centre_index])
            if graph.candidates is not None:
                counted = f"of {int(graph.candidates[centre_index].sum())} axial candidates"
            elif kind == "svga":
                counted = "every node alike"
            elif graph.key_grid == graph.grid:
                counted = "self included"
            else:
                counted = f"of {graph.neighbours.shape[1]} keys"
            panel_title = f"block {graph.block}: {graph.label}\ncentre degree {centre_degree} ({counted})"
            image_ax = axes_at(left + (PANEL_PX - IMAGE_PX) / 2, top + PANEL_PX - IMAGE_PX - 12, IMAGE_PX, IMAGE_PX)
            _draw_neighbours(image_ax, shown, graph, centre, panel_title)
            if kind in HISTOGRAM_KINDS:
                axes_height, below = HISTOGRAM_AXES_PX
                histogram_top = top + PANEL_PX + HISTOGRAM_PX - axes_height - below
                _draw_degrees(axes_at(left + 55, histogram_top, PANEL_PX - 75, axes_height), graph, centre)
        row_height = PANEL_PX + (HISTOGRAM_PX if kind in HISTOGRAM_KINDS else 0)
        fig.text(6 / width, 1 - (top + PANEL_PX / 2) / height, GRAPH_TITLES[kind], rotation=90,
                 va="center", ha="left", fontsize="large")
        top += row_height
    centre_label = f"centre patch ({node[0]},{node[1]})" if node is not None else "centre patch (middle of each grid)"
    handles = [Patch(facecolor="none", edgecolor=CENTRE_COLOUR, linewidth=2.5, label=centre_label),
               Patch(facecolor=NEIGHBOUR_COLOUR, alpha=0.6, label="its neighbours")]
    if "daga" in kinds:
        handles.append(Patch(facecolor="none", edgecolor=DROPPED_COLOUR, linewidth=1.5, linestyle="--",
                             label="candidates dropped (distance >= t)"))
    if any(kind in HISTOGRAM_KINDS for kind in kinds):
        handles.append(Line2D([], [], color=CENTRE_COLOUR, linewidth=2, label="centre's degree (histogram)"))
    fig.suptitle(title, y=1 - 12 / height, fontsize="medium")
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - 36 / height), ncol=len(handles),
               frameon=False, fontsize="medium")
    return fig


def resolve_settings(given: ModelSettings,
                     checkpoint: Path | None) -> tuple[ModelSettings, dict[str, torch.Tensor] | None]:
    """The settings to build the model with, and the checkpoint's weights (None without a checkpoint).

    Settings the flags leave open come from the checkpoint's recorded training flags (model, image
    size, class count, thresholds, model kwargs; `vig.trainer.cli.merge_flag_settings`), so a checkpoint
    of any class count or input size loads without repeating its training flags.
    """
    if checkpoint is None:
        if given.model is None:
            raise ValueError("--model is needed without --checkpoint")
        return given, None
    state = read_checkpoint(checkpoint)
    weights, _ = extract_state_dict(state, source=str(checkpoint))
    merged = merge_flag_settings(given, recorded_settings(state, weights, model_name=given.model), str(checkpoint))
    if merged.model is None:
        raise ValueError(f"{checkpoint} does not name its model; give --model")
    return merged, weights


def build_model(settings: ModelSettings, weights: dict[str, torch.Tensor] | None = None,
                source: str = "checkpoint", pretrained: bool = False) -> nn.Module:
    """A registered vig model built with ``settings`` (fields left None take the model's defaults), with
    ``weights`` (from ``source``) loaded strictly when given, else with ``pretrained`` its published weights
    (timm's pretrained loading; a ``name.tag`` picks them), in eval mode."""
    name = settings.model
    if name is None or not timm.is_model(name):
        known = ", ".join(timm.list_models("*vig_*"))
        raise ValueError(f"unknown model {name!r}" + (f" (registered: {known})" if known else ""))
    model = create_model(settings, pretrained=True) if pretrained and weights is None else create_model(settings)
    if weights is not None:
        load_state_dict_into(model, weights, source, "weights")
    return model.eval()


def _graph_kind(model: nn.Module) -> str:
    """'knn', 'threshold', 'svga' or 'daga': the graph rule of the model's blocks."""
    axial = axial_graphs(model)
    if axial:
        return "svga" if isinstance(axial[0], SVGA) else "daga"
    kinds = {conv.graph for conv in graph_convs(model)}
    if len(kinds) != 1:
        raise ValueError(f"the model mixes graph rules {sorted(kinds)} across blocks")
    return kinds.pop()


def visualize(model_name: str | None, image_path: Path, out_png: Path, graph: str | None = None,
              start_thresh: float | None = None, dec: float | None = None, checkpoint: Path | None = None,
              node: tuple[int, int] | None = None, blocks: Sequence[int] | None = None,
              img_size: int | None = None, num_classes: int | None = None, pretrained: bool = False) -> Path:
    """Write the graph picture to ``out_png`` (see the module docstring); returns ``out_png``.

    graph: None draws the model's own graph (threshold with ``start_thresh``, or for a model that
    defaults to it; SVGA / DAGA for MobileViG / GreedyViG, which take no other); 'knn' the model built
    without threshold arguments; 'threshold' the model built with them; 'both' the two side by side
    (same weights). img_size: the input size the model (and
    its checkpoint) was made for; num_classes: its classifier outputs. Every setting left None (the
    model name too) comes from the checkpoint's recorded training flags when it has them (see
    `resolve_settings`), else from the model's defaults.
    """
    out_png = Path(out_png)
    if out_png.suffix.lower() != ".png":
        raise ValueError(f"output must be a .png file, got {out_png}")
    if not out_png.parent.is_dir():
        raise ValueError(f"output folder does not exist: {out_png.parent}")
    if graph is not None and graph not in GRAPH_CHOICES:
        raise ValueError(f"graph must be one of {', '.join(GRAPH_CHOICES)}, got {graph!r}")
    if graph == "knn" and (start_thresh is not None or dec is not None):
        raise ValueError("--start-thresh / --dec select the threshold graph; they cannot go with --graph knn")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ValueError(f"checkpoint not found: {checkpoint}")
    if not Path(image_path).is_file():
        raise ValueError(f"image not found: {image_path}")
    if img_size is not None and img_size < 1:
        raise ValueError(f"img_size must be positive, got {img_size}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    settings, weights = resolve_settings(ModelSettings(model=model_name, img_size=img_size, num_classes=num_classes,
                                                       start_thresh=start_thresh, dec=dec), checkpoint)
    if pretrained and checkpoint is not None:
        raise ValueError("--pretrained and --checkpoint both give weights; give one")
    model_name = settings.model
    # (graph rule expected or None for the model's own, threshold arguments) of each model to build
    own = (settings.start_thresh, settings.dec)
    plans = {None: [(None, *own)], "knn": [("knn", None, None)], "threshold": [("threshold", *own)],
             "both": [("knn", None, None), ("threshold", *own)]}[graph]
    graphs: dict[str, list[BlockGraph]] = {}
    shown = None
    for expected, thresh, decrement in plans:
        plan = ModelSettings(model=model_name, img_size=settings.img_size, num_classes=settings.num_classes,
                             start_thresh=thresh, dec=decrement, model_kwargs=settings.model_kwargs)
        try:
            model = build_model(plan, weights, str(checkpoint), pretrained=pretrained)
        except TypeError as error:  # a setting the model does not take, e.g. --start-thresh for mobilevig_*
            raise ValueError(f"cannot build {model_name}: {error}") from None
        kind = _graph_kind(model)
        if kind in AXIAL_KINDS and expected is not None:
            raise ValueError(f"{model_name} builds its own {kind.upper()} axial graph; --graph is for ViG / SViG models")
        if expected == "threshold" and kind != "threshold":
            raise ValueError(f"{model_name} builds the kNN graph without --start-thresh; give --start-thresh (and --dec)")
        if expected == "knn" and kind != "knn":
            raise ValueError(f"{model_name} always builds the threshold graph; for the kNN graph use its vig_* counterpart")
        image, shown = preprocess(model, image_path, settings.img_size)
        chosen = list(blocks) if blocks else default_blocks(len(graph_modules(model)))
        graphs[kind] = capture_graphs(model, image, chosen)
    weights = (f"checkpoint {Path(checkpoint).name}" if checkpoint else
               f"pretrained {model.pretrained_cfg.get('tag') or ''}".strip() if pretrained else "random weights")
    title = f"{model_name} ({weights}) on {Path(image_path).name}"
    save_palette_png(draw_graphs(graphs, shown, node, title), out_png)
    return out_png


def save_palette_png(fig: Figure, out_png: Path) -> None:
    """Save as a 256-colour PNG: a third of the size of the full-colour file, no visible difference."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    buffer.seek(0)
    with Image.open(buffer) as rendered:
        rendered.convert("RGB").quantize(PALETTE_COLOURS, method=Image.Quantize.MEDIANCUT).save(out_png, optimize=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="registered model name, e.g. vig_ti_224_gelu (default: the checkpoint's)")
    parser.add_argument("--start-thresh", type=float, default=None, help="threshold graph (SViG): t of block 0")
    parser.add_argument("--dec", type=float, default=None, help="threshold graph: t decreases by this per block")
    parser.add_argument("--graph", choices=GRAPH_CHOICES, default=None,
                        help="graph(s) to draw; default: the model's own (threshold iff --start-thresh); "
                             "'both' draws kNN and threshold side by side")
    parser.add_argument("--checkpoint", type=Path, default=None, help="weights to load (default: random weights)")
    parser.add_argument("--pretrained", action="store_true",
                        help="the model's published weights (timm's pretrained loading; MODEL.TAG picks a tag)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input size (default: the checkpoint's training --img-size, else the model's)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classifier outputs (default: the checkpoint's, else the model's)")
    parser.add_argument("--image", type=Path, required=True, help="image file")
    parser.add_argument("--node", default=None, metavar="Y,X", help="centre patch on the feature grid (default: middle)")
    parser.add_argument("--blocks", default=None, metavar="I,J,...", help="blocks to draw (default: first, middle, last)")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    try:
        args = parser.parse_args(argv)
        node = None if args.node is None else parse_node(args.node)
        blocks = None if args.blocks is None else parse_blocks(args.blocks)
        visualize(args.model, args.image, args.out, args.graph, args.start_thresh, args.dec, args.checkpoint,
                  node, blocks, args.img_size, args.num_classes, args.pretrained)
    except (ValueError, OSError, RuntimeError) as error:  # UsageError is a ValueError
        return fail(PROG, error)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
