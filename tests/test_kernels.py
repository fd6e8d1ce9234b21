"""The fused threshold kernel, run by Triton's CPU interpreter, against the torch oracle."""
from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")

from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

from gcn_lib import DynConv2d, interleave_channels, max_relative_dense, threshold_mask  # noqa: E402


@pytest.fixture(scope="module")
def kernels():
    """gcn_lib.kernels with Triton's CPU interpreter on (tests/conftest.py sets TRITON_INTERPRET)."""
    module = importlib.import_module("gcn_lib.kernels")
    if not module.interpreted():
        pytest.skip("Triton was imported before TRITON_INTERPRET=1 was set; run through tests/conftest.py")
    if not module.interpreter_works():
        import numpy
        import triton
        pytest.skip(f"Triton {triton.__version__}'s interpreter fails under NumPy {numpy.__version__} "
                    "(triton-lang/triton#9171); a newer triton runs these tests")
    return module


def _oracle(x: torch.Tensor, t: float) -> torch.Tensor:
    return max_relative_dense(x, threshold_mask(x, t))


# N and C chosen to leave partial blocks (the kernel tiles 16 centres x 32 channels x 32 keys).
@pytest.mark.parametrize("t", [0.95, 0.89, 0.5, 0.1, 0.0, -1.0])
@pytest.mark.parametrize("shape", [(2, 40, 50), (1, 8, 7), (3, 33, 64)])
def test_forward_matches_oracle_float32(kernels, t, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, 1, generator=gen)
    torch.testing.assert_close(kernels.threshold_max_relative(x, t), _oracle(x, t), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_matches_oracle_half(kernels, dtype):
    x = torch.randn(2, 24, 36, 1, generator=torch.Generator().manual_seed(4)).to(dtype)
    out = kernels.threshold_max_relative(x, 0.8)
    assert out.dtype == dtype
    torch.testing.assert_close(out, _oracle(x, 0.8), rtol=0, atol=0)


def _assert_kernel_sees_oracle_mask(kernels, x: torch.Tensor, t: float) -> None:
    """Every arg-max the kernel keeps for x (B, C, N) is an edge of the oracle mask, and its value is the row
    maximum; a node has an arg-max exactly where the mask gives it a neighbour."""
    b = x.shape[0]
    mask = threshold_mask(x.unsqueeze(-1), t)
    sim, mean, std = kernels.similarity_stats(x.unsqueeze(-1))
    out, arg = kernels._launch(x.contiguous(), sim.float(), mean.float().reshape(b), std.float().reshape(b),
                               kernels.threshold_quantile(t), False)
    has_neighbour = mask.any(-1)  # (B, N)
    assert torch.equal(arg >= 0, has_neighbour.unsqueeze(1).expand_as(arg))
    b_idx, c_idx, i_idx = (arg >= 0).nonzero(as_tuple=True)
    j_idx = arg[b_idx, c_idx, i_idx].long()
    assert mask[b_idx, i_idx, j_idx].all()
    row_max = x.unsqueeze(2).masked_fill(~mask.unsqueeze(1), float("-inf")).amax(-1)
    torch.testing.assert_close(x[b_idx, c_idx, j_idx], row_max[b_idx, c_idx, i_idx], rtol=0, atol=0)


def test_kernel_sees_the_oracle_mask(kernels):
    _assert_kernel_sees_oracle_mask(kernels, torch.randn(2, 16, 45, generator=torch.Generator().manual_seed(5)), 0.9)


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # 0 / 0 spread
def test_empty_graph_gives_zero(kernels):
    x = torch.full((2, 8, 20, 1), 0.5)
    assert not threshold_mask(x, 0.5).any()
    out = kernels.threshold_max_relative(x, 0.5)
    assert torch.equal(out, torch.zeros_like(out))


def test_backward_matches_oracle(kernels):
    gen = torch.Generator().manual_seed(6)
    # Distinct values: no ties, so the arg-max route and amax's tie-splitting agree.
    base = (torch.randperm(2 * 12 * 30, generator=gen).float() / 50).reshape(2, 12, 30, 1)
    grad = torch.randn(2, 12, 30, 1, generator=gen)
    x1 = base.clone().requires_grad_()
    kernels.threshold_max_relative(x1, 0.8).backward(grad)
    x2 = base.clone().requires_grad_()
    _oracle(x2, 0.8).backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)


def _exact_case(b: int, c: int, n: int, dtype: torch.dtype, device: str,
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (B, C, N, 1) whose N values per (image, channel) are distinct multiples of 1/64 below 4, and an
    output gradient of -1 / 0 / 1: every difference, maximum and gradient sum (at most N + 1 <= 256 terms) is
    exact in float32, float16 and bfloat16, so kernel and oracle must agree bit for bit in each dtype."""
    assert n <= 255
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, n, generator=gen).argsort(-1).float().div(64).unsqueeze(-1)
    grad = torch.randint(-1, 2, (b, c, n, 1), generator=gen).float()
    return x.to(device, dtype), grad.to(device, dtype)


def _assert_exact_forward_backward(threshold_max_relative, x: torch.Tensor, grad: torch.Tensor, t: float) -> None:
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    out = threshold_max_relative(x1, t)
    ref = _oracle(x2, t)
    assert out.dtype == x.dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_and_backward_exact_in_each_dtype(kernels, dtype):
    x, grad = _exact_case(2, 8, 40, dtype, "cpu", seed=9)
    _assert_exact_forward_backward(kernels.threshold_max_relative, x, grad, 0.89)


def test_separate_graph_features(kernels):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 8, 25, 1, generator=gen)
    feats = torch.randn(2, 6, 5, 5, generator=gen)
    expected = max_relative_dense(x, threshold_mask(feats, 0.7))
    torch.testing.assert_close(kernels.threshold_max_relative(x, 0.7, feats), expected, rtol=1e-5, atol=0)


def test_dynamic_conv_dispatches_to_kernel(kernels, monkeypatch):
    """With the kernel available (as on CUDA), DynConv2d takes it and agrees with the torch path."""
    torch.manual_seed(0)
    fused = DynConv2d(16, 32, graph="threshold", threshold=0.85, act="gelu", norm="batch").eval()
    plain = DynConv2d(16, 32, graph="threshold", threshold=0.85, act="gelu", norm="batch",
                      fused_kernel=False).eval()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 16, 6, 6)
    assert not fused.uses_fused_kernel(x)  # CPU tensors take the torch path
    monkeypatch.setattr(kernels, "available", kernels.runnable)
    calls = []
    original = kernels.threshold_max_relative
    monkeypatch.setattr(kernels, "threshold_max_relative", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert fused.uses_fused_kernel(x) and not plain.uses_fused_kernel(x)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-6)
    assert calls == [1]


def test_kernel_not_used_where_it_cannot_run(kernels, monkeypatch):
    monkeypatch.setattr(kernels, "available", kernels.runnable)
    layer = DynConv2d(16, 32, graph="threshold", threshold=0.85)
    assert not layer.uses_fused_kernel(torch.randn(1, 16, 4, 4, dtype=torch.float64))
    assert not DynConv2d(16, 32, kernel_size=3).uses_fused_kernel(torch.randn(1, 16, 4, 4))
    assert not DynConv2d(16, 32, conv="gin", graph="threshold", threshold=0.5).uses_fused_kernel(torch.randn(1, 16, 4, 4))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not kernels.runnable(torch.randn(1, 16, 4, 4))  # CPU tensor, no interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.runnable(torch.randn(1, 16, 4, 4))
    monkeypatch.setattr(kernels, "interpreter_works", lambda: False)  # triton-lang/triton#9171
    assert not kernels.runnable(torch.randn(1, 16, 4, 4))
    assert not layer.uses_fused_kernel(torch.randn(1, 16, 4, 4))
    with pytest.raises(ValueError, match="fused kernel needs"):
        kernels.threshold_max_relative(torch.randn(1, 16, 4, 1), 0.5)


def test_interpreter_probe_counts_the_loop_and_reports_a_failing_interpreter(kernels, monkeypatch, caplog):
    assert kernels._probe_interpreter()

    class FailingLaunch:
        def __getitem__(self, grid):
            def launch(*args):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return launch

    monkeypatch.setattr(kernels, "_count_loop_kernel", FailingLaunch())
    with caplog.at_level("DEBUG", logger="gcn_lib.kernels"):
        assert not kernels._probe_interpreter()
    assert "triton-lang/triton#9171" in caplog.text and "torch path" in caplog.text


# --- torch.compile ----------------------------------------------------------------------------------------
# The kernel is the custom operator gcn_lib::threshold_max. On CPU the compile tests use the "aot_eager"
# backend: it captures the same forward and backward graphs (dynamo + AOTAutograd, through the operator's fake
# implementation and registered backward) that inductor compiles, and runs the operator, hence the kernel in
# Triton's interpreter; inductor works too on CPU but spends about a minute generating C++ for the
# surrounding ops of one layer on the 2-core CI machine. The CUDA tests below use inductor.

def _graph_calls_kernel(backend: CompileCounterWithBackend) -> bool:
    return any(node.target is torch.ops.gcn_lib.threshold_max.default
               for graph in backend.graphs for node in graph.graph.nodes)


@pytest.mark.parametrize("t", [0.89, -1.0])
def test_compiled_kernel_matches_eager_and_oracle(kernels, t):
    torch._dynamo.reset()
    x, grad = _exact_case(2, 8, 40, torch.float32, "cpu", seed=10)
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(kernels.threshold_max_relative, backend=backend, fullgraph=True)
    _assert_exact_forward_backward(compiled, x, grad, t)
    assert backend.frame_count == 1 and _graph_calls_kernel(backend)


def test_compiled_dynamic_conv_takes_the_kernel(kernels, monkeypatch):
    """DynConv2d dispatching to the kernel compiles as one graph with the operator in it, same values and
    gradients as the eager kernel path and the torch path."""
    torch._dynamo.reset()
    monkeypatch.setattr(kernels, "available", kernels.runnable)
    torch.manual_seed(0)
    fused = DynConv2d(16, 32, graph="threshold", threshold=0.85, act="gelu", norm="batch")
    plain = DynConv2d(16, 32, graph="threshold", threshold=0.85, act="gelu", norm="batch", fused_kernel=False)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 16, 6, 6)
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fused, backend=backend, fullgraph=True)
    results = []
    for module in (compiled, fused, plain):
        inputs = x.clone().requires_grad_()
        out = module(inputs)
        results.append((out, *torch.autograd.grad(out.square().sum(), [inputs, *module.parameters()])))
    assert backend.frame_count == 1 and _graph_calls_kernel(backend)
    for other in results[1:]:
        for got, expected in zip(results[0], other):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --- CUDA (pytest -m cuda; skipped without a GPU) --------------------------------------------------------
# The sizes of ViG-Ti at 224 x 224 and batch 128: C = 192 channels, N = 14 * 14 nodes, t = 0.89.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_forward_and_backward_match_oracle(dtype):
    from gcn_lib import kernels as cuda_kernels

    x, grad = _exact_case(128, 192, 196, dtype, "cuda", seed=8)
    _assert_exact_forward_backward(cuda_kernels.threshold_max_relative, x, grad, 0.89)


@pytest.mark.cuda
@needs_cuda
def test_cuda_kernel_sees_the_oracle_mask():
    from gcn_lib import kernels as cuda_kernels

    gen = torch.Generator().manual_seed(11)
    _assert_kernel_sees_oracle_mask(cuda_kernels, torch.randn(128, 192, 196, generator=gen).cuda(), 0.89)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_compiled_dynamic_conv_matches_eager(dtype):
    """Inductor with the kernel inside a fullgraph-compiled layer: one graph, the operator in it, eager's values."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = DynConv2d(192, 384, graph="threshold", threshold=0.89, act="gelu", norm="batch").cuda()
    x = torch.randn(128, 192, 14, 14, device="cuda")
    assert layer.uses_fused_kernel(x)
    backend = CompileCounterWithBackend("inductor")
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    results = []
    for module in (compiled, layer):
        inputs = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = module(inputs)
        results.append((out.float(), *torch.autograd.grad(out.float().square().mean(), inputs)))
    assert backend.frame_count == 1 and _graph_calls_kernel(backend)
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, **tolerance)


@pytest.mark.parametrize("r, with_relative", [(2, False), (4, False), (2, True), (1, True)])
def test_rectangular_threshold_graph_falls_back_to_torch(kernels, monkeypatch, r, with_relative):
    """The kernel is square-only: pooled keys (r > 1) or a relative_pos take the torch path, even where the
    kernel is available, and give the torch oracle's values; the square case still takes the kernel."""
    monkeypatch.setattr(kernels, "available", kernels.runnable)
    calls = []
    original = kernels.threshold_max_relative
    monkeypatch.setattr(kernels, "threshold_max_relative", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.manual_seed(1)
    layer = DynConv2d(16, 32, graph="threshold", threshold=0.8, r=r, act="gelu", norm="batch").eval()
    x = torch.randn(2, 16, 8, 8)
    m = 64 // (r * r)
    relative = -torch.rand(1, 64, m) if with_relative else None
    assert kernels.runnable(x) and not layer.uses_fused_kernel(x, relative)
    keys = torch.nn.functional.avg_pool2d(x, r, r)
    mask = threshold_mask(x, 0.8, y=keys, relative_pos=relative)
    relative_max = max_relative_dense(x.reshape(2, 16, 64, 1), mask, keys.reshape(2, 16, m, 1))
    expected = layer.gconv.nn(interleave_channels(x.reshape(2, 16, 64, 1), relative_max)).reshape(2, 32, 8, 8)
    torch.testing.assert_close(layer(x, relative), expected, rtol=1e-5, atol=1e-6)
    assert calls == []
    square = DynConv2d(16, 32, graph="threshold", threshold=0.8).eval()
    assert square.uses_fused_kernel(x)
    square(x)
    assert calls == [1]
