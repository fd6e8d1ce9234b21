"""Edge lists: conversions from the dense graph forms, grid graphs, sparse kNN and DropEdge.

An edge list here is a (2, E) int64 tensor of *global* node ids ``b * N + i``: row 0 holds the
centre i (the node that aggregates), row 1 the neighbour j. Together with a batch vector (B * N,)
this is the layout of PyG-style code. torch_geometric's layers with their default
``flow='source_to_target'`` read row 0 as the source, so pass ``edge_index.flip(0)`` to them
(`to_pyg`).
"""
from __future__ import annotations

import torch

from .graph import pairwise_sq_distance
from .shapes import shape_str


def knn_to_edge_index(neighbours: torch.Tensor) -> torch.Tensor:
    """Neighbour indices (B, N, k) -> edge list (2, B * N * k), centre-major order."""
    if neighbours.dim() != 3:
        raise ValueError(f"neighbours must have shape (B, N, k), got {shape_str(neighbours.shape)}")
    b, n, k = neighbours.shape
    offsets = (torch.arange(b, device=neighbours.device) * n).view(b, 1, 1)
    centres = torch.arange(n, device=neighbours.device).view(1, n, 1).expand(b, n, k)
    return torch.stack(((centres + offsets).reshape(-1), (neighbours + offsets).reshape(-1)))


def knn_to_mask(neighbours: torch.Tensor, num_keys: int | None = None) -> torch.Tensor:
    """Neighbour indices (B, N, k) -> boolean mask (B, N, M) with M = num_keys (default N)."""
    if neighbours.dim() != 3:
        raise ValueError(f"neighbours must have shape (B, N, k), got {shape_str(neighbours.shape)}")
    b, n, _ = neighbours.shape
    mask = torch.zeros(b, n, num_keys or n, dtype=torch.bool, device=neighbours.device)
    return mask.scatter_(2, neighbours, True)


def mask_to_edge_index(mask: torch.Tensor) -> torch.Tensor:
    """Boolean mask (B, N, N) -> edge list (2, E), centre-major order. Synchronises with the host."""
    if mask.dim() != 3 or mask.shape[1] != mask.shape[2] or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape (B, N, N), got {mask.dtype} {shape_str(mask.shape)}")
    n = mask.shape[1]
    hits = mask.nonzero()  # (E, 3): (b, i, j) rows; nonzero(as_tuple=True) is not scriptable
    b_idx, i_idx, j_idx = hits[:, 0], hits[:, 1], hits[:, 2]
    return torch.stack((b_idx * n + i_idx, b_idx * n + j_idx))


def edge_index_to_mask(edge_index: torch.Tensor, batch_size: int, num_nodes: int) -> torch.Tensor:
    """Edge list (2, E) of global ids over ``batch_size`` graphs of ``num_nodes`` nodes -> mask (B, N, N).

    Edges must stay within their graph; an edge between two graphs is a ValueError.
    """
    check_edge_index(edge_index, batch_size * num_nodes)
    centre, neighbour = edge_index
    graph = centre // num_nodes
    if not torch.equal(graph, neighbour // num_nodes):
        raise ValueError("edge_index connects nodes of different graphs")
    mask = torch.zeros(batch_size, num_nodes, num_nodes, dtype=torch.bool, device=edge_index.device)
    mask[graph, centre % num_nodes, neighbour % num_nodes] = True
    return mask


def check_edge_index(edge_index: torch.Tensor, num_nodes: int) -> None:
    """Validate a (2, E) integer edge list against ``num_nodes`` nodes."""
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape (2, E), got {shape_str(edge_index.shape)}")
    if edge_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"edge_index must be int64 or int32, got {edge_index.dtype}")
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        raise ValueError(f"edge_index holds ids outside [0, {num_nodes})")


def to_pyg(edge_index: torch.Tensor) -> torch.Tensor:
    """(centre, neighbour) rows -> torch_geometric's (source, target) rows: messages flow j -> i."""
    return edge_index.flip(0)


def grid_edges(height: int, width: int, neighbours: int = 4, batch_size: int = 1,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Directed grid graph of a height x width map, repeated for ``batch_size`` images.

    Node (y, x) has id ``b * H * W + y * W + x``. Each node is linked to its 4 (up, down, left,
    right) or 8 (plus diagonals) in-bounds neighbours, in both directions; no self loops.

    Returns:
        edge list (2, E) with E = batch_size * (number of directed grid edges), grouped by image.
    """
    if neighbours not in (4, 8):
        raise ValueError(f"neighbours must be 4 or 8, got {neighbours}")
    if height < 1 or width < 1 or batch_size < 1:
        raise ValueError(f"height, width and batch_size must be >= 1, got {height}, {width}, {batch_size}")
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if neighbours == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    # built on the CPU (the sizes alone decide it, so tensors without data, e.g. on the meta device, get it too),
    # by slicing rather than by a boolean mask, so that every size is static (torch.export traces it)
    ids = torch.arange(height * width, device="cpu").view(height, width)
    centres, others = [], []
    for dy, dx in steps:
        rows, cols = _overlap(dy, height), _overlap(dx, width)
        centres.append(ids[rows[0], cols[0]].reshape(-1))
        others.append(ids[rows[1], cols[1]].reshape(-1))
    single = torch.stack((torch.cat(centres), torch.cat(others)))
    offsets = (torch.arange(batch_size, device="cpu") * height * width).repeat_interleave(single.shape[1])
    return (single.repeat(1, batch_size) + offsets).to(device)


def _overlap(step: int, length: int) -> tuple[slice, slice]:
    """Slices of the centres and of their neighbours ``step`` positions away along an axis of ``length``."""
    if step < 0:
        return slice(-step, length), slice(0, length + step)
    return slice(0, length - step), slice(step, length)


def _segments(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Start offsets and sizes of the contiguous graphs of a sorted batch vector."""
    if batch.numel() and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError("batch must be sorted (nodes of one graph contiguous)")
    sizes = torch.bincount(batch)
    starts = torch.cumsum(sizes, 0) - sizes
    return starts, sizes


@torch.no_grad()
def sparse_knn(x: torch.Tensor, k: int, batch: torch.Tensor | None = None, loop: bool = False,
               cosine: bool = False) -> torch.Tensor:
    """k nearest neighbours of every node within its own graph, as an edge list.

    Args:
        x: node features (M, C).
        k: neighbours per node; a graph with fewer than k other nodes links to all of them.
        batch: (M,) graph id of each node, sorted; default: one graph.
        loop: count the node itself as a candidate.
        cosine: compare L2-normalised features (cosine distance) instead of raw ones.

    Returns:
        edge list (2, E) of (centre, neighbour) ids into x, nearest neighbours first per centre.
    """
    if x.dim() != 2:
        raise ValueError(f"x must have shape (M, C), got {shape_str(x.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if batch is None:
        batch = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    if batch.shape != (x.shape[0],):
        raise ValueError(f"batch must have shape ({x.shape[0]},), got {shape_str(batch.shape)}")
    feats = x.detach().float() if x.dtype in (torch.float16, torch.bfloat16) else x.detach()
    if cosine:
        feats = torch.nn.functional.normalize(feats, dim=-1)
    starts, sizes = _segments(batch)
    edges = []
    for size in sizes.unique().tolist():
        if size == 0:
            continue
        first = starts[sizes == size]
        nodes = first.view(-1, 1) + torch.arange(size, device=x.device)
        dist = pairwise_sq_distance(feats[nodes])
        if not loop:
            dist.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        take = min(k, size if loop else size - 1)
        if take == 0:
            continue
        nearest = dist.topk(take, dim=-1, largest=False).indices
        centre = nodes.unsqueeze(-1).expand_as(nearest)
        neighbour = torch.gather(nodes.unsqueeze(1).expand(-1, size, -1), 2, nearest)
        edges.append(torch.stack((centre.reshape(-1), neighbour.reshape(-1))))
    if not edges:
        return torch.empty(2, 0, dtype=torch.long, device=x.device)
    out = torch.cat(edges, dim=1)
    order = torch.sort(out[0], stable=True).indices
    return out[:, order]


def drop_edge(edge_index: torch.Tensor, p: float, training: bool = True,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """DropEdge: keep each edge independently with probability 1 - p while training.

    (2, E) -> (2, E') with E' <= E; identity when not training or p == 0.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"edge drop probability p must lie in [0, 1), got {p}")
    if not training or p == 0.0:
        return edge_index
    keep = torch.rand(edge_index.shape[1], generator=generator, device=edge_index.device)
    return edge_index[:, keep >= p]
