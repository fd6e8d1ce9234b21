"""Edge lists: grid graphs, sparse kNN, DropEdge and conversions, against brute force."""
from __future__ import annotations

import pytest
import torch

from gcn_lib import (dense_knn, drop_edge, edge_index_to_mask, grid_edges, knn_to_edge_index, knn_to_mask,
                     mask_to_edge_index, sparse_knn, threshold_mask, to_pyg)


def _edge_set(edge_index: torch.Tensor) -> set[tuple[int, int]]:
    return set(map(tuple, edge_index.T.tolist()))


def _brute_grid(h: int, w: int, neighbours: int, batch: int) -> set[tuple[int, int]]:
    edges = set()
    for b in range(batch):
        for y in range(h):
            for x in range(w):
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        if (dy, dx) == (0, 0) or (neighbours == 4 and dy and dx):
                            continue
                        if 0 <= y + dy < h and 0 <= x + dx < w:
                            edges.add((b * h * w + y * w + x, b * h * w + (y + dy) * w + x + dx))
    return edges


@pytest.mark.parametrize("neighbours", [4, 8])
@pytest.mark.parametrize("h,w,batch", [(1, 1, 1), (1, 5, 2), (3, 4, 1), (4, 4, 3)])
def test_grid_edges_match_brute_force(neighbours, h, w, batch):
    edges = grid_edges(h, w, neighbours, batch)
    assert edges.dtype == torch.int64 and edges.shape[0] == 2
    assert edges.shape[1] == len(_edge_set(edges))  # no duplicates
    assert _edge_set(edges) == _brute_grid(h, w, neighbours, batch)


def test_grid_edges_count_16x16():
    assert grid_edges(16, 16, 4).shape[1] == 4 * 16 * 15
    assert grid_edges(16, 16, 8).shape[1] == 4 * 16 * 15 + 4 * 15 * 15


@pytest.mark.parametrize("kwargs,match", [({"neighbours": 6}, "neighbours"), ({"batch_size": 0}, "batch_size")])
def test_grid_edges_reject_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        grid_edges(3, 3, **kwargs)


def _brute_sparse_knn(x, k, batch, loop, cosine):
    feats = torch.nn.functional.normalize(x, dim=-1) if cosine else x
    edges = set()
    for i in range(x.shape[0]):
        same = [j for j in range(x.shape[0]) if batch[j] == batch[i] and (loop or j != i)]
        same.sort(key=lambda j: float(((feats[i] - feats[j]) ** 2).sum()))
        edges.update((i, j) for j in same[:k])
    return edges


@pytest.mark.parametrize("loop", [False, True])
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("sizes", [[7], [5, 5, 5], [3, 6, 1, 6]])
def test_sparse_knn_matches_brute_force(loop, cosine, sizes):
    gen = torch.Generator().manual_seed(len(sizes))
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    x = torch.randn(int(batch.numel()), 4, generator=gen, dtype=torch.float64)
    edges = sparse_knn(x, 3, batch, loop=loop, cosine=cosine)
    assert torch.all(edges[0][1:] >= edges[0][:-1])  # grouped by centre
    assert _edge_set(edges) == _brute_sparse_knn(x, 3, batch, loop, cosine)


def test_sparse_knn_rejects_unsorted_batch():
    with pytest.raises(ValueError, match="sorted"):
        sparse_knn(torch.randn(4, 2), 1, torch.tensor([0, 1, 0, 1]))


def test_drop_edge_only_in_training():
    edges = grid_edges(8, 8)
    assert drop_edge(edges, 0.5, training=False) is edges
    assert drop_edge(edges, 0.0, training=True) is edges
    kept = drop_edge(edges, 0.5, training=True, generator=torch.Generator().manual_seed(0))
    assert _edge_set(kept) < _edge_set(edges)
    assert 0.35 < kept.shape[1] / edges.shape[1] < 0.65
    with pytest.raises(ValueError, match="edge drop probability"):
        drop_edge(edges, 1.0)


def test_knn_conversions_agree():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    idx = dense_knn(x, 3)
    mask = knn_to_mask(idx)
    assert mask.sum() == 2 * 9 * 3
    edges = knn_to_edge_index(idx)
    assert edges.shape == (2, 2 * 9 * 3)
    assert torch.equal(edge_index_to_mask(edges, 2, 9), mask)
    assert _edge_set(mask_to_edge_index(mask)) == _edge_set(edges)
    for b in range(2):
        for i in range(9):
            for j in idx[b, i].tolist():
                assert mask[b, i, j] and (b * 9 + i, b * 9 + j) in _edge_set(edges)


def test_mask_round_trip_and_pyg_orientation():
    mask = threshold_mask(torch.randn(3, 4, 3, 3, dtype=torch.float64), 0.7)
    edges = mask_to_edge_index(mask)
    assert torch.equal(edge_index_to_mask(edges, 3, 9), mask)
    assert torch.equal(to_pyg(edges), torch.stack((edges[1], edges[0])))


@pytest.mark.parametrize("edges,match", [
    (torch.tensor([[0, 1, 2]]), r"shape \(2, E\)"),
    (torch.tensor([[0], [9]]), "outside"),
    (torch.tensor([[0.0], [1.0]]), "int64"),
    (torch.tensor([[0], [5]]), "different graphs"),
])
def test_edge_index_to_mask_rejects_bad_edges(edges, match):
    with pytest.raises(ValueError, match=match):
        edge_index_to_mask(edges, 2, 4)
