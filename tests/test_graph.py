"""Graph construction against brute-force oracles written with Python loops."""
from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from gcn_lib import (dense_knn, normalized_nodes, pairwise_sq_distance, reduced_keys, relative_position_table, sincos_2d,
                     threshold_mask, threshold_quantile)


def _unit_rows(x: torch.Tensor) -> list[list[list[float]]]:
    """(B, C, H, W) -> per image, per node, the L2-normalised feature vector as Python floats."""
    b, c = x.shape[:2]
    nodes = x.reshape(b, c, -1).transpose(1, 2).double().tolist()
    out = []
    for image in nodes:
        rows = []
        for v in image:
            norm = max(math.sqrt(sum(e * e for e in v)), 1e-12)
            rows.append([e / norm for e in v])
        out.append(rows)
    return out


def _sq_dist(u: list[float], v: list[float]) -> float:
    return sum((a - b) ** 2 for a, b in zip(u, v))


def _brute_knn(x, k, dilation, y=None, relative=None):
    queries = _unit_rows(x)
    keys = queries if y is None else _unit_rows(y)
    result = []
    for b, (qs, ks) in enumerate(zip(queries, keys)):
        image = []
        for i, q in enumerate(qs):
            dists = [_sq_dist(q, key) + (0.0 if relative is None else float(relative[i, j])) for j, key in enumerate(ks)]
            order = sorted(range(len(ks)), key=lambda j: dists[j])
            image.append(order[: k * dilation : dilation])
        result.append(image)
    return torch.tensor(result)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k,dilation", [(1, 1), (3, 1), (4, 2), (3, 3)])
def test_dense_knn_matches_brute_force(seed, k, dilation):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 4, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(dense_knn(x, k, dilation), _brute_knn(x, k, dilation), rtol=0, atol=0)


def test_dense_knn_includes_self_first():
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64)
    idx = dense_knn(x, 4)
    torch.testing.assert_close(idx[:, :, 0], torch.arange(25).expand(3, 25))


@pytest.mark.parametrize("dilation", [1, 2])
def test_dense_knn_relative_term_matches_brute_force(dilation):
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    relative = -relative_position_table(8, 4)
    expected = _brute_knn(x, 3, dilation, relative=relative)
    torch.testing.assert_close(dense_knn(x, 3, dilation, relative_pos=relative), expected, rtol=0, atol=0)


def test_dense_knn_reduced_keys_matches_brute_force():
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    y = reduced_keys(x, 2)
    assert y.shape == (2, 6, 2, 2)
    torch.testing.assert_close(y[0, :, 0, 0], x[0, :, :2, :2].mean(dim=(1, 2)))
    torch.testing.assert_close(dense_knn(x, 2, 1, y=y), _brute_knn(x, 2, 1, y=y), rtol=0, atol=0)
    assert reduced_keys(x, 1) is None


def test_stochastic_knn_draws_from_candidates():
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    k, dilation = 3, 2
    candidates = _brute_knn(x, k * dilation, 1)
    gen = torch.Generator().manual_seed(0)
    idx = dense_knn(x, k, dilation, stochastic=True, epsilon=1.0, generator=gen)
    assert idx.shape == (2, 25, k)
    for b in range(2):
        for i in range(25):
            chosen = idx[b, i].tolist()
            assert len(set(chosen)) == k
            assert set(chosen) <= set(candidates[b, i].tolist())
    # epsilon = 0 (or not stochastic) is the deterministic dilated graph.
    torch.testing.assert_close(dense_knn(x, k, dilation, stochastic=True, epsilon=0.0), _brute_knn(x, k, dilation))


def test_stochastic_knn_uses_one_draw_per_batch():
    x = torch.randn(1, 6, 5, 5, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    idx = dense_knn(x, 2, 3, stochastic=True, epsilon=1.0, generator=gen)
    full = dense_knn(x, 6, 1)
    # The same candidate positions are taken for every node.
    positions = [(full[0, i] == idx[0, i, :, None]).nonzero()[:, 1].tolist() for i in range(25)]
    assert all(p == positions[0] for p in positions)


@pytest.mark.parametrize("kwargs,match", [
    ({"k": 0}, "k and dilation"),
    ({"k": 5, "dilation": 4}, "exceeds the number of nodes"),
    ({"k": 2, "epsilon": 1.5}, "epsilon"),
])
def test_dense_knn_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dense_knn(torch.randn(1, 4, 4, 4), **kwargs)


@pytest.mark.parametrize("shape", [(4, 16), (1, 4, 16), (1, 1, 4, 4, 4)])
def test_graph_rejects_wrong_rank(shape):
    with pytest.raises(ValueError, match="x must have shape"):
        dense_knn(torch.randn(shape), 2)
    with pytest.raises(ValueError, match="x must have shape"):
        threshold_mask(torch.randn(shape), 0.5)


def _brute_threshold(x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask and each pair's distance |z - q| from the decision boundary, with Python floats (the keys are
    the nodes themselves)."""
    return _brute_rect_threshold(x, x, t, None)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("t", [0.05, 0.5, 0.8, 0.93, 0.99])
def test_threshold_mask_matches_brute_force(seed, t):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 4, 4, generator=gen, dtype=torch.float64)
    expected, margin = _brute_threshold(x, t)
    mask = threshold_mask(x, t)
    assert mask.dtype == torch.bool and mask.shape == (2, 16, 16)
    decided = margin > 1e-9  # pairs sitting on the boundary may round either way
    assert decided.float().mean() > 0.99
    assert torch.equal(mask[decided], expected[decided])


def test_threshold_mask_has_self_loop_where_any_edge():
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64)
    mask = threshold_mask(x, 0.9)
    has_edge = mask.any(dim=-1)
    assert has_edge.any()
    assert torch.equal(mask.diagonal(dim1=1, dim2=2)[has_edge], torch.ones_like(has_edge)[has_edge])


@pytest.mark.parametrize("t", [0.0, -0.5])
def test_threshold_non_positive_gives_complete_graph(t):
    mask = threshold_mask(torch.randn(2, 4, 3, 3), t)
    assert mask.all() and mask.shape == (2, 9, 9)


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_threshold_constant_input_gives_empty_graph(value):
    x = torch.full((2, 4, 3, 3), value, dtype=torch.float64)
    assert not threshold_mask(x, 0.5).any()


@pytest.mark.parametrize("t", [1.0, 1.2, float("nan")])
def test_threshold_rejects_t_at_or_above_one(t):
    with pytest.raises(ValueError, match="threshold t"):
        threshold_mask(torch.randn(1, 4, 3, 3), t)


def test_threshold_quantile_is_the_normal_quantile():
    for t in (0.1, 0.5, 0.89, 0.99):
        assert threshold_quantile(t) == pytest.approx(NormalDist().inv_cdf(t), abs=1e-12)


def _separated_features(seed: int) -> torch.Tensor:
    """Small integers (exact in float16 and bfloat16) in a few clearly distinct clusters."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randint(-4, 5, (4, 8), generator=gen).double() * 4
    labels = torch.randint(0, 4, (16,), generator=gen)
    noise = torch.randint(-1, 2, (16, 8), generator=gen).double()
    return (centres[labels] + noise).T.reshape(1, 8, 4, 4).float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(2))
def test_half_precision_features_give_the_float32_graph(dtype, seed):
    x = _separated_features(seed)
    half = x.to(dtype)
    assert torch.equal(half.float(), x)
    torch.testing.assert_close(dense_knn(half, 4), dense_knn(x, 4), rtol=0, atol=0)
    assert torch.equal(threshold_mask(half, 0.8), threshold_mask(x, 0.8))


def test_graph_construction_carries_no_gradient():
    x = torch.randn(1, 4, 3, 3, requires_grad=True)
    assert not dense_knn(x, 2).requires_grad
    assert not threshold_mask(x, 0.5).requires_grad


def test_sincos_2d_layout():
    pos = sincos_2d(8, 3)
    assert pos.shape == (9, 8)
    # Node 4 is (row 1, col 1): first half encodes the column, second half the row.
    torch.testing.assert_close(pos[4, 0], torch.sin(torch.tensor(1.0, dtype=torch.float64)))
    torch.testing.assert_close(pos[1, :4], pos[4, :4])  # same column 1
    torch.testing.assert_close(pos[3, 4:], pos[4, 4:])  # same row 1
    table = relative_position_table(8, 3)
    torch.testing.assert_close(table, table.T)
    torch.testing.assert_close(table.diagonal(), torch.ones(9, dtype=torch.float64))


# --- Rectangular threshold graph (pyramid ViG: N centres against M = N / r^2 pooled keys) -------------------

def _brute_rect_threshold(x: torch.Tensor, y: torch.Tensor, t: float,
                          relative: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask (B, N, M) and |z - q| with Python floats: s(i, j) = -(d(i, j) + relative[i, j]) standardised per image."""
    q = NormalDist().inv_cdf(t)
    masks, margins = [], []
    for b, (centres, keys) in enumerate(zip(_unit_rows(x), _unit_rows(y))):
        sims = [[-(_sq_dist(u, v) + (0.0 if relative is None else float(relative[min(b, relative.shape[0] - 1), i, j])))
                 for j, v in enumerate(keys)] for i, u in enumerate(centres)]
        flat = [s for row in sims for s in row]
        mean = sum(flat) / len(flat)
        std = math.sqrt(sum((s - mean) ** 2 for s in flat) / (len(flat) - 1))
        z = [[(s - mean) / std for s in row] for row in sims]
        masks.append([[zz > q for zz in row] for row in z])
        margins.append([[abs(zz - q) for zz in row] for row in z])
    return torch.tensor(masks), torch.tensor(margins, dtype=torch.float64)


def _pyramid_relative(side: int, r: int, channels: int = 8) -> torch.Tensor:
    """A pyramid-style relative term (1, N, N / r^2): -(2 P P^T / C) resized bicubically."""
    table = relative_position_table(channels, side)[None, None]
    n = side * side
    return -torch.nn.functional.interpolate(table, size=(n, n // (r * r)), mode="bicubic", align_corners=False)[0]


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("t", [0.3, 0.8, 0.95])
@pytest.mark.parametrize("r", [1, 2, 4])
@pytest.mark.parametrize("relative", ["none", "pyramid", "per_image"])
def test_rectangular_threshold_mask_matches_brute_force(seed, t, r, relative):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 8, 8, generator=gen, dtype=torch.float64)
    y = reduced_keys(x, r)
    n, m = 64, 64 // (r * r)
    rel = {"none": None, "pyramid": _pyramid_relative(8, r),
           "per_image": torch.rand(2, n, m, generator=gen, dtype=torch.float64) * 2 - 1}[relative]
    expected, margin = _brute_rect_threshold(x, x if y is None else y, t, rel)
    mask = threshold_mask(x, t, y=y, relative_pos=rel)
    assert mask.dtype == torch.bool and mask.shape == (2, n, m)
    decided = margin > 1e-9  # pairs sitting on the boundary may round either way
    assert decided.float().mean() > 0.99
    assert torch.equal(mask[decided], expected[decided])


def _square_rule(x: torch.Tensor, t: float) -> torch.Tensor:
    """The square rule as gcn_lib wrote it before the rectangular case: -d over N x N, per-image z > q."""
    sim = -pairwise_sq_distance(normalized_nodes(x))
    flat = sim.reshape(x.shape[0], -1)
    mean, std = flat.mean(dim=1).view(-1, 1, 1), flat.std(dim=1).view(-1, 1, 1)
    return (sim - mean) / std > threshold_quantile(t)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("t", [0.2, 0.89, 0.99])
@pytest.mark.parametrize("keys", ["default", "x_as_keys", "x_as_keys_zero_relative"])
def test_rectangular_rule_with_m_equal_n_is_the_square_rule_bit_for_bit(dtype, t, keys):
    x = torch.randn(3, 8, 6, 6, dtype=dtype, generator=torch.Generator().manual_seed(7))
    kwargs = {"default": {}, "x_as_keys": {"y": x.clone()},
              "x_as_keys_zero_relative": {"y": x.clone(), "relative_pos": torch.zeros(1, 36, 36, dtype=dtype)}}[keys]
    assert torch.equal(threshold_mask(x, t, **kwargs), _square_rule(x, t))


def test_rectangular_threshold_complete_and_empty_graphs():
    x = torch.randn(2, 4, 4, 4)
    y = reduced_keys(x, 2)
    assert threshold_mask(x, 0.0, y=y).all() and threshold_mask(x, -1.0, y=y).shape == (2, 16, 4)
    constant = torch.ones(2, 4, 4, 4, dtype=torch.float64)
    assert not threshold_mask(constant, 0.5, y=reduced_keys(constant, 2)).any()


@pytest.mark.parametrize("kwargs,match", [
    ({"y": torch.randn(2, 5, 2, 2)}, "y must have shape"),
    ({"y": torch.randn(1, 4, 2, 2)}, "y must have shape"),
    ({"relative_pos": torch.zeros(1, 16, 16)}, "relative_pos must have shape"),
    ({"relative_pos": torch.zeros(3, 16, 4)}, "relative_pos must have shape"),
])
def test_rectangular_threshold_rejects_mismatched_keys(kwargs, match):
    x = torch.randn(2, 4, 4, 4)
    kwargs = {"y": reduced_keys(x, 2), **kwargs}
    with pytest.raises(ValueError, match=match):
        threshold_mask(x, 0.5, **kwargs)
