"""Graph construction on feature maps: dense dilated kNN (ViG) and the similarity threshold (SViG).

Nodes are the N = H * W positions of a (B, C, H, W) map (or a (B, C, N, 1) tensor). Both rules
L2-normalise each node's C-vector and use the squared Euclidean distance between normalised
vectors. Everything here runs without gradient: graphs are built from detached features.

Two dense graph forms are produced:

* neighbour indices ``(B, N, k)``: row ``i`` lists the k neighbours of centre ``i`` (nearest first);
* a boolean mask ``(B, N, N)``: ``mask[b, i, j]`` is true iff ``j`` is a neighbour of centre ``i``;
  ``(B, N, M)`` when the keys are a separate set of M nodes (pyramid ViG's pooled keys).

`gcn_lib.sparse` turns both into edge lists.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .shapes import shape_str


def as_node_features(x: torch.Tensor) -> torch.Tensor:
    """Validate a (B, C, H, W) or (B, C, N, 1) feature map and return it as (B, N, C)."""
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W) or (B, C, N, 1), got {shape_str(x.shape)}")
    b, c = x.shape[:2]
    return x.reshape(b, c, -1).transpose(1, 2)


def _graph_dtype(x: torch.Tensor) -> torch.Tensor:
    """Half-precision features are compared in float32 so that the graph does not depend on autocast."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def normalized_nodes(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) or (B, C, N, 1) -> (B, N, C) with each node's vector scaled to unit L2 norm."""
    nodes = _graph_dtype(as_node_features(x).detach())
    return F.normalize(nodes, p=2.0, dim=-1)


def pairwise_sq_distance(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances between rows: x (B, N, C), y (B, M, C) (default x) -> (B, N, M).

    Computed as |x|^2 - 2 x.y + |y|^2, the order the published code uses, so that float64 results
    (and hence neighbour order and threshold decisions) match it bit for bit.
    """
    if y is None:
        x_inner = -2 * torch.matmul(x, x.transpose(2, 1))
        x_square = torch.sum(x * x, dim=-1, keepdim=True)
        return x_square + x_inner + x_square.transpose(2, 1)
    xy_inner = -2 * torch.matmul(x, y.transpose(2, 1))
    x_square = torch.sum(x * x, dim=-1, keepdim=True)
    y_square = torch.sum(y * y, dim=-1, keepdim=True)
    return x_square + xy_inner + y_square.transpose(2, 1)


def dense_knn(
    x: torch.Tensor,
    k: int,
    dilation: int = 1,
    y: torch.Tensor | None = None,
    relative_pos: torch.Tensor | None = None,
    stochastic: bool = False,
    epsilon: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Dense dilated k-nearest-neighbour graph (ViG).

    Args:
        x: centre features (B, C, H, W) or (B, C, N, 1).
        k: neighbours per node.
        dilation: take the ``k * dilation`` nearest candidates (self included, nearest first) and
            keep every ``dilation``-th of them.
        y: optional key features (B, C, H', W') or (B, C, M, 1); neighbours are indices into y.
            Pyramid ViG passes an average-pooled copy of x here (see `reduced_keys`).
        relative_pos: optional additive term on the distance, broadcastable to (B, N, M).
        stochastic, epsilon: with ``stochastic=True``, with probability ``epsilon`` take a random k
            of the ``k * dilation`` candidates (one draw for the whole batch) instead of every
            ``dilation``-th. Callers pass ``stochastic=self.training``.
        generator: random source for the stochastic variant.

    Returns:
        neighbour indices (B, N, k), int64, into the N (or M) key nodes.
    """
    with torch.no_grad():  # a with block rather than the decorator: TorchScript compiles it
        if k < 1 or dilation < 1:
            raise ValueError(f"k and dilation must be >= 1, got k={k}, dilation={dilation}")
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must lie in [0, 1], got {epsilon}")
        queries = normalized_nodes(x)
        keys = None if y is None else normalized_nodes(y)
        if keys is not None and keys.shape[0] != queries.shape[0]:
            raise ValueError(f"x and y must have the same batch size, got {x.shape[0]} and {keys.shape[0]}")
        num_keys = queries.shape[1] if keys is None else keys.shape[1]
        candidates = k * dilation
        if candidates > num_keys:
            raise ValueError(
                f"k * dilation = {k} * {dilation} = {candidates} exceeds the number of nodes ({num_keys})"
            )
        dist = pairwise_sq_distance(queries, keys)
        if relative_pos is not None:
            dist = dist + relative_pos.to(dist.dtype)
        _, nearest = torch.topk(-dist, k=candidates, dim=-1)
        if stochastic and epsilon > 0:
            draw = torch.rand((), generator=generator).item()
            if draw < epsilon:
                pick = torch.randperm(candidates, generator=generator)[:k].to(nearest.device)
                return nearest[:, :, pick]
        return nearest[:, :, ::dilation]


def reduced_keys(x: torch.Tensor, r: int) -> torch.Tensor | None:
    """Key set of pyramid ViG: (B, C, H, W) average-pooled by ``r`` -> (B, C, H/r, W/r); None when r == 1."""
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    if r == 1:
        return None
    if x.dim() != 4 or x.shape[-1] == 1:
        raise ValueError(f"r > 1 needs a (B, C, H, W) map, got {shape_str(x.shape)}")
    return F.avg_pool2d(x, r, r)


@torch.compiler.assume_constant_result
def threshold_quantile(t: float) -> float:
    """Standard normal quantile Phi^-1(t) in float64 (``torch.special.ndtri``); a constant to torch.compile
    (torch 2.8's dynamo breaks the graph at the ``float()`` of a tensor; 2.11 and later do not)."""
    return float(torch.special.ndtri(torch.tensor(t, dtype=torch.float64)))


def _check_number(t: object) -> None:
    if not isinstance(t, (int, float)) or math.isnan(t):
        raise ValueError(f"threshold t must be a number below 1, got {t!r}")


def check_threshold(t: float) -> None:
    """Reject thresholds that select nothing by definition (t >= 1) or are not numbers."""
    if not torch.jit.is_scripting():  # scripted code has typed t as a float already
        _check_number(t)
    if t >= 1:
        raise ValueError(f"threshold t must be below 1 (t <= 0 gives the complete graph), got {t}")


def _check_keys(x: torch.Tensor, y: torch.Tensor | None) -> None:
    if y is not None and (y.dim() != 4 or y.shape[:2] != x.shape[:2]):
        raise ValueError("y must have shape (B, C, H', W') or (B, C, M, 1) with x's (B, C) = "
                         f"{shape_str(x.shape[:2])}, got {shape_str(y.shape)}")


def similarity_stats(
    x: torch.Tensor, y: torch.Tensor | None = None, relative_pos: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Similarities of the threshold graph and their per-image statistics.

    Args:
        x: centre features (B, C, H, W) or (B, C, N, 1).
        y: optional key features (B, C, H', W') or (B, C, M, 1) (pyramid ViG: x average-pooled by r);
            default x (M = N).
        relative_pos: optional (1 or B, N, M) term added to the distance, as `dense_knn` adds it, so
            the similarity is s(i, j) = -(d(i, j) + relative_pos[i, j]).

    Returns:
        sim (B, N, M) = -(d(i, j) + relative_pos) between L2-normalised nodes (float32 for half
        inputs), and the per-image mean (B, 1, 1) and unbiased standard deviation (B, 1, 1) over all
        N * M pairs.
    """
    with torch.no_grad():  # a with block rather than the decorator: TorchScript compiles it
        _check_keys(x, y)
        nodes = normalized_nodes(x)
        keys = None if y is None else normalized_nodes(y)
        b = nodes.shape[0]
        dist = pairwise_sq_distance(nodes, keys)
        if relative_pos is not None:
            if (relative_pos.dim() != 3 or relative_pos.shape[1:] != dist.shape[1:]
                    or relative_pos.shape[0] not in (1, b)):
                raise ValueError(f"relative_pos must have shape (1 or {b}, {dist.shape[1]}, {dist.shape[2]}), "
                                 f"got {shape_str(relative_pos.shape)}")
            dist = dist + relative_pos.detach().to(dist.dtype)
        sim = -dist
        flat = sim.reshape(b, -1)
        return sim, flat.mean(dim=1).view(b, 1, 1), flat.std(dim=1).view(b, 1, 1)


def threshold_mask(
    x: torch.Tensor, t: float, y: torch.Tensor | None = None, relative_pos: torch.Tensor | None = None
) -> torch.Tensor:
    """Similarity-threshold graph (SViG) as a boolean mask, square (N x N) or rectangular (N x M).

    For each image: s(i, j) = -d(i, j) over all N * M ordered pairs of centre i and key j (M = N
    and the diagonal included when there is no separate key set) is standardised with that
    image's mean and unbiased standard deviation over those N * M values, and i is connected to j
    iff the z-score exceeds Phi^-1(t). ``t <= 0`` gives the complete graph; an image whose
    similarities do not vary (all nodes identical) gets no edge at all.

    Pyramid ViG (rectangular case): the keys y are x average-pooled by r (M = N / r^2), and a
    ``relative_pos`` term enters exactly as in `dense_knn`: it is added to the distance before
    anything else, s(i, j) = -(d(i, j) + relative_pos[i, j]), and the sum is standardised. With
    M = N, y = x and no relative_pos this is the square rule bit for bit. Unlike the square rule,
    a centre need not be among its own keys, so a centre can be left without any neighbour.

    Args:
        x: centre features (B, C, H, W) or (B, C, N, 1).
        t: threshold, below 1.
        y: optional key features (B, C, H', W') or (B, C, M, 1); default x.
        relative_pos: optional (1 or B, N, M) term added to the distance.

    Returns:
        mask (B, N, M), bool: ``mask[b, i, j]`` iff key j is a neighbour of centre i.
    """
    with torch.no_grad():  # a with block rather than the decorator: TorchScript compiles it
        check_threshold(t)
        if t <= 0:
            _check_keys(x, y)
            b, n, _ = as_node_features(x).shape
            m = n if y is None else as_node_features(y).shape[1]
            return torch.ones(b, n, m, dtype=torch.bool, device=x.device)
        sim, mean, std = similarity_stats(x, y, relative_pos)
        # A zero spread gives 0/0 = NaN, and NaN > q is false: no edge, as specified.
        return (sim - mean) / std > threshold_quantile(t)
