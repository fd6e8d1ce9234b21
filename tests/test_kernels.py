"""The fused threshold kernel, run by Triton's CPU interpreter, against the torch oracle."""
from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")

from gcn_lib import DynConv2d, max_relative_dense, threshold_mask  # noqa: E402


@pytest.fixture(scope="module")
def kernels():
    """gcn_lib.kernels with Triton's CPU interpreter on (tests/conftest.py sets TRITON_INTERPRET)."""
    module = importlib.import_module("gcn_lib.kernels")
    if not module.interpreted():
        pytest.skip("Triton was imported before TRITON_INTERPRET=1 was set; run through tests/conftest.py")
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


def test_kernel_sees_the_oracle_mask(kernels):
    """Every arg-max the kernel keeps is an edge of the oracle mask, and its value is the row maximum."""
    x = torch.randn(2, 16, 45, generator=torch.Generator().manual_seed(5))
    mask = threshold_mask(x.unsqueeze(-1), 0.9)
    sim, mean, std = kernels.similarity_stats(x.unsqueeze(-1))
    out, arg = kernels._launch(x.contiguous(), sim, mean.reshape(2), std.reshape(2), kernels.threshold_quantile(0.9), False)
    has_neighbour = mask.any(-1)  # (B, N)
    assert torch.equal(arg >= 0, has_neighbour.unsqueeze(1).expand_as(arg))
    b_idx, c_idx, i_idx = (arg >= 0).nonzero(as_tuple=True)
    j_idx = arg[b_idx, c_idx, i_idx].long()
    assert mask[b_idx, i_idx, j_idx].all()
    row_max = x.unsqueeze(2).masked_fill(~mask.unsqueeze(1), float("-inf")).amax(-1)
    torch.testing.assert_close(x[b_idx, c_idx, j_idx], row_max[b_idx, c_idx, i_idx], rtol=0, atol=0)


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
    plain = DynConv2d(16, 32, graph="threshold", threshold=0.85, act="gelu", norm="batch", kernel=False).eval()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 16, 6, 6)
    assert not fused.uses_kernel(x)  # CPU tensors take the torch path
    monkeypatch.setattr(kernels, "available", kernels.runnable)
    calls = []
    original = kernels.threshold_max_relative
    monkeypatch.setattr(kernels, "threshold_max_relative", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert fused.uses_kernel(x) and not plain.uses_kernel(x)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-6)
    assert calls == [1]


def test_kernel_not_used_where_it_cannot_run(kernels, monkeypatch):
    monkeypatch.setattr(kernels, "available", kernels.runnable)
    layer = DynConv2d(16, 32, graph="threshold", threshold=0.85)
    assert not layer.uses_kernel(torch.randn(1, 16, 4, 4, dtype=torch.float64))
    assert not DynConv2d(16, 32, kernel_size=3).uses_kernel(torch.randn(1, 16, 4, 4))
    assert not DynConv2d(16, 32, conv="gin", graph="threshold", threshold=0.5).uses_kernel(torch.randn(1, 16, 4, 4))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not kernels.runnable(torch.randn(1, 16, 4, 4))  # CPU tensor, no interpreter
    with pytest.raises(ValueError, match="fused kernel needs"):
        kernels.threshold_max_relative(torch.randn(1, 16, 4, 1), 0.5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_forward_and_backward_match_oracle(dtype):
    from gcn_lib import kernels as cuda_kernels

    gen = torch.Generator().manual_seed(8)
    base = (torch.randperm(8 * 192 * 196, generator=gen).float() / 1000).reshape(8, 192, 196, 1)
    x1 = base.to("cuda", dtype).requires_grad_()
    x2 = base.to("cuda", dtype).requires_grad_()
    out = cuda_kernels.threshold_max_relative(x1, 0.89)
    ref = _oracle(x2, 0.89)
    torch.testing.assert_close(out, ref, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x1.grad.float(), x2.grad.float(), rtol=1e-5, atol=1e-5)
