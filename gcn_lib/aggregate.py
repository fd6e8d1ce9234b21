"""Max-relative aggregation in its four interchangeable forms.

For centre i with neighbour set S(i) and features x (B, C, N, 1):

    m_i = max_{j in S(i)} (x_j - x_i)        (per channel)

which equals (max_{j in S(i)} x_j) - x_i exactly, also in floating point (subtracting a constant
is monotone). A centre without any neighbour gets m_i = 0, as the published scatter-max gives.
The forms below agree bit for bit on the same graph and differ only in how the graph is given and
what they cost:

* `max_relative_gather`: neighbour indices (B, N, k): memory B*C*N (each neighbour's C-vector gathered once
  and folded into a running maximum; the backward routes to the first maximal neighbour), the kNN path;
* `max_relative_dense`: boolean mask (B, N, N), or (B, N, M) over separate keys y: masked max,
  memory B*C*N*M in chunks;
* `max_relative_scatter`: edge list (2, E) with native ``torch.scatter_reduce``: memory C*E;
* `max_relative_ranked`: the same mask as `max_relative_dense`, by ranking the keys: memory about
  B*C*N*T for T = 3 / (mask density) candidates, and an arg-max backward (the CPU training path).

`max_relative_ranked` sorts each channel's keys once, descending, (B, C, M); a centre's maximum is
then the first key in that order that lies in its mask row. It checks the first T ranked keys of
every (centre, channel) row at once, (B, C, N, T) mask bits, and scans the rest of the order only for
the rows with no neighbour among them (about e^-3 of the rows of a random mask; exact for any mask).
Its backward routes each (centre, channel) gradient to ONE neighbour, the winner, as the published
code's ``torch_scatter.scatter_max`` does, instead of splitting it among tied maxima as the backward
of ``amax`` (the other forms) does. Tie rule: among neighbours holding the same maximal value the one
with the lowest key index wins (a stable sort). Without ties all forms have the same gradient.
"""
from __future__ import annotations

import math

import torch

from .shapes import shape_str
from .sparse import check_edge_index

# Elements of the (B, C, chunk, N) temporary in `max_relative_dense` (about 64 MiB in float64).
_DENSE_CHUNK_ELEMENTS = 1 << 23
# Mask bits checked per pass in `masked_key_max` (16 MiB of bools, plus the int64 fallback index).
_RANKED_CHUNK_ELEMENTS = 1 << 24
# Ranked keys checked per row at mask density d: T = ceil(_RANKED_HITS / d), so that a row of a random
# mask misses all T with probability about exp(-_RANKED_HITS).
_RANKED_HITS = 3.0


def _check_features(x: torch.Tensor) -> tuple[int, int, int]:
    if x.dim() != 4 or x.shape[-1] != 1:
        raise ValueError(f"x must have shape (B, C, N, 1), got {shape_str(x.shape)}")
    return x.shape[0], x.shape[1], x.shape[2]


def _check_mask_keys(x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor | None) -> tuple[int, int, int, int]:
    """Validate centres x (B, C, N, 1), keys y (B, C, M, 1) (default x) and a bool mask (B, N, M); return B, C, N, M."""
    b, c, n = _check_features(x)
    keys = x if y is None else y
    m = _check_features(keys)[2]
    if keys.shape[:2] != (b, c):
        raise ValueError(f"y must have shape ({b}, {c}, M, 1), got {shape_str(keys.shape)}")
    if mask.shape != (b, n, m) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape ({b}, {n}, {m}), "
                         f"got {mask.dtype} {shape_str(mask.shape)}")
    return b, c, n, m


def gather_neighbours(x: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """Features of each centre's neighbours: x (B, C, M, 1), indices (B, N, k) into M -> (B, C, N, k)."""
    b, c, m = _check_features(x)
    if neighbours.dim() != 3 or neighbours.shape[0] != b:
        raise ValueError(f"neighbours must have shape ({b}, N, k), got {shape_str(neighbours.shape)}")
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
    if torch.jit.is_scripting():  # TorchScript compiles no autograd.Function: the (B, C, N, k) form, same values
        return gather_neighbours(x if y is None else y, neighbours).amax(dim=-1, keepdim=True) - x
    keys = x if y is None else y
    b, c, m = _check_features(keys)
    if neighbours.dim() != 3 or neighbours.shape[0] != b:
        raise ValueError(f"neighbours must have shape ({b}, N, k), got {shape_str(neighbours.shape)}")
    n = neighbours.shape[1]
    rows = keys.reshape(b, c, m).transpose(1, 2).reshape(b * m, c)
    offset = (torch.arange(b, device=neighbours.device) * m).view(b, 1, 1)
    # (k, B * N) global row ids: row j lists every centre's j-th neighbour
    picks = (neighbours + offset).reshape(b * n, -1).t().contiguous()
    top = _NeighbourMax.apply(rows, picks)
    return top.view(b, n, c).transpose(1, 2).unsqueeze(-1) - x


class _NeighbourMax(torch.autograd.Function):
    """max_j rows[picks[j]] for node-major rows (R, C) and row ids picks (k, P) -> (P, C), one neighbour at a time.

    Each neighbour's row is gathered once (a contiguous C-vector) and folded into a running maximum: no
    (P, k, C) copy. The backward routes each gradient to the first neighbour (lowest j) holding the maximum,
    as the published ``torch.max(..., dim=-1)`` does."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
        out = rows.index_select(0, picks[0])
        for j in range(1, picks.shape[0]):
            torch.maximum(out, rows.index_select(0, picks[j]), out=out)
        ctx.save_for_backward(rows, picks, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        rows, picks, out = ctx.saved_tensors
        grad_rows = torch.zeros_like(rows)
        taken = torch.zeros_like(out, dtype=torch.bool)
        zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
        for j in range(picks.shape[0]):
            hit = (rows.index_select(0, picks[j]) == out) & ~taken
            grad_rows.index_add_(0, picks[j], torch.where(hit, grad, zero))
            taken |= hit
        return grad_rows, None


def max_relative_dense(x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Max-relative aggregation over a boolean adjacency mask, square or rectangular.

    Args:
        x: centre features (B, C, N, 1).
        mask: (B, N, M) bool, ``mask[b, i, j]`` iff key j is a neighbour of centre i (M = N without y).
        y: key features (B, C, M, 1) (pyramid ViG's pooled keys); default x.

    Returns:
        m (B, C, N, 1) with m_i = max over neighbours j of (y_j - x_i); 0 for centres without neighbours.
    """
    b, c, n, m = _check_mask_keys(x, mask, y)
    keys = (x if y is None else y).reshape(b, c, 1, m)
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


def _first_hit(bits: torch.Tensor) -> torch.Tensor:
    """Index of the first true entry along the last dimension (0 where there is none)."""
    return bits.to(torch.uint8).argmax(dim=-1)


def _masked_key_max(keys: torch.Tensor, mask: torch.Tensor,
                    order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Body of ``gcn_lib::masked_key_max``: see `masked_key_max`."""
    b, c, m = keys.shape
    n = mask.shape[1]
    if order is None:
        order = keys.argsort(dim=-1, descending=True, stable=True)
    has_neighbour = mask.any(dim=-1)
    density = int(mask.count_nonzero()) / max(1, mask.numel())
    t = m if density == 0 else min(m, max(1, math.ceil(_RANKED_HITS / density)))
    # Rank (position in `order`) of each row's winner; first the T best-ranked keys of every row.
    rank = torch.empty(b, c, n, dtype=torch.long, device=keys.device)
    found = torch.empty(b, c, n, dtype=torch.bool, device=keys.device)
    step = max(1, _RANKED_CHUNK_ELEMENTS // max(1, b * n * t))
    for start in range(0, c, step):
        cand = order[:, start:start + step, :t]
        k = cand.shape[1]
        bits = torch.gather(mask.unsqueeze(1).expand(b, k, n, m), 3, cand.unsqueeze(2).expand(b, k, n, t))
        found[:, start:start + step] = bits.any(dim=-1)
        rank[:, start:start + step] = _first_hit(bits)
    # Rows with a neighbour but none among the first T: scan the rest of their order.
    b_idx, c_idx, i_idx = (has_neighbour.unsqueeze(1) & ~found).nonzero(as_tuple=True)
    step = max(1, _RANKED_CHUNK_ELEMENTS // max(1, m))
    for start in range(0, b_idx.numel(), step):
        bb, cc, ii = b_idx[start:start + step], c_idx[start:start + step], i_idx[start:start + step]
        bits = torch.gather(mask[bb, ii], 1, order[bb, cc, t:])
        rank[bb, cc, ii] = _first_hit(bits) + t
    arg = order.gather(2, rank)
    has = has_neighbour.unsqueeze(1)
    values = torch.where(has, keys.gather(2, arg), torch.zeros((), dtype=keys.dtype, device=keys.device))
    return values, torch.where(has, arg, -1)


def _masked_key_max_shapes(keys: torch.Tensor, mask: torch.Tensor,
                           order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake implementation of ``gcn_lib::masked_key_max`` for tracing."""
    b, c, _ = keys.shape
    n = mask.shape[1]
    return keys.new_empty(b, c, n), keys.new_empty(b, c, n, dtype=torch.long)


def _save_winners(ctx, inputs: tuple[torch.Tensor, torch.Tensor], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    ctx.save_for_backward(output[1])
    ctx.num_keys = inputs[0].shape[-1]


def _masked_key_max_backward(ctx, grad_values: torch.Tensor, grad_arg: torch.Tensor | None) -> tuple:
    (arg,) = ctx.saved_tensors
    b, c, _ = arg.shape
    routed = torch.where(arg >= 0, grad_values, torch.zeros_like(grad_values))
    grad_keys = grad_values.new_zeros(b, c, ctx.num_keys).scatter_add_(2, arg.clamp_min(0), routed)
    return grad_keys, None, None


# An opaque operator with a fake implementation and a registered backward: torch.compile traces a call to
# it without a graph break, and its data-dependent work (the density, the fallback rows) stays inside.
masked_key_max = torch.library.custom_op("gcn_lib::masked_key_max", _masked_key_max, mutates_args=())
masked_key_max.__doc__ = """Maximum key of every mask row, per channel, and which key it is.

    Args:
        keys: (B, C, M) features of the keys.
        mask: (B, N, M) bool, ``mask[b, i, j]`` iff key j is a neighbour of centre i.
        order: optional (B, C, M) int64, ``keys.argsort(dim=-1, descending=True, stable=True)`` computed once
            by a caller that passes the mask in blocks of centres (default: sorted here).

    Returns:
        values (B, C, N): ``max_{j: mask[b, i, j]} keys[b, c, j]``, 0 for a row without neighbours;
        arg (B, C, N) int64: the winning j (the lowest index among ties), -1 for a row without neighbours.
        The backward sends each gradient of ``values`` to its winner only.
    """
masked_key_max.register_fake(_masked_key_max_shapes)
masked_key_max.register_autograd(_masked_key_max_backward, setup_context=_save_winners)


# Neighbour columns gathered per pass in `masked_key_max_by_degree`: a (rows, group, C) temporary.
_DEGREE_GROUP = 8


def masked_key_max_by_degree(keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Maximum key of every mask row, per channel, by gathering each row's neighbours: no gradient.

    The rows are sorted by degree, longest first, and their neighbour lists laid out in a (rows, max degree)
    table, padded with each row's first neighbour (which leaves a maximum unchanged). Pass p gathers columns
    p * G .. p * G + G - 1 for the rows whose degree exceeds p * G, a prefix of the sorted rows, as contiguous
    C-vectors of the node-major keys, and folds them into a running maximum. The work is C times the number of
    edges, however unevenly the degrees fall (`masked_key_max` ranks keys and pays most for rows of low
    degree, the rows a near-complete SViG graph at initialisation is full of). The values are exact maxima,
    bit-identical to the other forms.

    Args:
        keys: (B, C, M) features of the keys.
        mask: (B, R, M) bool, ``mask[b, i, j]`` iff key j is a neighbour of centre i.

    Returns:
        values (B, C, R): ``max_{j: mask[b, i, j]} keys[b, c, j]``, 0 for a row without neighbours.
    """
    b, c, m = keys.shape
    r = mask.shape[1]
    with torch.no_grad():
        nodes = keys.transpose(1, 2).reshape(b * m, c)
        degree = mask.sum(dim=-1).flatten()
        sorted_degree, order = degree.sort(descending=True, stable=True)
        longest = int(sorted_degree[0]) if degree.numel() > 0 else 0
        values = keys.new_zeros(b * r, c)
        if longest == 0:
            return values.view(b, r, c).transpose(1, 2)
        image, centre, key = mask.nonzero(as_tuple=True)  # row-major: each row's keys together
        row = image * r + centre
        first = torch.cumsum(degree, 0) - degree
        column = torch.arange(row.numel(), device=mask.device) - first[row]
        place = torch.empty_like(order)
        place[order] = torch.arange(order.numel(), device=mask.device)
        ids = image * m + key
        table = ids[first.clamp(max=max(0, ids.numel() - 1))][order].view(-1, 1).repeat(1, longest)
        table[place[row], column] = ids
        with_neighbours = int(torch.count_nonzero(sorted_degree))
        best = nodes.index_select(0, table[:with_neighbours, 0])
        for start in range(1, longest, _DEGREE_GROUP):
            active = int(torch.count_nonzero(sorted_degree > start))
            group = table[:active, start:start + _DEGREE_GROUP]
            gathered = nodes.index_select(0, group.reshape(-1)).view(active, group.shape[1], c)
            torch.maximum(best[:active], gathered.amax(dim=1), out=best[:active])
        values[order[:with_neighbours]] = best
        return values.view(b, r, c).transpose(1, 2)


def max_relative_ranked(x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Max-relative aggregation over a mask by ranked keys (`masked_key_max`), square or rectangular.

    Same arguments and bit-identical values as `max_relative_dense`; the gradient goes to one winning
    neighbour per (centre, channel) (the lowest key index among tied maxima) and, negated, to the centre
    wherever it has a neighbour. Saves only the (B, C, N) winner indices for the backward.

    Args:
        x: centre features (B, C, N, 1).
        mask: (B, N, M) bool adjacency (M = N without y).
        y: key features (B, C, M, 1); default x.

    Returns:
        m (B, C, N, 1); 0 for centres without neighbours.
    """
    b, c, n, m = _check_mask_keys(x, mask, y)
    keys = (x if y is None else y).reshape(b, c, m)
    values, _ = masked_key_max(keys, mask)
    has_neighbour = mask.any(dim=-1).view(b, 1, n, 1)
    return torch.where(has_neighbour, values.view(b, c, n, 1) - x, torch.zeros_like(x))
