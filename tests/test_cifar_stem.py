"""The small-image stem (``stem_stride``) of ViG / SViG / pyramid ViG and the CIFAR-10 configurations (issue #17)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import train
import vig  # noqa: F401  (registers the models with timm)
from tests.test_cifar_train import _tiny_cifar_folder
from vig.models.cifar_gat import CIFAR10_MEAN, CIFAR10_STD
from vig.models.isotropic import (PUBLISHED_IMG_SIZE, STEM_STRIDES, Stem, VisionGNN, knn_schedule, stem_grid,
                                  threshold_schedule)

SIZES = [32, 33, 224, (40, 24), (7, 50)]


def _brute_force_grid(stem: nn.Module, size: int | tuple[int, int]) -> tuple[int, int]:
    """(H', W') of the stem's output, found by running its convs (only the convs: BN / activation keep sizes)."""
    height, width = (size, size) if isinstance(size, int) else size
    x = torch.zeros(1, 3, height, width)
    for layer in stem.convs:
        if isinstance(layer, nn.Conv2d):
            x = nn.functional.conv2d(x[:, :layer.in_channels], torch.zeros_like(layer.weight), stride=layer.stride,
                                     padding=layer.padding)
    return tuple(x.shape[-2:])


def _tiny_vig(**kwargs) -> VisionGNN:
    return VisionGNN(channels=16, depth=3, num_classes=10, **kwargs)


@pytest.mark.parametrize("stride", STEM_STRIDES)
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_stem_grid_is_the_map_the_stem_convs_give(stride: int, size: int | tuple[int, int]) -> None:
    stem = Stem(3, 16, "gelu", stride)
    assert stem_grid(size, stride) == _brute_force_grid(stem, size)


@pytest.mark.parametrize("stride", STEM_STRIDES)
def test_model_grid_pos_embed_and_feature_info_follow_the_stride(stride: int) -> None:
    model = _tiny_vig(img_size=32, stem_stride=stride)
    grid = _brute_force_grid(model.stem, 32)
    assert model.grid_size == grid and tuple(model.pos_embed.shape[-2:]) == grid
    assert [info["reduction"] for info in model.feature_info] == [stride] * 3
    assert tuple(model.forward_features(torch.randn(2, 3, 32, 32)).shape) == (2, 16, *grid)


@pytest.mark.parametrize("stride", STEM_STRIDES)
def test_every_stride_has_the_published_state_dict_and_loads_it(stride: int) -> None:
    # at img_size 14 * stride every stride gives the published 14 x 14 map, so pos_embed matches too
    published = _tiny_vig().state_dict()
    model = _tiny_vig(img_size=PUBLISHED_IMG_SIZE // 16 * stride, stem_stride=stride)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in published.items()}
    model.load_state_dict(published, strict=True)


@pytest.mark.parametrize("stride", [0, 3, 32, -2, True, 2.0, "2"])
def test_bad_stride_is_a_value_error_naming_the_allowed_ones(stride: object) -> None:
    with pytest.raises(ValueError, match="stem_stride must be one of 1, 2, 4, 8, 16"):
        _tiny_vig(img_size=32, stem_stride=stride)
    with pytest.raises(ValueError, match="stem_stride must be one of 1, 2, 4, 8, 16"):
        timm.create_model("vig_ti_cifar", stem_stride=stride)


def test_wrong_image_size_error_names_the_stride() -> None:
    model = _tiny_vig(img_size=32, stem_stride=2)
    with pytest.raises(ValueError, match="64x64 images give a 32x32 map at stem stride 2.*16x16"):
        model(torch.randn(1, 3, 64, 64))


def test_bad_stride_is_one_error_line_from_the_trainer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _tiny_cifar_folder(tmp_path / "data", per_class_train=1, per_class_test=1, classes=2)
    code = train.main([str(data), "--val-split", "test", "--model", "vig_ti_cifar", "--model-kwargs", "stem_stride=3",
                       "--epochs", "1", "-b", "2", "-j", "0", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error:") and "stem_stride must be one of 1, 2, 4, 8, 16" in err[0], err


@pytest.mark.parametrize("name, graph", [("vig_ti_cifar", "knn"), ("svig_ti_cifar", "threshold")])
def test_cifar_configurations_have_256_nodes_and_the_cifar_preprocessing(name: str, graph: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    assert (model.stem_stride, model.img_size, model.grid_size, model.num_classes) == (2, (32, 32), (16, 16), 10)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["crop_pct"] == 1.0
    assert (cfg["mean"], cfg["std"], cfg["num_classes"]) == (CIFAR10_MEAN, CIFAR10_STD, 10)
    convs = [block[0].graph_conv for block in model.backbone]
    assert {conv.graph for conv in convs} == {graph} and len(convs) == 12 and model.num_features == 192
    if graph == "knn":  # 256 nodes leave the published schedule uncapped: k 9 -> 18, dilation i // 4 + 1
        published = [(int(k), i // 4 + 1) for i, k in enumerate(torch.linspace(9, 18, 12).tolist())]
        assert [(conv.k, conv.dilation) for conv in convs] == published == knn_schedule(9, 12, 256)
    else:
        torch.testing.assert_close([conv.threshold for conv in convs], threshold_schedule(0.89, 0.03, 12))


@pytest.mark.parametrize("start_thresh", [None, 0.89], ids=["knn", "threshold"])
def test_32px_forward_and_backward_builds_graphs_over_256_nodes(start_thresh: float | None) -> None:
    model = timm.create_model("vig_ti_cifar", channels=16, depth=3, start_thresh=start_thresh)
    seen = []
    for block in model.backbone:
        block[0].graph_conv.register_forward_pre_hook(lambda conv, args: seen.append(tuple(args[0].shape[-2:])))
    logits = model(torch.randn(2, 3, 32, 32))
    logits.sum().backward()
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert seen == [(16, 16)] * 3
    assert model.stem.convs[0].weight.grad is not None
