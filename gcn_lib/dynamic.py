"""The dynamic graph convolution: build a graph from the current features, then convolve over it."""
from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

from . import kernels
from .conv import CONVS, MASK_CONVS, graph_conv
from .graph import ThresholdRows, check_threshold, dense_knn, reduced_keys, relative_rows, threshold_mask
from .layers import interleave_channels
from .shapes import shape_str

_logger = logging.getLogger(__name__)
_logged_caps: set[tuple[int, int, int, int, int]] = set()  # run-time kNN caps this process has logged

GRAPHS: tuple[str, ...] = ("knn", "threshold")
# DynConv2d arguments that only the kNN graph uses, and what each is; graph='threshold' refuses them
# at any value but their default.
KNN_ONLY: dict[str, str] = {
    "kernel_size": "k of the kNN graph",
    "dilation": "dilation of the kNN graph",
    "stochastic": "stochastic kNN",
    "epsilon": "probability of stochastic kNN",
}


class DynConv2d(nn.Module):
    """Dynamic graph convolution on a feature map: (B, C, H, W) -> (B, C_out, H, W).

    The graph is rebuilt at every call from the detached input (no gradient reaches graph
    construction; gradients flow through the aggregation), as in the published ViG and SViG.

    Args:
        in_channels, out_channels: C and C_out.
        kernel_size: k of the kNN graph.
        dilation: dilation d of the kNN graph.
        conv: graph convolution, one of ``mr``, ``edge``, ``sage``, ``gin``; the threshold graph
            takes ``mr`` and ``gin`` (`gcn_lib.conv.MASK_CONVS`).
        act, norm, bias: of the convolution's 1x1 conv block.
        graph: ``'knn'`` (dense dilated kNN) or ``'threshold'`` (similarity threshold, SViG).
        stochastic, epsilon: stochastic kNN in training mode (see `gcn_lib.graph.dense_knn`).
        r: pyramid reduction: neighbours are taken from the map average-pooled by r (both graphs; the
            threshold graph is then the rectangular N x M rule of `gcn_lib.graph.threshold_mask`).
        threshold: t of the threshold graph (below 1; t <= 0 gives the complete graph); given with
            ``graph='knn'`` it is a ValueError.
        fused_kernel: for ``graph='threshold'`` with ``conv='mr'``, aggregate with the fused Triton kernel
            (`gcn_lib.kernels`) whenever it can run (CUDA float tensors, square graph: r = 1 and no
            ``relative_pos``); otherwise, or with False, the torch path.

    ``kernel_size``, ``dilation``, ``stochastic`` and ``epsilon`` (`KNN_ONLY`) are kNN-graph arguments:
    with ``graph='threshold'`` a value other than their default is a ValueError. ``r`` and the
    ``relative_pos`` of `forward` serve both graphs (pyramid ViG).

    The learnable parameters live in ``gconv`` (``gconv.nn.0`` conv, ``gconv.nn.1`` norm), the
    published layout.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 9,
        dilation: int = 1,
        conv: str = "mr",
        act: str | None = "relu",
        norm: str | None = None,
        bias: bool = True,
        graph: str = "knn",
        stochastic: bool = False,
        epsilon: float = 0.0,
        r: int = 1,
        threshold: float | None = None,
        fused_kernel: bool = True,
    ) -> None:
        super().__init__()
        if graph not in GRAPHS:
            raise ValueError(f"graph={graph!r} is not supported; accepted values: {', '.join(GRAPHS)}")
        if graph == "threshold":
            if threshold is None:
                raise ValueError("graph='threshold' needs a threshold t")
            check_threshold(threshold)
            if conv in CONVS and conv not in MASK_CONVS:
                raise ValueError(f"conv={conv!r} needs neighbour indices and does not work with graph='threshold'; "
                                 f"convs for the threshold graph: {', '.join(MASK_CONVS)}")
            _refuse_knn_arguments(kernel_size=kernel_size, dilation=dilation, stochastic=stochastic,
                                  epsilon=epsilon)
        elif threshold is not None:
            raise ValueError(f"graph={graph!r} does not use threshold={threshold!r}; pass graph='threshold' with it")
        if kernel_size < 1 or dilation < 1 or r < 1:
            raise ValueError(f"kernel_size, dilation and r must be >= 1, got {kernel_size}, {dilation}, {r}")
        self.gconv = graph_conv(conv, in_channels, out_channels, act, norm, bias)
        self.conv = conv
        self.graph = graph
        self.k = kernel_size
        self.dilation = dilation
        self.stochastic = stochastic
        self.epsilon = epsilon
        self.r = r
        self.threshold = threshold
        self.fused_kernel = fused_kernel

    def uses_fused_kernel(self, x: torch.Tensor, relative_pos: torch.Tensor | None = None) -> bool:
        """Whether a forward pass on ``x`` (with ``relative_pos``) takes the fused threshold kernel: it is
        square-only, so pooled keys (r > 1) or a relative-position term take the torch path."""
        return (self.graph == "threshold" and self.conv == "mr" and self.fused_kernel and self.r == 1
                and relative_pos is None and kernels.available(x))

    def build_graph(self, x: torch.Tensor, y: torch.Tensor | None = None,
                    relative_pos: torch.Tensor | None = None) -> torch.Tensor:
        """The graph for (B, C, H, W) features and optional keys y (B, C, H', W') (M = H' W' nodes, default
        x): indices (B, N, k) for kNN, a mask (B, N, M) for threshold; ``relative_pos`` (1, N, M) is added to
        the distance by both (a (1, N', M') table of another size is resized bicubically to (N, M) first)."""
        threshold = self.threshold
        # threshold is set whenever the graph is (checked at init); for a kNN layer TorchScript drops the branch
        num_keys = (x if y is None else y).shape[-2] * (x if y is None else y).shape[-1]
        if self.graph == "threshold" and threshold is not None:
            num_nodes = x.shape[-2] * x.shape[-1]
            if relative_pos is not None and (relative_pos.shape[-2] != num_nodes or relative_pos.shape[-1] != num_keys):
                relative_pos = relative_rows(relative_pos, num_nodes, num_keys, 0, num_nodes)
            return threshold_mask(x, threshold, y=y, relative_pos=relative_pos)
        k, dilation = capped_knn(self.k, self.dilation, num_keys)
        return dense_knn(x, k, dilation, y=y, relative_pos=relative_pos,
                         stochastic=self.stochastic and self.training, epsilon=self.epsilon, resize_table=True)

    def forward(self, x: torch.Tensor, relative_pos: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must have shape (B, C, H, W), got {shape_str(x.shape)}")
        b, c, h, w = x.shape
        if not torch.jit.is_scripting():  # TorchScript compiles the torch path only (the same values)
            if self.uses_fused_kernel(x, relative_pos):
                nodes = x.reshape(b, c, -1, 1)
                relative = kernels.threshold_max_relative(nodes, self.threshold)
                return self.gconv.nn(interleave_channels(nodes, relative)).reshape(b, -1, h, w)
            if self.graph == "threshold" and self.threshold is not None and self._blocked_threshold():
                # the threshold mask in blocks of centres, never whole (B, N, M)
                y = reduced_keys(x, self.r)
                rows = ThresholdRows(x, self.threshold, y=y, relative_pos=relative_pos, resize_table=True)
                nodes = x.reshape(b, c, -1, 1)
                keys = None if y is None else y.reshape(b, c, -1, 1)
                return self.gconv.forward_rows(nodes, rows, keys).reshape(b, -1, h, w)
        y = reduced_keys(x, self.r)
        graph = self.build_graph(x, y, relative_pos)
        nodes = x.reshape(b, c, -1, 1)
        keys = None if y is None else y.reshape(b, c, -1, 1)
        return self.gconv(nodes, graph, keys).reshape(b, -1, h, w)

    @torch.jit.unused
    def _blocked_threshold(self) -> bool:
        """Whether the threshold graph is consumed block by block of centres (memory linear in N). The whole
        (B, N, M) mask is built instead under torch.export (its program converts to ONNX), in TorchScript, and
        when hooks on ``gconv`` expect to see the graph tensor (`vig.tools.export.WithGraphs`)."""
        return not (torch.compiler.is_exporting() or self.gconv._forward_pre_hooks or self.gconv._forward_hooks)

    def extra_repr(self) -> str:
        if self.graph == "threshold":
            return f"conv={self.conv}, graph=threshold, t={self.threshold}, r={self.r}"
        return f"conv={self.conv}, graph=knn, k={self.k}, dilation={self.dilation}, r={self.r}"


def capped_knn(k: int, dilation: int, num_keys: int) -> tuple[int, int]:
    """(k, dilation) of a kNN graph over ``num_keys`` key nodes: unchanged when k * dilation <= num_keys,
    else k' = min(k, num_keys) and dilation' = min(dilation, num_keys // k'), so that k' * dilation' <= num_keys.

    A model built for large maps thus runs on smaller ones (fewer nodes than its schedule asks for);
    each distinct cap is logged once per process as a warning (by eager code; scripted code cannot log).
    """
    if k * dilation <= num_keys:
        return k, dilation
    capped_k = min(k, num_keys)
    capped_dilation = max(1, min(dilation, num_keys // capped_k))
    if not torch.jit.is_scripting():
        _log_cap_once((k, dilation, num_keys, capped_k, capped_dilation))
    return capped_k, capped_dilation


def _log_cap_once(cap: tuple[int, int, int, int, int]) -> None:
    """Warn of a run-time kNN cap (k, dilation, num_keys, k', dilation') unless this process has already."""
    if cap not in _logged_caps:
        _logged_caps.add(cap)
        k, dilation, num_keys, capped_k, capped_dilation = cap
        _logger.warning("%d key nodes cap the kNN graph at run time: (k, dilation) (%d, %d) -> (%d, %d)",
                        num_keys, k, dilation, capped_k, capped_dilation)


def _refuse_knn_arguments(**given: object) -> None:
    """ValueError naming the first `KNN_ONLY` argument of ``given`` that differs from DynConv2d's default."""
    defaults = inspect.signature(DynConv2d.__init__).parameters
    for name, value in given.items():
        if value != defaults[name].default:
            raise ValueError(f"graph='threshold' does not use {name}={value!r} ({KNN_ONLY[name]}); "
                             f"leave {name} at its default {defaults[name].default!r}")
