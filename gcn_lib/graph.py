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


#: Elements of one (B, rows, M) tile of query-to-key terms (distances, the relative-position term, threshold-mask
#: bits) that graph construction holds at once: queries are processed in blocks of about
#: ``QUERY_BLOCK_ELEMENTS // (B * M)`` rows, so that no (N, M) matrix per image is ever materialised and graph
#: memory grows linearly with the nodes. 2^22 elements are 32 MiB of float64 (16 MiB of float32) per tile.
QUERY_BLOCK_ELEMENTS: int = 1 << 22


def set_query_block_elements(elements: int) -> int:
    """Set `QUERY_BLOCK_ELEMENTS` (the size of one query tile of graph construction, in elements); return the old value.

    Smaller tiles bound graph memory more tightly at some cost in speed; values are unchanged by it."""
    global QUERY_BLOCK_ELEMENTS
    if isinstance(elements, bool) or not isinstance(elements, int) or elements < 1:
        raise ValueError(f"query block elements must be a positive int, got {elements!r}")
    old, QUERY_BLOCK_ELEMENTS = QUERY_BLOCK_ELEMENTS, elements
    return old


def query_block_rows(b: int, n: int, m: int) -> int:
    """Query rows per tile of (B, rows, M) terms: ``QUERY_BLOCK_ELEMENTS // (B * M)``, at least 1, at most N."""
    elements = 4194304  # the default; TorchScript reads no module global, so scripted code keeps it
    if not torch.jit.is_scripting():
        elements = QUERY_BLOCK_ELEMENTS
    return max(1, min(n, elements // max(1, b * m)))


def _cubic_near(v: torch.Tensor) -> torch.Tensor:
    """Bicubic weight (A = -0.75, as F.interpolate) of a tap at distance |v| <= 1."""
    a = -0.75
    return ((a + 2) * v - (a + 3)) * v * v + 1


def _cubic_far(v: torch.Tensor) -> torch.Tensor:
    """Bicubic weight (A = -0.75, as F.interpolate) of a tap at distance 1 < |v| < 2."""
    a = -0.75
    return ((a * v - 5 * a) * v + 8 * a) * v - 4 * a


def _cubic_taps(out_size: int, in_size: int, start: int, stop: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Source rows (4, R) and weights (4, R) of a bicubic (A = -0.75, align_corners=False) resize from ``in_size``
    to ``out_size`` rows, for output rows ``start:stop``, by the formula of ``F.interpolate`` (equal to rounding)."""
    scale = torch.tensor(in_size, dtype=dtype) / out_size
    rows = torch.arange(start, stop, dtype=dtype, device=device)
    real = scale.to(device) * (rows + 0.5) - 0.5
    base = torch.floor(real).clamp(max=in_size - 1)
    t = (real - base).clamp(0, 1)
    weights = torch.stack([_cubic_far(t + 1.0), _cubic_near(t), _cubic_near(1.0 - t), _cubic_far((1.0 - t) + 1.0)])
    base = base.long()
    index = torch.stack([(base - 1 + j).clamp(0, in_size - 1) for j in range(4)])
    return index, weights


def relative_rows(relative_pos: torch.Tensor, n: int, m: int, start: int, stop: int,
                  columns: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``start:stop`` of a relative-position term for N = n centres and M = m keys, (1 or B, stop - start, m).

    ``relative_pos`` is (1 or B, n, m) (sliced), (1 or B, 1, m) (broadcast), or a (1, N', M') table of another
    size, which stands for its bicubic resize (align_corners=False) to (n, m) as pyramid ViG resizes it for another
    input size: only the requested rows are made, from ``columns``, the table resized along its keys to
    (1, N', m) (`resize_columns`; made here when not given).
    """
    rows = relative_pos.shape[-2]
    if rows == n and relative_pos.shape[-1] == m:
        return relative_pos[..., start:stop, :]
    if rows == 1:
        return relative_pos
    if columns is None:
        columns = resize_columns(relative_pos, m)
    index, weights = _cubic_taps(n, rows, start, stop, columns.dtype, columns.device)
    weights = weights.unsqueeze(-1)
    out = columns[:, index[0]] * weights[0]
    for j in range(1, 4):
        out = out + columns[:, index[j]] * weights[j]
    return out.to(relative_pos.dtype)


def resize_columns(relative_pos: torch.Tensor, m: int) -> torch.Tensor:
    """A (1, N', M') relative-position table resized bicubically along its keys only -> (1, N', m), float32 at least."""
    table = relative_pos if relative_pos.dtype == torch.float64 else relative_pos.float()
    if table.shape[-1] == m:
        return table
    return F.interpolate(table.unsqueeze(0), size=(table.shape[-2], m), mode="bicubic",
                         align_corners=False).squeeze(0)


def _prepared_relative(relative_pos: torch.Tensor | None, b: int, n: int, m: int,
                       resize_table: bool) -> torch.Tensor | None:
    """Check ``relative_pos`` against (B, N, M) = (b, n, m); with ``resize_table`` a (1, N', M') table of another
    size is accepted and the key-resized table that `relative_rows` reads is returned (None otherwise)."""
    if relative_pos is None:
        return None
    shape = relative_pos.shape
    if (2 <= relative_pos.dim() <= 3 and shape[-2] in (1, n) and shape[-1] == m
            and (relative_pos.dim() == 2 or shape[0] in (1, b))):
        return None
    if resize_table and relative_pos.dim() == 3 and shape[0] == 1 and shape[1] > 1:
        return resize_columns(relative_pos, m)
    accepted = f"(1 or {b}, {n} or 1, {m})" + (" or a (1, N', M') table to resize" if resize_table else "")
    raise ValueError(f"relative_pos must have shape {accepted}, got {shape_str(shape)}")


def dense_knn(
    x: torch.Tensor,
    k: int,
    dilation: int = 1,
    y: torch.Tensor | None = None,
    relative_pos: torch.Tensor | None = None,
    stochastic: bool = False,
    epsilon: float = 0.0,
    generator: torch.Generator | None = None,
    resize_table: bool = False,
) -> torch.Tensor:
    """Dense dilated k-nearest-neighbour graph (ViG), built over blocks of queries.

    Args:
        x: centre features (B, C, H, W) or (B, C, N, 1).
        k: neighbours per node.
        dilation: take the ``k * dilation`` nearest candidates (self included, nearest first) and
            keep every ``dilation``-th of them.
        y: optional key features (B, C, H', W') or (B, C, M, 1); neighbours are indices into y.
            Pyramid ViG passes an average-pooled copy of x here (see `reduced_keys`).
        relative_pos: optional additive term on the distance, (1 or B, N or 1, M); with ``resize_table`` also a
            (1, N', M') table of another size, which stands for its bicubic resize to (N, M) (`relative_rows`).
        stochastic, epsilon: with ``stochastic=True``, with probability ``epsilon`` take a random k
            of the ``k * dilation`` candidates (one draw for the whole batch) instead of every
            ``dilation``-th. Callers pass ``stochastic=self.training``.
        generator: random source for the stochastic variant.
        resize_table: accept a ``relative_pos`` table of another size (pyramid ViG on another input size).

    The (B, rows, M) distances (and relative-position rows) of one block of queries are made, searched
    and dropped before the next block (`query_block_rows`): memory is linear in N for a fixed M.

    Returns:
        neighbour indices (B, N, k), int64, into the N (or M) key nodes.
    """
    with torch.no_grad():  # a with block rather than the decorator: TorchScript compiles it
        if k < 1 or dilation < 1:
            raise ValueError(f"k and dilation must be >= 1, got k={k}, dilation={dilation}")
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must lie in [0, 1], got {epsilon}")
        queries = normalized_nodes(x)
        keys = queries if y is None else normalized_nodes(y)
        if keys.shape[0] != queries.shape[0]:
            raise ValueError(f"x and y must have the same batch size, got {x.shape[0]} and {keys.shape[0]}")
        b, n, _ = queries.shape
        num_keys = keys.shape[1]
        candidates = k * dilation
        if candidates > num_keys:
            raise ValueError(
                f"k * dilation = {k} * {dilation} = {candidates} exceeds the number of nodes ({num_keys})"
            )
        columns = _prepared_relative(relative_pos, b, n, num_keys, resize_table)
        query_square = torch.sum(queries * queries, dim=-1, keepdim=True)
        key_square = torch.sum(keys * keys, dim=-1, keepdim=True).transpose(2, 1)
        key_t = keys.transpose(2, 1)
        step = query_block_rows(b, n, num_keys)
        blocks: list[torch.Tensor] = []
        for start in range(0, n, step):
            stop = min(n, start + step)
            # |x|^2 - 2 x.y + |y|^2 in the published order, so that float64 neighbour order matches it bit for bit
            dist = query_square[:, start:stop] + (-2 * torch.matmul(queries[:, start:stop], key_t)) + key_square
            if relative_pos is not None:
                dist = dist + relative_rows(relative_pos, n, num_keys, start, stop, columns).to(dist.dtype)
            blocks.append(torch.topk(dist.neg_(), k=candidates, dim=-1)[1])
        nearest = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
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
    (torch 2.8's dynamo breaks the graph at the ``float()`` of a tensor; 2.11 and later do not). Computed on the CPU
    whatever device context is active (under ``torch.device("meta")`` a tensor would have no value)."""
    return float(torch.special.ndtri(torch.tensor(t, dtype=torch.float64, device="cpu")))


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


class ThresholdRows:
    """The similarity-threshold graph (SViG) of `threshold_mask`, made block of queries by block of queries.

    ``ThresholdRows(x, t, y, relative_pos)`` computes each image's similarity mean and unbiased standard
    deviation over all N * M pairs in one pass over query blocks (Chan's pairwise merge of block moments,
    in float64; with a single block, `similarity_stats`'s reductions bit for bit), and ``rows(start, stop)`` gives the mask rows (B, stop - start, M) of those centres. Only
    one (B, rows, M) tile of distances lives at a time (`query_block_rows`), so memory is linear in N.
    The statistics agree with `similarity_stats` to rounding (float64: about 1e-16 relative), so the mask
    equals `threshold_mask`'s except for a pair whose z-score lies within that rounding of the threshold.

    ``relative_pos`` is (1 or B, N, M), or with ``resize_table`` a (1, N', M') table to resize (`relative_rows`).
    ``t <= 0`` gives the complete graph (``complete`` is then True and no statistics are computed).
    """

    def __init__(self, x: torch.Tensor, t: float, y: torch.Tensor | None = None,
                 relative_pos: torch.Tensor | None = None, resize_table: bool = False) -> None:
        with torch.no_grad():
            check_threshold(t)
            _check_keys(x, y)
            self.queries = normalized_nodes(x)
            self.keys = self.queries if y is None else normalized_nodes(y)
            self.b, self.n, _ = self.queries.shape
            self.m = self.keys.shape[1]
            self.complete = t <= 0
            self.relative_pos = None if relative_pos is None else relative_pos.detach()
            self.columns = _prepared_relative(self.relative_pos, self.b, self.n, self.m, resize_table)
            self.query_square = torch.sum(self.queries * self.queries, dim=-1, keepdim=True)
            self.key_square = torch.sum(self.keys * self.keys, dim=-1, keepdim=True).transpose(2, 1)
            self.step = query_block_rows(self.b, self.n, self.m)
            self._whole: torch.Tensor | None = None
            if not self.complete:
                self.mean, self.std = self._stats()
                self.quantile = threshold_quantile(t)

    def similarity(self, start: int, stop: int) -> torch.Tensor:
        """s(i, j) = -(d(i, j) + relative_pos[i, j]) for centres start:stop, (B, stop - start, M)."""
        key_t = self.keys.transpose(2, 1)
        dist = (self.query_square[:, start:stop] + (-2 * torch.matmul(self.queries[:, start:stop], key_t))
                + self.key_square)
        if self.relative_pos is not None:
            dist = dist + relative_rows(self.relative_pos, self.n, self.m, start, stop, self.columns).to(dist.dtype)
        return dist.neg_()

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.step >= self.n:  # one block: `similarity_stats`'s own reductions, and the block is kept for `rows`
            sim = self.similarity(0, self.n)
            self._whole = sim
            flat = sim.reshape(self.b, -1)
            return flat.mean(dim=1).view(self.b, 1, 1), flat.std(dim=1).view(self.b, 1, 1)
        count = 0
        mean = torch.zeros(self.b, 1, 1, dtype=torch.float64, device=self.queries.device)
        m2 = torch.zeros_like(mean)
        for start in range(0, self.n, self.step):
            stop = min(self.n, start + self.step)
            sim = self.similarity(start, stop).to(torch.float64)
            size = sim.shape[1] * sim.shape[2]
            block_mean = sim.mean(dim=(1, 2), keepdim=True)
            block_m2 = (sim - block_mean).square_().sum(dim=(1, 2), keepdim=True)
            total = count + size
            delta = block_mean - mean
            mean = mean + delta * (size / total)
            m2 = m2 + block_m2 + delta.square() * (count * size / total)
            count = total
        dtype = self.queries.dtype
        std = (m2 / max(count - 1, 1)).sqrt() if count > 1 else torch.full_like(m2, float("nan"))
        return mean.to(dtype), std.to(dtype)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Mask rows (B, stop - start, M), bool: key j is a neighbour of centre i (start <= i < stop)."""
        with torch.no_grad():
            if self.complete:
                return torch.ones(self.b, stop - start, self.m, dtype=torch.bool, device=self.queries.device)
            sim = self._whole[:, start:stop] if self._whole is not None else self.similarity(start, stop)
            # A zero spread gives 0/0 = NaN, and NaN > q is false: no edge, as specified.
            return (sim - self.mean) / self.std > self.quantile


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
