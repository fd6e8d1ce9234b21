"""SVGA and DAGA (gcn_lib.axial) against graphs built node by node with Python loops, and the published
rolled form (concatenated slices, running max of masked differences) written out literally."""
from __future__ import annotations

import pytest
import torch

from gcn_lib import (DAGA, SVGA, axial, daga_aggregate, daga_edges, daga_mask, daga_threshold,
                     edge_index_to_mask, svga_aggregate, svga_mask)

SHAPES = [(2, 3, 7, 7), (1, 4, 8, 5), (2, 2, 3, 1), (1, 3, 14, 9)]


def _neighbours(height: int, width: int, k: int, start: int, h: int, w: int) -> set[int]:
    """Row-major indices of the axial neighbours of node (h, w): offsets range(start, side, k), wrapping."""
    found = {((h - a) % height) * width + w for a in range(start, height, k)}
    return found | {h * width + (w - b) % width for b in range(start, width, k)}


def _published_roll(x: torch.Tensor, shift: int, dim: int) -> torch.Tensor:
    """The published code's roll: cat of the last ``shift`` slices and the rest (shift 0 keeps x)."""
    if dim == 2:
        return torch.cat([x[:, :, -shift:], x[:, :, :-shift]], dim=2)
    return torch.cat([x[:, :, :, -shift:], x[:, :, :, :-shift]], dim=3)


def _published_daga(x: torch.Tensor, k: int) -> torch.Tensor:
    height, width = x.shape[-2:]
    rolled = _published_roll(_published_roll(x, -height // 2, 2), -width // 2, 3)  # (-H) // 2, as written
    norm = torch.norm(x - rolled, p=1, dim=1, keepdim=True)
    threshold = norm.mean(dim=[2, 3], keepdim=True) - norm.std(dim=[2, 3], keepdim=True)
    out = x - x
    for dim, side in ((2, height), (3, width)):
        for i in range(0, side, k):
            rolled = _published_roll(x, i, dim)
            mask = torch.where(torch.norm(x - rolled, p=1, dim=1, keepdim=True) < threshold, 1, 0)
            out = torch.max(out, (rolled - x) * mask)
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_svga_mask_is_the_node_by_node_graph(shape: tuple[int, ...], k: int) -> None:
    _, _, height, width = shape
    mask = svga_mask(height, width, k)
    for h in range(height):
        for w in range(width):
            row = mask[h * width + w]
            assert set(row.nonzero().flatten().tolist()) == _neighbours(height, width, k, k, h, w)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_svga_aggregate_matches_the_mask_form(shape: tuple[int, ...], k: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    b, c, height, width = shape
    nodes = x.flatten(2)
    expected = torch.zeros_like(nodes)
    for n, row in enumerate(svga_mask(height, width, k)):
        for j in row.nonzero().flatten().tolist():
            expected[:, :, n] = torch.maximum(expected[:, :, n], nodes[:, :, n] - nodes[:, :, j])
    torch.testing.assert_close(svga_aggregate(x, k), expected.reshape(shape), rtol=0, atol=0)
    torch.testing.assert_close(SVGA(k)(x), expected.reshape(shape), rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_svga_matches_the_published_rolled_form(shape: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=torch.float64)
    expected = x - x
    for dim, side in ((2, shape[2]), (3, shape[3])):
        for i in range(2, side, 2):
            expected = torch.max(expected, x - _published_roll(x, i, dim))
    torch.testing.assert_close(svga_aggregate(x, 2), expected, rtol=0, atol=0)


@pytest.mark.parametrize("side, shift", [(7, 4), (8, 4), (1, 1), (3, 2), (56, 28)])
def test_daga_threshold_rolls_by_the_larger_half(side: int, shift: int) -> None:
    """(-H) // 2 rows: 4 of 7, so the reference partner of node (0, 0) is node (side - shift, side - shift)."""
    torch.manual_seed(2)
    x = torch.randn(2, 3, side, side, dtype=torch.float64)
    partner = torch.roll(x, (shift, shift), (2, 3))
    distance = (x - partner).abs().sum(1, keepdim=True)
    expected = distance.mean((2, 3), keepdim=True) - distance.std((2, 3), keepdim=True)
    torch.testing.assert_close(daga_threshold(x), expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 4])
def test_daga_mask_is_the_node_by_node_graph(shape: tuple[int, ...], k: int) -> None:
    torch.manual_seed(3)
    x = torch.randn(shape, dtype=torch.float64)
    b, _, height, width = shape
    mask = daga_mask(x, k)
    threshold = daga_threshold(x).flatten().tolist()
    nodes = x.flatten(2)
    for image in range(b):
        for h in range(height):
            for w in range(width):
                n = h * width + w
                kept = {j for j in _neighbours(height, width, k, 0, h, w)
                        if (nodes[image, :, n] - nodes[image, :, j]).abs().sum().item() < threshold[image]}
                assert set(mask[image, n].nonzero().flatten().tolist()) == kept


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 4])
def test_daga_aggregate_matches_the_mask_form_and_the_published_form(shape: tuple[int, ...], k: int) -> None:
    torch.manual_seed(4)
    x = torch.randn(shape, dtype=torch.float64)
    nodes = x.flatten(2)
    expected = torch.zeros_like(nodes)
    for image, rows in enumerate(daga_mask(x, k)):
        for n, row in enumerate(rows):
            for j in row.nonzero().flatten().tolist():
                expected[image, :, n] = torch.maximum(expected[image, :, n], nodes[image, :, j] - nodes[image, :, n])
    got = daga_aggregate(x, k)
    torch.testing.assert_close(got, expected.reshape(shape), rtol=0, atol=0)
    torch.testing.assert_close(DAGA(k)(x), got, rtol=0, atol=0)
    torch.testing.assert_close(got, _published_daga(x, k), rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 4])
def test_daga_edges_are_the_mask_edge_for_edge(shape: tuple[int, ...], k: int) -> None:
    """Each edge once, centre-major, exactly the edges of the brute-force `daga_mask`."""
    torch.manual_seed(5)
    x = torch.randn(shape, dtype=torch.float64)
    b, _, height, width = shape
    edges = daga_edges(x, k)
    mask = daga_mask(x, k)
    assert edges.dtype == torch.int64 and edges.shape == (2, int(mask.sum()))
    assert torch.equal(edge_index_to_mask(edges, b, height * width), mask)
    assert bool((edges[0][1:] >= edges[0][:-1]).all())


def test_daga_keeps_some_edges_and_drops_others() -> None:
    """The fixtures above are only informative if the threshold splits the axial edges."""
    torch.manual_seed(4)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    kept = daga_mask(x, 1).sum().item()
    assert 0 < kept < svga_mask(7, 7, 1).sum().item() * 2


@pytest.mark.parametrize("op", [lambda x: svga_aggregate(x, 0), lambda x: daga_aggregate(x, 0),
                                lambda x: svga_aggregate(x[0], 2), lambda x: daga_mask(x[0], 2)])
def test_bad_arguments_are_refused(op) -> None:
    with pytest.raises(ValueError):
        op(torch.randn(1, 2, 4, 4))


def test_modules_script() -> None:
    x = torch.randn(1, 3, 5, 6)
    for module in (SVGA(2), DAGA(2)):
        torch.testing.assert_close(torch.jit.script(module)(x), module(x))


def _differentiable_chain(x: torch.Tensor, k: int, largest: bool, threshold: torch.Tensor | None) -> torch.Tensor:
    """The extreme over the axial offsets as a chain of roll / where / maximum that autograd differentiates."""
    best = x
    offsets = [(a, 2) for a in range(k, x.shape[2], k)] + [(b, 3) for b in range(k, x.shape[3], k)]
    for shift, dim in offsets:
        rolled = torch.roll(x, shift, dim)
        if threshold is not None:
            rolled = torch.where((x - rolled).abs().sum(1, keepdim=True) < threshold, rolled, x)
        best = torch.maximum(best, rolled) if largest else torch.minimum(best, rolled)
    return best


@pytest.mark.parametrize("shape", SHAPES + [(2, 5, 17, 3)])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("op", ["svga", "daga"])
def test_winner_routed_backward_equals_the_chain_without_ties(shape: tuple[int, ...], k: int, op: str) -> None:
    """With a gradient, SVGA and DAGA run `_AxialExtreme` (one byte per element saved, the gradient sent to the
    winning offset); its values and, on tie-free float64 inputs, its gradient are those of the plain chain of
    ``maximum`` / ``where`` that autograd differentiates."""
    torch.manual_seed(6)
    x = torch.randn(shape, dtype=torch.float64)
    weights = torch.randn(shape, dtype=torch.float64)
    largest = op == "daga"
    threshold = axial.daga_threshold(x) if largest else None
    routed = x.clone().requires_grad_(True)
    chained = x.clone().requires_grad_(True)
    out_routed = axial._AxialExtreme.apply(routed, k, largest, threshold)
    out_chained = _differentiable_chain(chained, k, largest, threshold)
    with torch.no_grad():
        torch.testing.assert_close(axial._axial_extreme_values(x, k, largest, threshold), out_chained,
                                   rtol=0, atol=0)
    torch.testing.assert_close(out_routed, out_chained, rtol=0, atol=0)
    (out_routed * weights).sum().backward()
    (out_chained * weights).sum().backward()
    torch.testing.assert_close(routed.grad, chained.grad, rtol=1e-14, atol=1e-14)  # sums in another order
    aggregate = daga_aggregate if largest else svga_aggregate
    torch.testing.assert_close(aggregate(routed, k), aggregate(x, k), rtol=0, atol=0)
    assert aggregate(routed, k).grad_fn is not None


@pytest.mark.parametrize("op", [svga_aggregate, daga_aggregate])
def test_winner_routed_backward_sends_a_tie_to_one_neighbour(op) -> None:
    """A map of equal values ties every candidate: the whole gradient goes to the node itself (the first
    candidate), once; the chain of ``maximum`` would split it among the tied offsets."""
    x = torch.ones(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.arange(32, dtype=torch.float64).view(1, 2, 4, 4)
    largest = op is daga_aggregate
    threshold = torch.full((1, 1, 1, 1), 1.0, dtype=torch.float64) if largest else None
    (axial._AxialExtreme.apply(x, 1, largest, threshold) * weights).sum().backward()
    torch.testing.assert_close(x.grad, weights, rtol=0, atol=0)


@pytest.mark.parametrize("module", [SVGA(2), DAGA(2), DAGA(1)])
def test_scripted_modules_give_eager_values_and_gradients(module) -> None:
    """TorchScript compiles no autograd.Function: with a gradient it runs the differentiable chain, without one
    the reused maps; both give eager's values, and, on tie-free float64 inputs, eager's gradients."""
    torch.manual_seed(8)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    weights = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    scripted = torch.jit.script(module)
    eager_x, scripted_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    eager_out, scripted_out = module(eager_x), scripted(scripted_x)
    torch.testing.assert_close(scripted_out, eager_out, rtol=0, atol=0)
    (eager_out * weights).sum().backward()
    (scripted_out * weights).sum().backward()
    torch.testing.assert_close(scripted_x.grad, eager_x.grad, rtol=1e-14, atol=1e-14)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager_out.detach(), rtol=0, atol=0)
