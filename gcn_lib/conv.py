"""Graph convolutions in ViG's dense layout: features (B, C, N, 1) in, (B, C_out, N, 1) out.

Parameter names and shapes are those of the published ViG models (``gconv.nn...``), so their
checkpoints load unchanged. Every ``forward(x, graph, y=None)`` takes the graph in one of the forms
of `gcn_lib.graph` / `gcn_lib.sparse`:

* neighbour indices (B, N, k), int64 - every operator;
* boolean mask (B, N, N) - ``mr`` and ``gin``; (B, N, M) over separate keys y likewise;
* edge list (2, E) of global ids - ``mr``.

``y`` (B, C, M, 1) optionally supplies the neighbour features (pyramid ViG's reduced key set);
indices (and mask columns) then point into y.

Operators (x_i centre, x_j neighbour, S(i) the neighbours of i):

* ``mr``   max-relative:  h_i = nn([x_i, max_{j in S(i)} (x_j - x_i)])  with channels interleaved
* ``edge`` EdgeConv:      h_i = max_{j in S(i)} nn([x_i, x_j - x_i])
* ``sage`` GraphSAGE:     h_i = nn2([x_i, max_{j in S(i)} nn1(x_j)])
* ``gin``  GIN:           h_i = nn((1 + eps) x_i + sum_{j in S(i)} x_j)
"""
from __future__ import annotations

import torch
from torch import nn

from .aggregate import (gather_neighbours, masked_key_max, masked_key_max_by_degree, max_relative_dense,
                        max_relative_gather, max_relative_ranked, max_relative_scatter)
from .graph import ThresholdRows
from .layers import BasicConv, interleave_channels
from .shapes import shape_str
from .sparse import mask_to_edge_index

CONVS: tuple[str, ...] = ("mr", "edge", "sage", "gin")
# The operators that take a bool mask (B, N, N), the form of the similarity-threshold graph.
MASK_CONVS: tuple[str, ...] = ("mr", "gin")
# Below this mask density an eager square mask is aggregated over its edge list (`max_relative_scatter`,
# cost about C * E), above it by ranked keys (`max_relative_ranked`, cost about C * N^2 * 3 / density):
# the crossover measured on CPU by benchmarks/cpu_threshold.py lies between densities 0.035 and 0.1.
SCATTER_BELOW_DENSITY = 0.07
# Without a gradient, a block of threshold-mask rows is aggregated by gathering each row's neighbours
# (`masked_key_max_by_degree`, cost C * E) below this density, by ranked keys above it (a near-complete block,
# where three ranked keys almost always hold a row's maximum): the crossover measured on CPU, 8 x 196 x 196
# random masks, C = 192, lies between densities 0.6 and 1.0.
GATHER_BELOW_DENSITY = 0.7


def graph_form(graph: torch.Tensor) -> str:
    """Name the form of a graph tensor: ``'knn'`` (B, N, k) ints, ``'mask'`` (B, N, N) bool, ``'edges'`` (2, E) ints."""
    if graph.dim() == 3 and graph.dtype == torch.bool:
        return "mask"
    if graph.dim() == 3 and not graph.is_floating_point():
        return "knn"
    if graph.dim() == 2 and graph.shape[0] == 2 and not graph.is_floating_point():
        return "edges"
    raise ValueError(
        "graph must be neighbour indices (B, N, k), a bool mask (B, N, N) or an edge list (2, E); "
        f"got {graph.dtype} {shape_str(graph.shape)}"
    )


def _unsupported(conv: str, form: str, accepted: str) -> ValueError:
    return ValueError(f"conv={conv!r} does not take a graph given as {form!r}; it accepts {accepted}")


def _centres(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C, N, 1) -> (B, C, N, k) view repeating each centre's features."""
    return x.expand(-1, -1, -1, k)


class MRConv2d(nn.Module):
    """Max-relative graph convolution (ViG): (B, C, N, 1) -> (B, C_out, N, 1)."""

    def __init__(self, in_channels: int, out_channels: int, act: str | None = "relu",
                 norm: str | None = None, bias: bool = True) -> None:
        super().__init__()
        self.nn = BasicConv([in_channels * 2, out_channels], act, norm, bias)
        self.scatter_below_density = SCATTER_BELOW_DENSITY  # an attribute, which TorchScript reads (a global it cannot)
        self.gather_below_density = GATHER_BELOW_DENSITY

    def aggregate(self, x: torch.Tensor, graph: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The relative features m (B, C, N, 1) for any graph form; with keys y (B, C, M, 1) the graph is
        indices (B, N, k) or a mask (B, N, M) into them, and m_i = max over neighbours j of (y_j - x_i)."""
        form = graph_form(graph)
        if form == "knn":
            return max_relative_gather(x, graph, y)
        if y is not None and form != "mask":
            raise ValueError("a separate key set y needs neighbour indices (B, N, k) or a bool mask (B, N, M)")
        if form == "mask":
            # torch.export takes the masked dense max: plain aten ops, so the exported program converts to ONNX
            # (the ranked keys' custom operator has no ONNX translation). Rectangular masks (pyramid ViG's pooled
            # keys), compiled code and tensors without data (the meta device) take the ranked keys: their operator
            # compiles whole and has a fake implementation, while an edge list has a data-dependent size. All mask
            # paths give the same values. TorchScript compiles none of this branch (it cannot compile either call).
            if not torch.jit.is_scripting():
                if torch.compiler.is_exporting():
                    return max_relative_dense(x, graph, y)
            if y is not None or torch.compiler.is_compiling() or graph.is_meta:
                return max_relative_ranked(x, graph, y)
            if graph.count_nonzero() >= self.scatter_below_density * graph.numel():
                return max_relative_ranked(x, graph)
            graph = mask_to_edge_index(graph)
        return max_relative_scatter(x, graph)

    def forward(self, x: torch.Tensor, graph: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.nn(interleave_channels(x, self.aggregate(x, graph, y)))

    def aggregate_rows(self, x: torch.Tensor, rows: ThresholdRows, y: torch.Tensor | None = None) -> torch.Tensor:
        """The relative features m (B, C, N, 1) over a threshold graph given block by block (`ThresholdRows`).

        Each block's mask rows (B, R, M) are consumed at once. Under torch.compile and on the meta device (no
        data to count): by ranked keys (`masked_key_max`, the keys sorted once for all blocks). On the CPU without
        a gradient to keep: by gathering each row's neighbours (`masked_key_max_by_degree`) below
        `GATHER_BELOW_DENSITY`, by ranked keys above. Otherwise: by ranked keys at or above
        `SCATTER_BELOW_DENSITY`, else over the block's edges with ``scatter_reduce``. Same values as `aggregate`
        on the whole mask; memory linear in N.
        """
        b, c, n, _ = x.shape
        keys = (x if y is None else y).reshape(b, c, -1)
        nodes = x.reshape(b, c, n)
        compiling = torch.compiler.is_compiling()
        # gathering by degree was measured on the CPU only; on a GPU its host synchronisations may cost more
        gather_by_degree = x.device.type == "cpu" and not (torch.is_grad_enabled() and keys.requires_grad)
        order: torch.Tensor | None = None
        blocks: list[torch.Tensor] = []
        for start in range(0, n, rows.step):
            stop = min(n, start + rows.step)
            mask = rows.rows(start, stop)
            centres = nodes[:, :, start:stop]
            edges = None if compiling or mask.is_meta else int(mask.count_nonzero())
            by_degree = gather_by_degree and edges is not None and edges < self.gather_below_density * mask.numel()
            if by_degree or edges is None or edges >= self.scatter_below_density * mask.numel():
                if by_degree:
                    values = masked_key_max_by_degree(keys, mask)
                else:
                    if order is None:
                        order = keys.detach().argsort(dim=-1, descending=True, stable=True)
                    values, _ = masked_key_max(keys, mask, order)
                has_neighbour = mask.any(dim=-1).unsqueeze(1)
                blocks.append(torch.where(has_neighbour, values - centres, torch.zeros_like(centres)))
            else:
                image, centre, key = mask.nonzero(as_tuple=True)
                messages = keys.transpose(1, 2)[image, key] - centres.transpose(1, 2)[image, centre]
                target = (image * (stop - start) + centre).view(-1, 1).expand(-1, c)
                out = centres.new_zeros(b * (stop - start), c).scatter_reduce(
                    0, target, messages, reduce="amax", include_self=False)
                blocks.append(out.view(b, stop - start, c).transpose(1, 2))
        relative = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)
        return relative.unsqueeze(-1)

    def forward_rows(self, x: torch.Tensor, rows: ThresholdRows, y: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` over a threshold graph given block by block (`ThresholdRows`)."""
        return self.nn(interleave_channels(x, self.aggregate_rows(x, rows, y)))


class EdgeConv2d(nn.Module):
    """EdgeConv (DGCNN): (B, C, N, 1) -> (B, C_out, N, 1); neighbour indices only."""

    def __init__(self, in_channels: int, out_channels: int, act: str | None = "relu",
                 norm: str | None = None, bias: bool = True) -> None:
        super().__init__()
        self.nn = BasicConv([in_channels * 2, out_channels], act, norm, bias)

    def forward(self, x: torch.Tensor, graph: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        form = graph_form(graph)
        if form != "knn":
            raise _unsupported("edge", form, "neighbour indices (B, N, k)")
        x_j = gather_neighbours(x if y is None else y, graph)
        x_i = _centres(x, graph.shape[-1])
        return self.nn(torch.cat([x_i, x_j - x_i], dim=1)).amax(dim=-1, keepdim=True)


class GraphSAGE(nn.Module):
    """GraphSAGE with max pooling: (B, C, N, 1) -> (B, C_out, N, 1); neighbour indices only."""

    def __init__(self, in_channels: int, out_channels: int, act: str | None = "relu",
                 norm: str | None = None, bias: bool = True) -> None:
        super().__init__()
        self.nn1 = BasicConv([in_channels, in_channels], act, norm, bias)
        self.nn2 = BasicConv([in_channels * 2, out_channels], act, norm, bias)

    def forward(self, x: torch.Tensor, graph: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        form = graph_form(graph)
        if form != "knn":
            raise _unsupported("sage", form, "neighbour indices (B, N, k)")
        x_j = self.nn1(gather_neighbours(x if y is None else y, graph)).amax(dim=-1, keepdim=True)
        return self.nn2(torch.cat([x, x_j], dim=1))


class GINConv2d(nn.Module):
    """GIN with a learnable eps: (B, C, N, 1) -> (B, C_out, N, 1); neighbour indices or a mask (B, N, M) into y."""

    def __init__(self, in_channels: int, out_channels: int, act: str | None = "relu",
                 norm: str | None = None, bias: bool = True) -> None:
        super().__init__()
        self.nn = BasicConv([in_channels, out_channels], act, norm, bias)
        self.eps = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, graph: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        form = graph_form(graph)
        if form == "knn":
            x_sum = gather_neighbours(x if y is None else y, graph).sum(dim=-1, keepdim=True)
        elif form == "mask":
            keys = x if y is None else y
            b, c, m, _ = keys.shape
            x_sum = torch.bmm(keys.reshape(b, c, m), graph.transpose(1, 2).to(x.dtype)).unsqueeze(-1)
        else:
            raise _unsupported("gin", form, "neighbour indices (B, N, k) or a bool mask (B, N, M)")
        return self.nn((1 + self.eps) * x + x_sum)

    def forward_rows(self, x: torch.Tensor, rows: ThresholdRows, y: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` over a threshold graph given block by block (`ThresholdRows`): memory linear in N."""
        keys = x if y is None else y
        b, c, m, _ = keys.shape
        flat = keys.reshape(b, c, m)
        sums = [torch.bmm(flat, rows.rows(start, min(rows.n, start + rows.step)).transpose(1, 2).to(x.dtype))
                for start in range(0, rows.n, rows.step)]
        x_sum = (sums[0] if len(sums) == 1 else torch.cat(sums, dim=2)).unsqueeze(-1)
        return self.nn((1 + self.eps) * x + x_sum)


_CONV_CLASSES: dict[str, type[nn.Module]] = {
    "mr": MRConv2d,
    "edge": EdgeConv2d,
    "sage": GraphSAGE,
    "gin": GINConv2d,
}


def graph_conv(conv: str, in_channels: int, out_channels: int, act: str | None = "relu",
               norm: str | None = None, bias: bool = True) -> nn.Module:
    """Build the graph convolution named ``conv`` (one of `CONVS`)."""
    if conv not in _CONV_CLASSES:
        raise ValueError(f"conv={conv!r} is not supported; accepted values: {', '.join(CONVS)}")
    return _CONV_CLASSES[conv](in_channels, out_channels, act, norm, bias)
