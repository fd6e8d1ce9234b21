"""The max-relative forms agree exactly; gradients are right; graphs carry no gradient."""
from __future__ import annotations

import pytest
import torch

from gcn_lib import (DynConv2d, GINConv2d, MRConv2d, dense_knn, knn_to_edge_index, knn_to_mask, mask_to_edge_index,
                     masked_key_max, max_relative_dense, max_relative_gather, max_relative_ranked, max_relative_scatter,
                     threshold_mask)
from gcn_lib import aggregate
from gcn_lib import conv as conv_module


def _random_mask(b: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """A random graph whose per-node degree varies from 0 to n."""
    density = torch.rand(b, n, 1, generator=gen)
    return torch.rand(b, n, n, generator=gen) < density


def _brute_max_relative(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """m_i = max over neighbours j of (x_j - x_i): the keyed loop below with the nodes as keys."""
    return _brute_max_relative_keys(x, x, mask)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_three_forms_agree_on_random_graphs(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    b, c, n = 3, 5, 11
    x = torch.randn(b, c, n, 1, generator=gen).to(dtype)
    mask = _random_mask(b, n, gen)
    dense = max_relative_dense(x, mask)
    scatter = max_relative_scatter(x, mask_to_edge_index(mask))
    torch.testing.assert_close(dense, scatter, rtol=0, atol=0)
    if dtype == torch.float64:
        torch.testing.assert_close(dense, _brute_max_relative(x, mask), rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 4, 9])
def test_gather_agrees_with_mask_and_edges(seed, k):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 16, 1, generator=gen, dtype=torch.float64)
    idx = torch.stack([torch.stack([torch.randperm(16, generator=gen)[:k] for _ in range(16)]) for _ in range(2)])
    gathered = max_relative_gather(x, idx)
    torch.testing.assert_close(gathered, max_relative_dense(x, knn_to_mask(idx)), rtol=0, atol=0)
    torch.testing.assert_close(gathered, max_relative_scatter(x, knn_to_edge_index(idx)), rtol=0, atol=0)


def test_gather_with_separate_keys():
    x = torch.randn(2, 3, 6, 1, dtype=torch.float64)
    y = torch.randn(2, 3, 4, 1, dtype=torch.float64)
    idx = torch.tensor([[[0, 3], [1, 1], [2, 0], [3, 2], [0, 1], [2, 3]]] * 2)
    expected = torch.stack([y[:, :, idx[0, i], 0].amax(-1) for i in range(6)], dim=-1).unsqueeze(-1) - x
    torch.testing.assert_close(max_relative_gather(x, idx, y), expected, rtol=0, atol=0)


def test_empty_graph_aggregates_to_zero_without_nan():
    x = torch.full((2, 4, 9, 1), 3.0, dtype=torch.float64, requires_grad=True)
    mask = threshold_mask(x.reshape(2, 4, 3, 3), 0.5)
    assert not mask.any()
    dense = max_relative_dense(x, mask)
    scatter = max_relative_scatter(x, mask_to_edge_index(mask))
    assert torch.equal(dense, torch.zeros_like(dense)) and torch.equal(scatter, torch.zeros_like(scatter))
    dense.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_threshold_graph_equals_complete_knn_at_non_positive_t():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    complete = dense_knn(x, 9)
    nodes = x.reshape(2, 4, 9, 1)
    torch.testing.assert_close(max_relative_dense(nodes, threshold_mask(x, 0.0)), max_relative_gather(nodes, complete))


def _distinct_input(b: int, c: int, n: int, seed: int) -> torch.Tensor:
    """Well-spread values so that no max is tied (gradcheck needs a differentiable point)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randperm(b * c * n, generator=gen).double() / 7).reshape(b, c, n, 1).requires_grad_()


@pytest.mark.parametrize("form", ["gather", "dense", "scatter"])
def test_gradcheck_float64(form):
    x = _distinct_input(2, 3, 7, seed=1)
    gen = torch.Generator().manual_seed(2)
    mask = _random_mask(2, 7, gen)
    idx = torch.stack([torch.stack([torch.randperm(7, generator=gen)[:3] for _ in range(7)]) for _ in range(2)])
    fn = {
        "gather": lambda t: max_relative_gather(t, idx),
        "dense": lambda t: max_relative_dense(t, mask),
        "scatter": lambda t: max_relative_scatter(t, mask_to_edge_index(mask)),
    }[form]
    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("graph,kwargs", [("knn", {"kernel_size": 4, "dilation": 2}), ("threshold", {"threshold": 0.7})])
def test_gradient_does_not_reach_graph_construction(graph, kwargs):
    """The gradient equals that of the same convolution over a constant, precomputed graph."""
    torch.manual_seed(0)
    conv = DynConv2d(8, 16, graph=graph, norm="batch", act="gelu", **kwargs).double().eval()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    conv(x).square().sum().backward()
    grad_dynamic = x.grad.clone()

    fixed = conv.build_graph(x.detach())
    x.grad = None
    conv.gconv(x.reshape(2, 8, 16, 1), fixed).square().sum().backward()
    torch.testing.assert_close(grad_dynamic, x.grad, rtol=0, atol=0)


@pytest.mark.parametrize("fn,args,match", [
    (max_relative_gather, (torch.randn(2, 3, 4), torch.zeros(2, 4, 1, dtype=torch.long)), r"\(B, C, N, 1\)"),
    (max_relative_gather, (torch.randn(2, 3, 4, 1), torch.zeros(3, 4, 1, dtype=torch.long)), "neighbours"),
    (max_relative_dense, (torch.randn(2, 3, 4, 1), torch.ones(2, 4, 4)), "bool"),
    (max_relative_dense, (torch.randn(2, 3, 4, 1), torch.ones(2, 4, 5, dtype=torch.bool)), "shape"),
    (max_relative_scatter, (torch.randn(2, 3, 4, 1), torch.tensor([[0], [8]])), "outside"),
])
def test_aggregation_rejects_bad_shapes(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


# --- Rectangular masks over separate keys (pyramid ViG's threshold graph) ---------------------------------

def _brute_max_relative_keys(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """m_i = max over neighbours j of (y_j - x_i) with a loop over (b, i, c); 0 where i has no neighbour."""
    b, c, n, _ = x.shape
    out = torch.zeros_like(x)
    for bb in range(b):
        for i in range(n):
            js = mask[bb, i].nonzero().flatten().tolist()
            for ch in range(c):
                if js:
                    out[bb, ch, i, 0] = max(float(y[bb, ch, j, 0] - x[bb, ch, i, 0]) for j in js)
    return out


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n,m", [(16, 4), (16, 1), (12, 12), (9, 20)])
@pytest.mark.parametrize("via", ["max_relative_dense", "MRConv2d.aggregate"])
def test_rectangular_mask_aggregation_matches_brute_force(seed, n, m, via):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, n, 1, generator=gen, dtype=torch.float64)
    y = torch.randn(2, 3, m, 1, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, n, m, generator=gen) < torch.rand(2, n, 1, generator=gen)
    mask[0, 0] = False  # at least one centre without neighbours
    expected = _brute_max_relative_keys(x, y, mask)
    if via == "max_relative_dense":
        got = max_relative_dense(x, mask, y)
    else:
        got = MRConv2d(4, 8).double().aggregate(x, mask, y)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_rectangular_gin_sums_the_masked_keys():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 9, 1, generator=gen, dtype=torch.float64)
    y = torch.randn(2, 4, 3, 1, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 9, 3, generator=gen) < 0.5
    conv = GINConv2d(4, 8).double().eval()
    x_sum = torch.zeros_like(x)
    for bb in range(2):
        for i in range(9):
            for j in mask[bb, i].nonzero().flatten().tolist():
                x_sum[bb, :, i] += y[bb, :, j]
    torch.testing.assert_close(conv(x, mask, y), conv.nn((1 + conv.eps) * x + x_sum))


def test_rectangular_dense_gradcheck_float64():
    x = _distinct_input(2, 3, 8, seed=3)
    y = _distinct_input(2, 3, 4, seed=4)
    mask = _random_mask(2, 8, torch.Generator().manual_seed(5))[:, :, :4]
    assert torch.autograd.gradcheck(lambda a, b: max_relative_dense(a, mask, b), (x, y))


@pytest.mark.parametrize("args,match", [
    ((torch.randn(2, 3, 4, 1), torch.ones(2, 4, 2, dtype=torch.bool), torch.randn(2, 3, 3, 1)), "mask must"),
    ((torch.randn(2, 3, 4, 1), torch.ones(2, 4, 2, dtype=torch.bool), torch.randn(2, 5, 2, 1)), "y must"),
])
def test_rectangular_dense_rejects_mismatched_keys(args, match):
    with pytest.raises(ValueError, match=match):
        max_relative_dense(*args)


# --- Ranked keys (max_relative_ranked): the CPU training path over threshold masks ------------------------

def _mask_of(kind: str, b: int, n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """Masks (B, N, M) of several densities; every kind but 'complete' has a centre without neighbours."""
    if kind == "complete":
        return torch.ones(b, n, m, dtype=torch.bool)
    if kind == "varied":  # per-centre degree from 0 to M
        mask = torch.rand(b, n, m, generator=gen) < torch.rand(b, n, 1, generator=gen)
    else:
        mask = torch.rand(b, n, m, generator=gen) < float(kind)
    mask[0, 0] = False
    return mask


@pytest.mark.parametrize("hits", [3.0, 0.01])  # 0.01: T = 1 ranked key, nearly every row takes the fallback scan
@pytest.mark.parametrize("kind", ["complete", "0.97", "varied", "0.1", "0.0"])
@pytest.mark.parametrize("n,m", [(12, 12), (9, 20), (16, 4)])
def test_ranked_matches_brute_force(n, m, kind, hits, monkeypatch):
    monkeypatch.setattr(aggregate, "_RANKED_HITS", hits)
    gen = torch.Generator().manual_seed(n * m)
    x = torch.randn(2, 3, n, 1, generator=gen, dtype=torch.float64)
    y = torch.randn(2, 3, m, 1, generator=gen, dtype=torch.float64)
    mask = _mask_of(kind, 2, n, m, gen)
    keys = y if n != m else None
    got = max_relative_ranked(x, mask, keys)
    torch.testing.assert_close(got, _brute_max_relative_keys(x, x if keys is None else y, mask), rtol=0, atol=0)
    torch.testing.assert_close(got, max_relative_dense(x, mask, keys), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ranked_forward_bit_identical_to_dense_in_each_dtype(dtype):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 16, 64, 1, generator=gen).to(dtype)  # half precision: many tied values
    mask = _mask_of("varied", 2, 64, 64, gen)
    out = max_relative_ranked(x, mask)
    assert out.dtype == dtype
    torch.testing.assert_close(out, max_relative_dense(x, mask), rtol=0, atol=0)
    torch.testing.assert_close(out, max_relative_scatter(x, mask_to_edge_index(mask)), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_req = x.float().requires_grad_()
        aggregated = max_relative_ranked(x_req.to(dtype), mask)
    aggregated.float().sum().backward()
    assert torch.isfinite(x_req.grad).all()


@pytest.mark.parametrize("rectangular", [False, True])
def test_ranked_gradcheck_float64(rectangular):
    x = _distinct_input(2, 3, 8, seed=3)
    mask = _random_mask(2, 8, torch.Generator().manual_seed(5))
    if rectangular:
        y = _distinct_input(2, 3, 5, seed=4)
        assert torch.autograd.gradcheck(lambda a, b: max_relative_ranked(a, mask[:, :, :5], b), (x, y))
    else:
        assert torch.autograd.gradcheck(lambda a: max_relative_ranked(a, mask), (x,))


@pytest.mark.parametrize("kind", ["complete", "varied", "0.1"])
def test_ranked_gradient_equals_amax_gradient_without_ties(kind):
    gen = torch.Generator().manual_seed(8)
    x = _distinct_input(3, 6, 40, seed=9)
    y = _distinct_input(3, 6, 10, seed=10)
    mask = _mask_of(kind, 3, 40, 40, gen)
    grad = torch.randn(3, 6, 40, 1, generator=gen, dtype=torch.float64)
    for args in ((mask,), (mask[:, :, :10], y)):
        ranked = torch.autograd.grad(max_relative_ranked(x, *args), [x, *args[1:]], grad)
        dense = torch.autograd.grad(max_relative_dense(x, *args), [x, *args[1:]], grad)
        for a, b in zip(ranked, dense):
            torch.testing.assert_close(a, b)


def test_ranked_gradient_goes_to_the_lowest_index_among_tied_maxima():
    """Keys with ties: each (centre, channel) gradient reaches one neighbour, the lowest-index maximal one."""
    gen = torch.Generator().manual_seed(12)
    b, c, n = 2, 4, 10
    x = torch.randint(0, 3, (b, c, n, 1), generator=gen).double().requires_grad_()
    mask = _mask_of("varied", b, n, n, gen)
    grad = torch.randn(b, c, n, 1, generator=gen, dtype=torch.float64)
    max_relative_ranked(x, mask).backward(grad)
    expected = torch.zeros(b, c, n, 1, dtype=torch.float64)
    for bb in range(b):
        for i in range(n):
            js = mask[bb, i].nonzero().flatten()
            if js.numel() == 0:
                continue
            for ch in range(c):
                values = x[bb, ch, js, 0]
                winner = js[(values == values.max()).nonzero()[0, 0]]
                expected[bb, ch, winner, 0] += grad[bb, ch, i, 0]
                expected[bb, ch, i, 0] -= grad[bb, ch, i, 0]
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("density,path", [(1.0, "ranked"), (0.5, "ranked"), (0.02, "scatter")])
def test_mr_conv_picks_the_mask_path_by_density(density, path, monkeypatch):
    calls = []
    for name in ("max_relative_ranked", "max_relative_scatter"):
        original = getattr(conv_module, name)
        monkeypatch.setattr(conv_module, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 3, 50, 1, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 50, 50, generator=gen) < density
    got = MRConv2d(4, 8).double().aggregate(x, mask)
    assert calls == [f"max_relative_{path}"]
    torch.testing.assert_close(got, max_relative_dense(x, mask), rtol=0, atol=0)


def test_masked_key_max_gradcheck_with_empty_rows():
    """The operator alone: values 0 and arg -1 for a centre without neighbours, and no gradient from it."""
    keys = _distinct_input(2, 3, 9, seed=14).reshape(2, 3, 9)
    mask = _mask_of("varied", 2, 7, 9, torch.Generator().manual_seed(15))
    values, arg = masked_key_max(keys, mask)
    assert torch.equal(arg[0, :, 0], torch.full((3,), -1)) and torch.equal(values[0, :, 0], torch.zeros(3).double())
    assert torch.autograd.gradcheck(lambda k: masked_key_max(k, mask)[0], (keys,))


# --- Neighbours gathered by degree (masked_key_max_by_degree): the CPU inference path over threshold blocks ---

@pytest.mark.parametrize("kind", ["complete", "0.97", "varied", "0.1", "0.0"])
@pytest.mark.parametrize("n,m", [(12, 12), (9, 20), (16, 4), (40, 40)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_by_degree_matches_brute_force(n, m, kind, dtype):
    """Exact maxima in every dtype, 0 for a row without neighbours; (40, 40) has rows longer than one pass."""
    gen = torch.Generator().manual_seed(n * m + 1)
    keys = torch.randn(2, 3, m, generator=gen, dtype=torch.float64).to(dtype)
    mask = _mask_of(kind, 2, n, m, gen)
    got = aggregate.masked_key_max_by_degree(keys, mask)
    expected = torch.zeros(2, 3, n, dtype=dtype)
    for image in range(2):
        for centre in range(n):
            picked = mask[image, centre].nonzero().flatten()
            if picked.numel():
                expected[image, :, centre] = keys[image][:, picked].amax(dim=1)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    ranked, _ = aggregate.masked_key_max(keys, mask)
    torch.testing.assert_close(got, ranked, rtol=0, atol=0)


@pytest.mark.parametrize("threshold", [0.3, 0.7, 0.95, 0.0])
def test_threshold_rows_take_the_same_values_with_and_without_a_gradient(threshold, monkeypatch):
    """`MRConv2d.aggregate_rows` takes neighbours by degree without a gradient and ranked keys or edges with one,
    in blocks of rows: the values agree bit for bit, with blocks of 5 rows and in one block."""
    from gcn_lib.graph import ThresholdRows
    import gcn_lib.graph

    conv = MRConv2d(6, 8)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 7, 7, generator=gen, dtype=torch.float64)
    nodes = x.reshape(2, 6, 49, 1)
    results = []
    for elements in (1 << 30, 2 * 5 * 49):
        monkeypatch.setattr(gcn_lib.graph, "QUERY_BLOCK_ELEMENTS", elements, raising=False)
        rows = ThresholdRows(x, threshold)
        with torch.no_grad():
            results.append(conv.aggregate_rows(nodes, rows))
        results.append(conv.aggregate_rows(nodes.clone().requires_grad_(True), rows).detach())
    expected = aggregate.max_relative_dense(nodes, ThresholdRows(x, threshold).rows(0, 49))
    for got in results:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
