"""TorchScript and fx on the graph models: ``torch.jit.script`` compiles ViG, SViG and pyramid ViG (kNN and
threshold graphs, every mask path) and the scripted model gives the eager model's logits exactly; the scripted
input checks raise as the eager ones do. Also the CIFAR GAT's cached grid edge list."""
from __future__ import annotations

import warnings
from typing import Callable

import pytest
import torch
from torch import nn

from gcn_lib import grid_edges
from vig.models.cifar_gat import map_grid_edges
from vig.models.isotropic import VisionGNN
from vig.models.pyramid import PyramidVisionGNN, key_grids, smallest_key_side

TINY_PYRAMID = dict(channels=(8, 16, 24, 32), blocks=(1, 1, 1, 1), num_classes=5)

# (name, builder, input side, an input side the model refuses, the refusal); thresholds 0.99 then 0.49 give a sparse
# square mask (edge-list path) and a dense one (ranked keys); the threshold pyramid takes rectangular masks
MODELS: list[tuple[str, Callable[[], nn.Module], int, int, str]] = [
    ("vig", lambda: VisionGNN(32, 2, num_classes=5, img_size=32, stem_stride=4), 32, 48,
     "create the model with the img_size you feed it"),
    ("svig", lambda: VisionGNN(32, 2, num_classes=5, img_size=32, stem_stride=4, start_thresh=0.99, dec=0.5), 32, 16,
     "create the model with the img_size you feed it"),
    ("pvig", lambda: PyramidVisionGNN(**TINY_PYRAMID, img_size=64), 64, 8, "too small for pyramid ViG"),
    ("pvig_threshold", lambda: PyramidVisionGNN(**TINY_PYRAMID, img_size=64, start_thresh=0.9, dec=0.2), 64, 8,
     "too small for pyramid ViG"),
]


def _script(model: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice and its attribute-typing notes
        return torch.jit.script(model)


@pytest.mark.parametrize("name, build, side, bad_side, refusal", MODELS, ids=[m[0] for m in MODELS])
def test_scripted_graph_model_gives_the_eager_logits_and_checks(name: str, build: Callable[[], nn.Module], side: int,
                                                                bad_side: int, refusal: str) -> None:
    torch.manual_seed(0)
    model = build().eval()
    images = torch.randn(2, 3, side, side)
    scripted = _script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(images), model(images), rtol=0, atol=0)
        bad = torch.randn(1, 3, bad_side, bad_side)
        with pytest.raises(ValueError, match=refusal):
            model(bad)
        with pytest.raises(Exception, match=refusal):  # scripted code raises torch.jit.Error with the message
            scripted(bad)


@pytest.mark.parametrize("stem_stride", [1, 2, 4])
def test_smallest_key_side_matches_key_grids(stem_stride: int) -> None:
    for height in range(1, 70, 3):
        for width in (1, 9, 32, 61):
            try:
                smallest = min(min(grid) for grid in key_grids((height, width), stem_stride))
            except ValueError:
                smallest = 0
            assert (smallest_key_side(height, width, stem_stride) >= 1) == (smallest >= 1), (height, width)
            if smallest >= 1:
                assert smallest_key_side(height, width, stem_stride) == smallest


def test_map_grid_edges_is_built_once_per_size_and_survives_inference_mode() -> None:
    with torch.inference_mode():
        first = map_grid_edges(torch.zeros(3, 2, 5, 7))
    assert not first.is_inference()  # autograd may save it in a later training step
    assert map_grid_edges(torch.ones(3, 4, 5, 7)) is first  # the channels do not matter
    assert torch.equal(first, grid_edges(5, 7, neighbours=4, batch_size=3))
    other = map_grid_edges(torch.zeros(2, 2, 5, 7))
    assert torch.equal(other, grid_edges(5, 7, neighbours=4, batch_size=2))
    meta = map_grid_edges(torch.empty(3, 2, 5, 7, device="meta"))
    assert meta.device.type == "meta" and meta.shape == first.shape
