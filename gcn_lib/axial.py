"""Axial graphs on the (B, C, H, W) grid: MobileViG's SVGA and GreedyViG's DAGA.

Both graphs connect a node only to nodes of its own row and column, at offsets that are multiples of a
stride K, cyclically (the grid wraps around). They act on the map itself, not on a flat node list, and
are computed by rolling the map: ``roll(x, i, dim)[h] = x[(h - i) mod H]``, so offset i along H links
node (h, w) to node ((h - i) mod H, w), the node i rows above it, wrapping.

* SVGA (sparse vision graph attention, MobileViG): a fixed graph, offsets ``range(K, H, K)`` rows and
  ``range(K, W, K)`` columns; aggregation ``max(0, max_j (x_i - x_j))`` (note the sign: x_i - x_j).
* DAGA (dynamic axial graph construction, GreedyViG): offsets ``range(0, H, K)`` / ``range(0, W, K)``, an
  edge kept only where the L1 distance over channels is below a per-image threshold ``mean - std``;
  aggregation ``max(0, max_j (x_j - x_i))`` over the kept edges.

`svga_mask` and `daga_mask` give the same graphs as dense (N, N) / (B, N, N) masks over the row-major
node index n = h * W + w (for tests: `daga_mask` compares every pair of nodes); `daga_edges` gives the
DAGA graph as an edge list computed offset by offset, as the aggregation does, for pictures of large
maps. The aggregations never build them.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn


def _check_map(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError("x must be a map of shape (B, C, H, W), got " + str(x.dim()) + " dimensions")


def _check_stride(k: int) -> None:
    if k < 1:
        raise ValueError("the axial stride K must be >= 1, got " + str(k))


def _axial_offsets(height: int, width: int, k: int) -> List[Tuple[int, int]]:
    """(shift, dim) of every axial neighbour offset of SVGA and DAGA: rows ``range(K, H, K)`` on dim 2, then
    columns ``range(K, W, K)`` on dim 3 (offset 0, the node itself, is where both start)."""
    return [(offset, 2) for offset in range(k, height, k)] + [(offset, 3) for offset in range(k, width, k)]


def _drop_far(x: torch.Tensor, rolled: torch.Tensor, threshold: torch.Tensor,
              difference: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DAGA's edge rule for one offset, applied to the rolled map in place: -inf at every node whose L1 distance
    to its neighbour is not below the image's threshold (so that a maximum passes over it), the value itself
    where the edge is kept. Adding a (B, 1, H, W) term of 0 / -inf rather than selecting with ``where``: an
    add broadcasts over the channels at vector speed in either memory layout, ``where`` does not.
    ``difference``: ``x - rolled`` already computed into a scratch map (overwritten)."""
    with torch.no_grad():
        if difference is None:
            difference = x - rolled
        penalty = torch.zeros_like(threshold).expand(rolled.shape[0], 1, rolled.shape[2], rolled.shape[3])
        penalty = penalty.masked_fill(~(_l1_over_channels(difference) < threshold), float("-inf"))
    return rolled.add_(penalty)


def _roll_into(out: torch.Tensor, x: torch.Tensor, shift: int, dim: int) -> torch.Tensor:
    """``torch.roll(x, shift, dim)`` written into ``out`` (0 < shift < size): no new map per offset."""
    size = x.shape[dim]
    out.narrow(dim, shift, size - shift).copy_(x.narrow(dim, 0, size - shift))
    out.narrow(dim, 0, shift).copy_(x.narrow(dim, size - shift, shift))
    return out


def _axial_extreme_chain(x: torch.Tensor, k: int, largest: bool, threshold: Optional[torch.Tensor]) -> torch.Tensor:
    """`_axial_extreme_values` as a chain of roll / maximum that autograd differentiates (TorchScript with a
    gradient, which compiles no autograd.Function)."""
    best = x
    for shift, dim in _axial_offsets(x.shape[2], x.shape[3], k):
        rolled = torch.roll(x, shift, dim)
        if threshold is not None:
            rolled = _drop_far(x, rolled, threshold)
        best = torch.maximum(best, rolled) if largest else torch.minimum(best, rolled)
    return best


def _axial_extreme_values(x: torch.Tensor, k: int, largest: bool, threshold: Optional[torch.Tensor],
                          winner: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per channel, the max (``largest``) or min of x and its axial neighbours (kept ones only with a threshold);
    with ``winner`` (zeros shaped like x) also which offset won each element, 1-based in `_axial_offsets`'s
    order (0: the node itself; a strict comparison keeps the earliest of tied candidates).

    Without a gradient to keep it works in three maps it reuses for every offset, the rolled map, the difference
    and the running extreme, instead of allocating new ones per offset: on the CPU a fresh map of this size
    costs about as much as the arithmetic on it. With one (only under TorchScript; eager code takes
    `_AxialExtreme`) it is `_axial_extreme_chain`."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _axial_extreme_chain(x, k, largest, threshold)
    best = x.clone()
    rolled = torch.empty_like(x)
    difference = torch.empty_like(x)
    index = 0
    for shift, dim in _axial_offsets(x.shape[2], x.shape[3], k):
        index += 1
        _roll_into(rolled, x, shift, dim)
        if threshold is not None:
            _drop_far(x, rolled, threshold, torch.sub(x, rolled, out=difference))
        if winner is not None:
            winner.masked_fill_(rolled > best if largest else rolled < best, index)
        if largest:
            torch.maximum(best, rolled, out=best)
        else:
            torch.minimum(best, rolled, out=best)
    return best


class _AxialExtreme(torch.autograd.Function):
    """`_axial_extreme_values` with a winner-routed backward: (B, C, H, W) -> (B, C, H, W).

    The forward records, per element, which offset won in one byte, instead of the two float maps per offset
    that autograd saves for a chain of ``maximum`` / ``where``; the backward sends each gradient to that one
    winner, rolled back to where it came from. Without ties the gradient is that of the chain, which splits a
    tie's gradient evenly."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int, largest: bool, threshold: Optional[torch.Tensor]) -> torch.Tensor:
        offsets = _axial_offsets(x.shape[2], x.shape[3], k)
        winner = torch.zeros_like(x, dtype=torch.uint8 if len(offsets) < 256 else torch.int32)
        best = _axial_extreme_values(x, k, largest, threshold, winner)
        ctx.save_for_backward(winner)
        ctx.offsets = offsets
        return best

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (winner,) = ctx.saved_tensors
        zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
        grad_x = torch.where(winner == 0, grad, zero)
        won = torch.empty_like(grad_x)
        for index, (shift, dim) in enumerate(ctx.offsets, start=1):
            torch.where(winner == index, grad, zero, out=won)
            size = won.shape[dim]  # grad_x += roll(won, -shift, dim), slice by slice
            grad_x.narrow(dim, 0, size - shift).add_(won.narrow(dim, shift, size - shift))
            grad_x.narrow(dim, size - shift, shift).add_(won.narrow(dim, 0, shift))
        return grad_x, None, None, None


def _axial_extreme(x: torch.Tensor, k: int, largest: bool, threshold: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The winner-routed function where a gradient is wanted, the plain maxima otherwise (inference, and
    TorchScript, which compiles no autograd.Function); the values are the same."""
    if torch.jit.is_scripting():
        return _axial_extreme_values(x, k, largest, threshold)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return _axial_extreme_values(x, k, largest, threshold)
    return _AxialExtreme.apply(x, k, largest, threshold)


def svga_aggregate(x: torch.Tensor, k: int = 2) -> torch.Tensor:
    r"""SVGA max-relative aggregation over MobileViG's fixed axial graph.

    .. math::
        m_i = \max\Big(0, \max_{j \in S(i)} (x_i - x_j)\Big), \qquad
        S(h, w) = \{(h - a \bmod H, w) : a \in \{K, 2K, \dots\} < H\}
                  \cup \{(h, w - b \bmod W) : b \in \{K, 2K, \dots\} < W\}

    per channel. Computed as ``relu(x - min_j x_j)``: subtracting is monotone in x_j, so this equals the
    maximum of the differences exactly, also in floating point. A node with no neighbour (H, W <= K)
    gets 0. The backward sends each element's gradient to the one neighbour that holds the minimum (the
    node itself first, then the offsets in order, among ties).

    Args:
        x: node features as a map.
        k: the stride K of the offsets (2 in the published models).

    Shapes:
        x: (B, C, H, W) -> (B, C, H, W).
    """
    _check_map(x)
    _check_stride(k)
    return torch.relu(x - _axial_extreme(x, k, largest=False))


def _l1_over_channels(difference: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W): the L1 norm over channels, as ``abs_().sum(1)`` (``difference`` is a
    temporary, taken in place); the value of
    ``torch.linalg.vector_norm(ord=1, dim=1)`` up to the order of summation, whose own kernel reduces the
    channel dimension 4-10x slower on the CPU."""
    return difference.abs_().sum(1, keepdim=True)


def daga_threshold(x: torch.Tensor) -> torch.Tensor:
    r"""GreedyViG's per-image distance threshold t = mean - std.

    The reference distance of node (h, w) is :math:`\|x_{h,w} - x_{h - s_H, w - s_W}\|_1` (over channels,
    indices mod H, W) with :math:`s_H = \lceil H/2 \rceil`, :math:`s_W = \lceil W/2 \rceil`: the published
    code rolls by ``-H//2``, which Python reads as ``(-H) // 2``, so an odd side rolls by the larger half
    (4 rows of a 7-row map, not 3). The mean and the unbiased standard deviation over the H W nodes give
    t; a 1 x 1 map has no standard deviation and gets NaN, which keeps no edge.

    Args:
        x: node features as a map.

    Shapes:
        x: (B, C, H, W) -> t: (B, 1, 1, 1).
    """
    _check_map(x)
    shifts = ((x.shape[2] + 1) // 2, (x.shape[3] + 1) // 2)
    distance = _l1_over_channels(x - torch.roll(x, shifts, (2, 3)))
    return torch.mean(distance, dim=(2, 3), keepdim=True) - torch.std(distance, dim=(2, 3), keepdim=True)


def daga_aggregate(x: torch.Tensor, k: int) -> torch.Tensor:
    r"""DAGA max-relative aggregation over GreedyViG's dynamic axial graph.

    .. math::
        m_i = \max\Big(0, \max_{j \in S(i),\ \|x_i - x_j\|_1 < t} (x_j - x_i)\Big), \qquad
        S(h, w) = \{(h - a \bmod H, w) : a \in \{0, K, 2K, \dots\} < H\}
                  \cup \{(h, w - b \bmod W) : b \in \{0, K, 2K, \dots\} < W\}

    per channel, with t = `daga_threshold` (x) per image and a strict ``<``. Offset 0 is the node itself
    and contributes 0. Computed as ``max(x, max_j x_j) - x`` over the kept edges, which equals the
    published ``max(0, max_j (x_j - x_i) * mask)`` exactly. The graph carries no gradient (t and the
    distances are compared only); the backward sends each element's gradient to the one kept neighbour
    holding the maximum (the node itself first, then the offsets in order, among ties).

    Args:
        x: node features as a map.
        k: the stride K of the offsets (8, 4, 2, 1 in the four GreedyViG stages).

    Shapes:
        x: (B, C, H, W) -> (B, C, H, W).
    """
    _check_map(x)
    _check_stride(k)
    with torch.no_grad():
        threshold = daga_threshold(x)
    return _axial_extreme(x, k, largest=True, threshold=threshold) - x


def _axial_offsets_mask(height: int, width: int, k: int, start: int, device: torch.device | None) -> torch.Tensor:
    """(N, N) bool: centre n = h W + w -> neighbour ((h - a) mod H, w) for a in range(start, H, k) and
    (h, (w - b) mod W) for b in range(start, W, k)."""
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    row_hit = ((rows[:, None] - rows[None, :]) % height) % k == 0  # (H, H): centre row -> neighbour row
    col_hit = ((cols[:, None] - cols[None, :]) % width) % k == 0
    if start > 0:
        row_hit &= rows[:, None] != rows[None, :]
        col_hit &= cols[:, None] != cols[None, :]
    same_row = torch.eye(height, dtype=torch.bool, device=device)
    same_col = torch.eye(width, dtype=torch.bool, device=device)
    # (H, W, H', W'): same column and row offset hit, or same row and column offset hit
    mask = (row_hit[:, None, :, None] & same_col[None, :, None, :]) | (same_row[:, None, :, None]
                                                                       & col_hit[None, :, None, :])
    return mask.reshape(height * width, height * width)


def svga_mask(height: int, width: int, k: int = 2, device: torch.device | None = None) -> torch.Tensor:
    """The SVGA graph as a dense mask: ``mask[n, j]`` is True where node j is a neighbour of node n.

    Shapes:
        -> (H W, H W) bool over row-major node indices; no self loops.
    """
    _check_stride(k)
    return _axial_offsets_mask(height, width, k, start=k, device=device)


def daga_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """The DAGA graph of each image as a dense mask: the axial offsets ``range(0, ., k)`` whose L1 distance
    is below `daga_threshold`. The diagonal (offset 0) is set where 0 < t; it contributes 0 to the
    aggregation either way.

    Shapes:
        x: (B, C, H, W) -> (B, H W, H W) bool over row-major node indices.
    """
    _check_map(x)
    _check_stride(k)
    batch, height, width = x.shape[0], x.shape[2], x.shape[3]
    axial = _axial_offsets_mask(height, width, k, start=0, device=x.device)
    nodes = x.flatten(2)  # (B, C, N)
    distance = (nodes[:, :, :, None] - nodes[:, :, None, :]).abs().sum(1)  # (B, N, N)
    return axial[None] & (distance < daga_threshold(x).reshape(batch, 1, 1))


def daga_edges(x: torch.Tensor, k: int) -> torch.Tensor:
    """The DAGA graph of each image as an edge list: the edges of `daga_mask` (its diagonal included),
    found offset by offset with the distances `daga_aggregate` computes, in O(B N (H + W) / K) memory
    instead of `daga_mask`'s O(B C N^2).

    Shapes:
        x: (B, C, H, W) -> (2, E) int64, `gcn_lib.sparse`'s layout: global ids b N + n (n = h W + w),
        row 0 the centre, row 1 the neighbour; centre-major order, a centre's neighbours in the order
        offset 0, row offsets, column offsets.
    """
    _check_map(x)
    _check_stride(k)
    batch, height, width = x.shape[0], x.shape[2], x.shape[3]
    threshold = daga_threshold(x)
    rows = torch.arange(height, device=x.device).view(height, 1).expand(height, width)
    cols = torch.arange(width, device=x.device).view(1, width).expand(height, width)
    keeps, neighbours = [], []  # per offset: (B, H, W) kept, (H, W) neighbour index of each centre
    offsets = ([(0, 2)] + [(offset, 2) for offset in range(k, height, k)]
               + [(offset, 3) for offset in range(k, width, k)])  # (offset, dim)
    for offset, dim in offsets:
        rolled = torch.roll(x, offset, dim)
        keeps.append((_l1_over_channels(x - rolled) < threshold)[:, 0])
        if dim == 2:
            neighbours.append(((rows - offset) % height) * width + cols)
        else:
            neighbours.append(rows * width + (cols - offset) % width)
    kept = torch.stack(keeps, dim=-1).flatten(1, 2)  # (B, N, offsets)
    neighbour = torch.stack(neighbours, dim=-1).flatten(0, 1)  # (N, offsets)
    image, centre, which = kept.nonzero(as_tuple=True)
    nodes = height * width
    return torch.stack((image * nodes + centre, image * nodes + neighbour[centre, which]))


class SVGA(nn.Module):
    """`svga_aggregate` as a module (no parameters): (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, k: int = 2) -> None:
        super().__init__()
        _check_stride(k)
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return svga_aggregate(x, self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}"


class DAGA(nn.Module):
    """`daga_aggregate` as a module (no parameters): (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        _check_stride(k)
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return daga_aggregate(x, self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}"
