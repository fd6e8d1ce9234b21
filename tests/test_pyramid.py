"""Pyramid ViG (project issue #14): published outputs, sizes, configs and the relative-position term."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch.testing import assert_close

import vig
from gcn_lib import relative_position_table
from tests.shared_files import shared_path
from vig.models import PyramidVisionGNN
from vig.models.isotropic import FFN, Grapher
from vig.models.pyramid import SIZES, Downsample, published_relative_pos

NAMES = [f"pvig_{size}_224_gelu" for size in SIZES]
FIXTURE = ("fixtures", "pvig_ti_checkpoint.pth.tar")


@pytest.fixture(scope="module")
def checkpoint_path() -> Path:
    return shared_path(*FIXTURE)


def _graphers(model: PyramidVisionGNN) -> list[Grapher]:
    return [block[0] for block in model.backbone if not isinstance(block, Downsample)]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def test_published_logits_reproduced_in_float64(checkpoint_path: Path) -> None:
    reference = torch.load(shared_path("fixtures", "pvig_ti_reference_outputs.pt"), weights_only=True)
    model = timm.create_model("pvig_ti_224_gelu")
    vig.load_checkpoint(model, checkpoint_path, strict=True)
    model.double().eval()
    with torch.no_grad():
        logits = model(reference["input"].double())
    assert logits.dtype == torch.float64 and logits.shape == reference["logits"].shape
    assert _relative_error(logits, reference["logits"]) < 1e-6


@pytest.mark.parametrize("name, trainable", [
    ("pvig_ti_224_gelu", 10_714_376), ("pvig_s_224_gelu", 27_251_912),
    ("pvig_m_224_gelu", 49_525_832), ("pvig_b_224_gelu", 92_980_328),
])
def test_trainable_parameter_counts_are_the_published_ones(name: str, trainable: int) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(param.numel() for param in model.parameters() if param.requires_grad) == trainable
    frozen = [key for key, param in model.named_parameters() if not param.requires_grad]
    assert frozen and all(key.endswith(".0.relative_pos") for key in frozen)


def test_state_dict_layout_is_the_published_one(checkpoint_path: Path) -> None:
    with torch.device("meta"):
        model = timm.create_model("pvig_ti_224_gelu")
    published = vig.read_checkpoint(checkpoint_path)
    own = model.state_dict()
    assert list(own) == list(published)
    assert all(own[key].shape == published[key].shape for key in own)
    assert [i for i, block in enumerate(model.backbone) if isinstance(block, Downsample)] == [2, 5, 12]
    assert all(isinstance(block[0], Grapher) and isinstance(block[1], FFN)
               for i, block in enumerate(model.backbone) if i not in (2, 5, 12))


def test_fresh_relative_pos_is_the_published_one(checkpoint_path: Path) -> None:
    """A new model computes the checkpoint's frozen tables itself (bit for bit): 2 P P^T / C, resized, negated."""
    published = vig.read_checkpoint(checkpoint_path)
    model = timm.create_model("pvig_ti_224_gelu")
    tables = {key: value for key, value in model.state_dict().items() if key.endswith("relative_pos")}
    assert len(tables) == 12
    for key, value in tables.items():
        assert torch.equal(value, published[key]), key
    assert_close(published_relative_pos(96, 28, 1)[0], -relative_position_table(96, 28).float())


@pytest.mark.parametrize("name", NAMES)
def test_every_name_is_one_class_with_the_published_config(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    assert type(model) is PyramidVisionGNN
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic"
    assert cfg["crop_pct"] == (0.95 if name.startswith("pvig_b") else 0.9)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()


def test_knn_schedule_is_the_published_one() -> None:
    with torch.device("meta"):
        model = timm.create_model("pvig_ti_224_gelu")
    convs = [grapher.graph_conv for grapher in _graphers(model)]
    assert [c.k for c in convs] == [9] * 12
    assert [c.dilation for c in convs] == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert [c.r for c in convs] == [4, 4, 2, 2] + [1] * 8


def test_drop_path_schedule_counts_blocks_not_downsamples() -> None:
    with torch.device("meta"):
        model = timm.create_model("pvig_ti_224_gelu", drop_path_rate=0.1)
    rates = [getattr(grapher.drop_path, "drop_prob", 0.0) for grapher in _graphers(model)]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 12).tolist())


def test_models_do_not_print(capsys: pytest.CaptureFixture) -> None:
    model = timm.create_model("pvig_ti_224_gelu", img_size=64).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert capsys.readouterr().out == ""
