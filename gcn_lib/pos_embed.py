"""Fixed 2D sine-cosine position embeddings and the relative-position table built from them."""
from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sine-cosine embedding of positions (P,) -> (P, dim): first half sin, second half cos."""
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """2D sine-cosine embedding of a grid_size x grid_size grid -> (grid_size**2, dim), float64.

    Half of the channels encode the column and half the row, row-major node order.
    """
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1)


def relative_position_table(dim: int, grid_size: int) -> torch.Tensor:
    """Relative-position term of pyramid ViG: 2 * P P^T / dim for P = sincos_2d -> (N, N), float64.

    It is large for nearby nodes; pyramid ViG subtracts it from the kNN distance
    (pass ``-table`` as ``relative_pos`` to `gcn_lib.graph.dense_knn`).
    """
    pos = sincos_2d(dim, grid_size)
    return 2 * pos @ pos.T / pos.shape[1]
