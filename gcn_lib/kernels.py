"""Fused Triton kernel for max-relative aggregation over the similarity-threshold graph (GPU path).

The published SViG code builds an edge list with ``nonzero()`` (a host synchronisation) and runs
scatter/gather kernels over a (C, E) message tensor. Here one kernel does, per image, block of
centre nodes and block of channels:

    for every key block j:   edge(i, j) = (s(i, j) - mean_b) / std_b > q      (or true for t <= 0)
                             best(i, c) = max(best(i, c), max_{j: edge} x(c, j))
    m(c, i) = best(i, c) - x(c, i)   if i has any neighbour, else 0

reading the (B, N, N) similarity matrix and the features once, never materialising the
(B, C, N, N) tensor, a mask or an edge list, with no host synchronisation. The similarity and its
per-image statistics come from `gcn_lib.graph.similarity_stats`, the same tensors the torch
oracle `threshold_mask` thresholds with the same float operations, so both see the same graph.
The backward pass routes each output gradient to the saved arg-max neighbour and subtracts it at
the centre.

The launch is the torch operator ``gcn_lib::threshold_max`` (``torch.library.custom_op`` with a fake
implementation and a registered backward), so ``torch.compile(..., fullgraph=True)`` captures it
in forward and backward graphs without a graph break and calls the kernel at run time. It is an
opaque operator rather than a ``torch.library.triton_op``: inductor does not fuse into it either way,
and a ``triton_op`` body cannot be traced when ``TRITON_INTERPRET=1`` (``wrap_triton`` then hands
back the raw interpreted kernel), so the compiled path could not be tested on the CPU.

Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is first imported) runs the kernel
on CPU tensors when called directly, which is how the tests check its logic without a GPU (where
`interpreter_works`: Triton 3.6.0's interpreter fails under NumPy 2.4 and later);
`gcn_lib.DynConv2d` dispatches to it on CUDA tensors only, and only for the square graph: pyramid ViG's
rectangular graph (keys pooled by r > 1, or a relative_pos term) takes the torch path.
"""
from __future__ import annotations

import logging
import os

import torch

from .graph import check_threshold, similarity_stats, threshold_quantile

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with the CUDA builds of torch
    triton = None

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

log = logging.getLogger(__name__)


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(x: torch.Tensor) -> bool:
    """Whether `gcn_lib.DynConv2d` aggregates ``x`` with the kernel: Triton present and a CUDA
    float32 / float16 / bfloat16 tensor."""
    return triton is not None and x.is_cuda and x.dtype in _KERNEL_DTYPES


def runnable(x: torch.Tensor) -> bool:
    """Whether the kernel can run on ``x`` at all: `available`, or a CPU float tensor under an interpreter
    that `interpreter_works`."""
    if triton is None or x.dtype not in _KERNEL_DTYPES:
        return False
    return x.is_cuda or (interpreted() and x.device.type == "cpu" and interpreter_works())


def interpreter_works() -> bool:
    """Whether Triton's CPU interpreter can run a loop bounded by a runtime integer, as the kernel's key loop is.

    Triton 3.6.0's interpreter (the one torch 2.11 installs) turns a (1,)-shaped NumPy array into a Python
    int for ``range``, which NumPy 2.4 and later refuse (triton-lang/triton#9171); Triton 3.8.0 works. Where
    it fails, CPU tensors take the torch path (logged at debug level). Probed once, at import under
    ``TRITON_INTERPRET=1``, so that torch.compile reads a constant rather than tracing a kernel launch;
    False without the interpreter.
    """
    return _INTERPRETER_WORKS


if triton is not None:

    @triton.jit
    def _count_loop_kernel(count_ptr, bound):
        """Probe for `interpreter_works`: stores the trip count of ``range(0, bound)``."""
        total = 0
        for _ in range(0, bound):
            total += 1
        tl.store(count_ptr, total)

    @triton.jit
    def _threshold_max_kernel(
        x_ptr, sim_ptr, mean_ptr, std_ptr, out_ptr, arg_ptr,
        q, num_nodes, num_channels,
        COMPLETE: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
    ):
        b = tl.program_id(0)
        offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        valid_i = offs_i < num_nodes
        valid_c = offs_c < num_channels
        x_base = x_ptr + b * num_channels * num_nodes
        sim_base = sim_ptr + b * num_nodes * num_nodes
        mean = tl.load(mean_ptr + b)
        std = tl.load(std_ptr + b)

        best = tl.full((BLOCK_I, BLOCK_C), float("-inf"), tl.float32)
        best_j = tl.full((BLOCK_I, BLOCK_C), -1, tl.int32)
        for j0 in range(0, num_nodes, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            valid_j = offs_j < num_nodes
            if COMPLETE:
                edge = valid_i[:, None] & valid_j[None, :]
            else:
                s = tl.load(sim_base + offs_i[:, None] * num_nodes + offs_j[None, :],
                            mask=valid_i[:, None] & valid_j[None, :], other=0.0)
                edge = (tl.math.div_rn(s - mean, std) > q) & valid_j[None, :]
            keys = tl.load(x_base + offs_c[:, None] * num_nodes + offs_j[None, :],
                           mask=valid_c[:, None] & valid_j[None, :], other=0.0).to(tl.float32)
            cand = tl.where(edge[:, None, :], keys[None, :, :], float("-inf"))
            tile_max = tl.max(cand, axis=2)
            tile_arg = tl.argmax(cand, axis=2).to(tl.int32) + j0
            better = tile_max > best
            best = tl.where(better, tile_max, best)
            best_j = tl.where(better, tile_arg, best_j)

        out_offs = offs_c[None, :] * num_nodes + offs_i[:, None]
        io_mask = valid_i[:, None] & valid_c[None, :]
        centre = tl.load(x_base + out_offs, mask=io_mask, other=0.0).to(tl.float32)
        result = tl.where(best_j >= 0, best - centre, 0.0)
        out_base = b * num_channels * num_nodes
        tl.store(out_ptr + out_base + out_offs, result, mask=io_mask)
        tl.store(arg_ptr + out_base + out_offs, best_j, mask=io_mask)


def _probe_interpreter() -> bool:
    """Run `_count_loop_kernel` in the interpreter; log once and answer False if it fails."""
    if triton is None or not interpreted():
        return False
    count = torch.zeros(1, dtype=torch.int32)
    try:
        _count_loop_kernel[(1,)](count, 3)
    except Exception as err:  # the interpreter wraps whatever NumPy raised in its own InterpreterError
        log.debug("Triton %s's interpreter cannot run the fused kernel (%s; triton-lang/triton#9171): "
                  "CPU tensors take the torch path; a newer triton fixes it", triton.__version__, err)
        return False
    return int(count) == 3


_INTERPRETER_WORKS = _probe_interpreter()


def _launch(x: torch.Tensor, sim: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, q: float,
            complete: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, C, N) contiguous; sim (B, N, N) float32 -> m (B, C, N) in x's dtype, arg-max (B, C, N) int32.

    The body of the ``gcn_lib::threshold_max`` operator. The kernel writes float32 and torch rounds
    to x's dtype (to nearest even, as the oracle's half-precision subtraction does; Triton's
    interpreter would truncate).
    """
    b, c, n = x.shape
    out = torch.empty((b, c, n), dtype=torch.float32, device=x.device)
    arg = torch.empty((b, c, n), dtype=torch.int32, device=x.device)
    block_i, block_c, block_j = 16, 32, 32
    grid = (b, triton.cdiv(n, block_i), triton.cdiv(c, block_c))
    _threshold_max_kernel[grid](
        x, sim, mean, std, out, arg, q, n, c,
        COMPLETE=complete, BLOCK_I=block_i, BLOCK_C=block_c, BLOCK_J=block_j,
    )
    return out.to(x.dtype), arg


def _launch_shapes(x: torch.Tensor, sim: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, q: float,
                   complete: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake implementation of ``gcn_lib::threshold_max`` for tracing: outputs of the right shape and dtype."""
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.int32)


def _route_gradient(grad_out: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
    """Gradient of m = x[arg] - x with respect to x: grad_out (B, C, N) to the arg-max neighbour, minus at
    the centre; nothing where a node has no neighbour (arg < 0)."""
    routed = torch.where(arg >= 0, grad_out, torch.zeros_like(grad_out))
    return (-routed).scatter_add(2, arg.clamp_min(0).long(), routed)


def _save_arg(ctx, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
    ctx.save_for_backward(output[1])


def _threshold_max_backward(ctx, grad_out: torch.Tensor, grad_arg: torch.Tensor | None) -> tuple:
    (arg,) = ctx.saved_tensors
    return _route_gradient(grad_out, arg), None, None, None, None, None


if triton is not None:
    # An opaque torch operator around the kernel launch, with a fake implementation and a torch backward:
    # torch.compile traces a call to it (forward and backward) without a graph break and runs the kernel
    # at run time, on the GPU or, under TRITON_INTERPRET=1, in the interpreter on CPU tensors.
    threshold_max = torch.library.custom_op("gcn_lib::threshold_max", _launch, mutates_args=())
    threshold_max.register_fake(_launch_shapes)
    threshold_max.register_autograd(_threshold_max_backward, setup_context=_save_arg)


def threshold_max_relative(x: torch.Tensor, t: float, graph_features: torch.Tensor | None = None) -> torch.Tensor:
    """Max-relative aggregation over the threshold graph with the fused kernel.

    Args:
        x: (B, C, N, 1) features to aggregate (float32, float16 or bfloat16).
        t: threshold below 1; t <= 0 is the complete graph.
        graph_features: (B, C', H, W) or (B, C', N, 1) features the graph is built from; default x.

    Returns:
        m (B, C, N, 1) = max over the neighbours j of i of (x_j - x_i); 0 where i has none.
    """
    check_threshold(t)
    if not runnable(x):
        raise ValueError(f"the fused kernel needs Triton and a CUDA float tensor, got {x.dtype} on {x.device}")
    if x.dim() != 4 or x.shape[-1] != 1:
        raise ValueError(f"x must have shape (B, C, N, 1), got {tuple(x.shape)}")
    b, c, n, _ = x.shape
    complete = t <= 0
    if complete:
        sim = torch.empty(b, 1, 1, dtype=torch.float32, device=x.device)
        mean = std = torch.zeros(b, dtype=torch.float32, device=x.device)
        q = 0.0
    else:
        sim, mean, std = similarity_stats(x if graph_features is None else graph_features)
        if sim.shape[1] != n:
            raise ValueError(f"graph_features have {sim.shape[1]} nodes, x has {n}")
        sim, mean, std = sim.float().contiguous(), mean.float().reshape(b), std.float().reshape(b)
        q = threshold_quantile(t)
    out, _ = threshold_max(x.reshape(b, c, n).contiguous(), sim, mean, std, q, complete)
    return out.reshape(b, c, n, 1)
