"""`max_relative_gather` folds one neighbour at a time into a running maximum: values and gradients against the
(B, C, N, k) form and the published ``torch.max(x_j - x_i, -1)`` (whose backward routes to one neighbour)."""
from __future__ import annotations

import pytest
import torch

from gcn_lib import gather_neighbours, max_relative_gather


@pytest.mark.parametrize("keys", [None, 5])
def test_gather_max_matches_the_published_max_and_its_gradient(keys: int | None) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 9, 1, dtype=torch.float64, requires_grad=True)
    y = None if keys is None else torch.randn(2, 6, keys, 1, dtype=torch.float64, requires_grad=True)
    m = 9 if keys is None else keys
    neighbours = torch.stack([torch.randperm(m)[:4] for _ in range(2 * 9)]).view(2, 9, 4)
    weights = torch.randn(2, 6, 9, 1, dtype=torch.float64)
    ours = max_relative_gather(x, neighbours, y)
    (ours * weights).sum().backward()
    grads = [x.grad.clone()] + ([] if y is None else [y.grad.clone()])
    x.grad = None
    if y is not None:
        y.grad = None
    x_j = gather_neighbours(x if y is None else y, neighbours)
    published = torch.max(x_j - x, -1, keepdim=True)[0]  # the published MRConv2d
    (published * weights).sum().backward()
    torch.testing.assert_close(ours, published, rtol=0, atol=0)
    torch.testing.assert_close(grads[0], x.grad, rtol=0, atol=1e-15)
    if y is not None:
        torch.testing.assert_close(grads[1], y.grad, rtol=0, atol=1e-15)


def test_gather_max_gradcheck() -> None:
    torch.manual_seed(1)
    x = torch.randn(1, 3, 7, 1, dtype=torch.float64, requires_grad=True)
    neighbours = torch.stack([torch.randperm(7)[:3] for _ in range(7)]).view(1, 7, 3)
    assert torch.autograd.gradcheck(lambda t: max_relative_gather(t, neighbours), (x,))
