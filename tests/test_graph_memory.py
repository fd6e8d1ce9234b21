"""Graph memory is linear in the nodes: no (N, M) matrix per image is allocated at once.

The distances, the pyramid's relative-position term (also when it is resized to another input size) and the
threshold mask are made and consumed in blocks of queries (`gcn_lib.graph.QUERY_BLOCK_ELEMENTS`). Each case
runs a forward and a backward pass of a graph block (`vig.models.vig_blocks.Grapher`) under a dispatch mode that records the largest storage any operator
allocates, with the tile set to 1/32 of the full (B, N, M) matrix, and requires that no allocation reaches
1/8 of it. A small-N analogue of the detection-size case: counted bytes, not a timing.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import gcn_lib.graph
from gcn_lib import relative_position_table
from vig.models.vig_blocks import Grapher

B, C, SIDE = 2, 4, 32  # N = 1024 centres


class LargestAllocation(TorchDispatchMode):
    """Records the largest storage (bytes) among the tensors that operators return, and which operator made it."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.op = ""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                size = value.untyped_storage().nbytes()
                if size > self.largest:
                    self.largest, self.op = size, str(func)
        return out


def _table(r: int) -> torch.Tensor:
    """A (1, N', M') relative-position term of a quarter-size (8 x 8) map: the model meets a 32 x 32 map, so it is
    resized to (N, M) as pyramid ViG resizes a 224-px table for a larger input (4x the side here)."""
    side = SIDE // 4
    table = -relative_position_table(C, side).float()
    return torch.nn.functional.interpolate(table[None, None], size=(side * side, side * side // (r * r)),
                                           mode="bicubic", align_corners=False)[0]


def _grapher(graph: dict, r: int, relative: bool) -> Grapher:
    """A pyramid-ViG graph block (fc1, graph conv, fc2) over C channels; with ``relative`` its stored term is
    the quarter-size table, which the block meets on a map 4x its side."""
    return Grapher(C, "gelu", 0.0, relative_pos=_table(r) if relative else None, **graph)


CASES = {
    "knn": (dict(kernel_size=4, dilation=2), 1, False),
    "knn-pyramid-resized-relative-pos": (dict(kernel_size=4), 2, True),
    "threshold": (dict(graph="threshold", threshold=0.7), 1, False),
    "threshold-pyramid-resized-relative-pos": (dict(graph="threshold", threshold=0.7), 2, True),
    "threshold-complete": (dict(graph="threshold", threshold=0.0), 1, False),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_allocation_holds_the_whole_query_key_matrix(case: str, dtype: torch.dtype,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Training: a forward and a backward pass."""
    graph, r, relative = CASES[case]
    graph = dict(graph, r=r) if r > 1 else graph
    n = SIDE * SIDE
    m = n // (r * r)
    full = B * n * m
    monkeypatch.setattr(gcn_lib.graph, "QUERY_BLOCK_ELEMENTS", full // 32, raising=False)
    torch.manual_seed(0)
    layer = _grapher(graph, r, relative).to(dtype).train()
    x = torch.randn(B, C, SIDE, SIDE, dtype=dtype, requires_grad=True)
    counter = LargestAllocation()
    with counter:
        layer(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # the full matrix takes full * itemsize bytes (a bool mask: full bytes); a tile 1/32 of it
    assert counter.largest < full * dtype.itemsize // 8, (counter.largest, counter.op, full * dtype.itemsize)


@pytest.mark.parametrize("case", list(CASES))
def test_no_allocation_holds_the_whole_query_key_matrix_at_inference(case: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Inference (eval, no_grad), where the threshold blocks take their own path (neighbours gathered by degree)."""
    graph, r, relative = CASES[case]
    graph = dict(graph, r=r) if r > 1 else graph
    n = SIDE * SIDE
    full = B * n * (n // (r * r))
    monkeypatch.setattr(gcn_lib.graph, "QUERY_BLOCK_ELEMENTS", full // 32, raising=False)
    torch.manual_seed(0)
    layer = _grapher(graph, r, relative).eval()
    counter = LargestAllocation()
    with counter, torch.no_grad():
        out = layer(torch.randn(B, C, SIDE, SIDE))
    assert torch.isfinite(out).all()
    assert counter.largest < full * 4 // 8, (counter.largest, counter.op, full * 4)


@pytest.mark.parametrize("case", ["knn", "threshold-pyramid-resized-relative-pos"])
def test_blocked_graph_gives_the_whole_graph_values(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocked forward and backward equal the one-block (whole-matrix) ones in float64."""
    graph, r, relative = CASES[case]
    graph = dict(graph, r=r) if r > 1 else graph
    torch.manual_seed(0)
    layer = _grapher(graph, r, relative).double().eval()
    x = torch.randn(B, C, SIDE, SIDE, dtype=torch.float64)
    results = []
    for elements in (1 << 30, 600):
        monkeypatch.setattr(gcn_lib.graph, "QUERY_BLOCK_ELEMENTS", elements, raising=False)
        leaf = x.clone().requires_grad_(True)
        out = layer(leaf)
        out.square().sum().backward()
        results.append((out.detach(), leaf.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-12, atol=1e-12)


def test_query_block_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="positive int"):
        gcn_lib.graph.set_query_block_elements(0)
    old = gcn_lib.graph.set_query_block_elements(1000)
    try:
        assert gcn_lib.graph.query_block_rows(2, 256, 64) == 7
    finally:
        gcn_lib.graph.set_query_block_elements(old)
