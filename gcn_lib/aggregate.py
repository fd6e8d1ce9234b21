"""Max-relative aggregation in its three interchangeable forms.

For centre i with neighbour set S(i) and features x (B, C, N, 1):

    m_i = max_{j in S(i)} (x_j - x_i)        (per channel)

which equals (max_{j in S(i)} x_j) - x_i exactly, also in floating point (subtracting a constant
is monotone). A centre without any neighbour gets m_i = 0, as the published scatter-max gives.
The three forms below agree bit for bit on the same graph and differ only in how the graph is
given and what they cost:

* `max_relative_gather`: neighbour indices (B, N, k): memory B*C*N*k, the kNN path;
* `max_relative_dense`: boolean mask (B, N, N), or (B, N, M) over separate keys y: masked max,
  memory B*C*N*M in chunks;
* `max_relative_scatter`: edge list (2, E) with native ``torch.scatter_reduce``: memory C*E.
"""
from __future__ import annotations

import torch

from .sparse import check_edge_index

# Elements of the (B, C, chunk, N) temporary in `max_relative_dense` (about 64 MiB in float64).
_DENSE_CHUNK_ELEMENTS = 1 << 23


def _check_features(x: torch.Tensor) -> tuple[int, int, int]:
    if x.dim() != 4 or x.shape[-1] != 1:
        raise ValueError(f"x must have shape (B, C, N, 1), got {tuple(x.shape)}")
    return x.shape[0], x.shape[1], x.shape[2]


def gather_neighbours(x: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """Features of each centre's neighbours: x (B, C, M, 1), indices (B, N, k) into M -> (B, C, N, k)."""
    b, c, m = _check_features(x)
    if neighbours.dim() != 3 or neighbours.shape[0] != b:
        raise ValueError(f"neighbours must have shape ({b}, N, k), got {tuple(neighbours.shape)}")
    _, n, k = neighbours.shape
    flat = x.reshape(b, c, m)
    index = neighbours.reshape(b, 1, n * k).expand(b, c, n * k)
    return torch.gather(flat, 2, index).reshape(b, c, n, k)


def max_relative_gather(x: torch.Tensor, neighbours: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Max-relative aggregation over neighbour indices.

    Args:
        x: centre features (B, C, N, 1).
        neighbours: (B, N, k) indices into the key nodes.
        y: key features (B, C, M, 1); default x.

    Returns:
        m (B, C, N, 1).
    """
    _check_features(x)
    x_j = gather_neighbours(x if y is None else y, neighbours)
    return x_j.amax(dim=-1, keepdim=True) - x


def max_relative_dense(x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Max-relative aggregation over a boolean adjacency mask, square or rectangular.

    Args:
        x: centre features (B, C, N, 1).
        mask: (B, N, M) bool, ``mask[b, i, j]`` iff key j is a neighbour of centre i (M = N without y).
        y: key features (B, C, M, 1) (pyramid ViG's pooled keys); default x.

    Returns:
        m (B, C, N, 1) with m_i = max over neighbours j of (y_j - x_i); 0 for centres without neighbours.
    """
    b, c, n = _check_features(x)
    keys = x if y is None else y
    m = _check_features(keys)[2]
    if keys.shape[:2] != (b, c):
        raise ValueError(f"y must have shape ({b}, {c}, M, 1), got {tuple(keys.shape)}")
    if mask.shape != (b, n, m) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape ({b}, {n}, {m}), got {mask.dtype} {tuple(mask.shape)}")
    keys = keys.reshape(b, c, 1, m)
    fill = torch.finfo(x.dtype).min if x.dtype.is_floating_point else torch.iinfo(x.dtype).min
    chunk = max(1, _DENSE_CHUNK_ELEMENTS // max(1, b * c * m))
    parts = []
    for start in range(0, n, chunk):
        rows = mask[:, None, start:start + chunk, :]
        parts.append(keys.masked_fill(~rows, fill).amax(dim=-1))
    neighbour_max = torch.cat(parts, dim=-1).unsqueeze(-1)
    has_neighbour = mask.any(dim=-1).view(b, 1, n, 1)
    return torch.where(has_neighbour, neighbour_max - x, torch.zeros_like(x))


def max_relative_scatter(x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
    """Max-relative aggregation over an edge list with native ``torch.scatter_reduce``.

    Args:
        x: (B, C, N, 1) features; node b * N + i is position i of image b.
        edge_index: (2, E) global ids, row 0 centre, row 1 neighbour.

    Returns:
        m (B, C, N, 1); 0 for centres without neighbours.
    """
    b, c, n = _check_features(x)
    check_edge_index(edge_index, b * n)
    nodes = x.reshape(b, c, n).transpose(1, 2).reshape(b * n, c)
    centre, neighbour = edge_index[0], edge_index[1]
    messages = nodes[neighbour] - nodes[centre]
    out = torch.zeros_like(nodes).scatter_reduce(
        0, centre.view(-1, 1).expand(-1, c), messages, reduce="amax", include_self=False
    )
    return out.reshape(b, n, c).transpose(1, 2).reshape(b, c, n, 1)
