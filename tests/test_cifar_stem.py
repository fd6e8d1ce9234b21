"""The small-image stem (``stem_stride``) of ViG / SViG / pyramid ViG and the CIFAR-10 configurations (issue #17)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from torch import nn

import train
import vig  # noqa: F401  (registers the models with timm)
from tests.shared_files import shared_path
from tests.test_cifar_train import _tiny_cifar_folder
from vig.model_settings import ModelSettings
from vig.models.cifar import CIFAR10_MEAN, CIFAR10_STD
from gcn_lib import reduced_keys
from vig.models.isotropic import (PUBLISHED_IMG_SIZE, STEM_STRIDES, Stem, VisionGNN, knn_schedule, stem_grid,
                                  threshold_schedule)
from vig.models.pyramid import PyramidVisionGNN, stage_grids
from vig.tools.visualize import (build_model, capture_graphs, default_blocks, draw_graphs, graph_convs,
                                 graph_figure_size_px, preprocess, visualize)

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
    assert tuple(model._embed(torch.randn(2, 3, 32, 32)).shape) == (2, 16, *grid)  # the size check passes


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


PYRAMID_STRIDES = (1, 2, 4)


def _tiny_pvig(**kwargs) -> PyramidVisionGNN:
    return PyramidVisionGNN(channels=(8, 8, 16, 16), blocks=(1, 1, 1, 1), num_classes=10, **kwargs)


@pytest.mark.parametrize("stride", PYRAMID_STRIDES)
@pytest.mark.parametrize("size", [32, (96, 64)], ids=str)
def test_pyramid_stage_grids_are_the_maps_the_convs_give(stride: int, size: int | tuple[int, int]) -> None:
    model = _tiny_pvig(img_size=size, stem_stride=stride)
    height, width = (size, size) if isinstance(size, int) else size
    seen = []
    for block in model.backbone:
        if isinstance(block, nn.Sequential):
            block[0].graph_conv.register_forward_pre_hook(lambda conv, args: seen.append(tuple(args[0].shape[-2:])))
    model(torch.randn(2, 3, height, width))
    assert model.stage_grids == stage_grids(size, stride) == seen
    assert [info["reduction"] for info in model.feature_info] == [stride * 2**s for s in range(4)]


@pytest.mark.parametrize("stride", PYRAMID_STRIDES)
def test_every_pyramid_stride_has_the_published_state_dict_and_loads_it(stride: int) -> None:
    # at img_size 56 * stride every stride gives the published stage maps 56, 28, 14, 7
    published = _tiny_pvig().state_dict()
    model = _tiny_pvig(img_size=PUBLISHED_IMG_SIZE // 4 * stride, stem_stride=stride)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in published.items()}
    model.load_state_dict(published, strict=True)


@pytest.mark.parametrize("stride", [8, 16, 3, 0, True])
def test_bad_pyramid_stride_is_a_value_error_naming_the_allowed_ones(stride: object) -> None:
    with pytest.raises(ValueError, match="stem_stride must be one of 1, 2, 4, got"):
        _tiny_pvig(img_size=32, stem_stride=stride)


@pytest.mark.parametrize("start_thresh", [None, 0.8], ids=["knn", "threshold"])
def test_pvig_ti_cifar_at_32px_sizes_relative_pos_to_the_pooled_keys(start_thresh: float | None) -> None:
    with torch.device("meta"):
        full = timm.create_model("pvig_ti_cifar")
    assert (full.stem_stride, full.stage_grids, full.num_classes) == (1, [(32, 32), (16, 16), (8, 8), (4, 4)], 10)
    assert full.pretrained_cfg["input_size"] == (3, 32, 32) and full.pretrained_cfg["mean"] == CIFAR10_MEAN
    model = _tiny_pvig(img_size=32, stem_stride=1, start_thresh=start_thresh)
    graphers = [block[0] for block in model.backbone if isinstance(block, nn.Sequential)]
    # (N, M): the stage's nodes, its keys pooled by r = 4, 2, 1, 1 (8 x 8, 8 x 8, 8 x 8, 4 x 4)
    assert [tuple(g.relative_pos.shape) for g in graphers] == [(1, 1024, 64), (1, 256, 64), (1, 64, 64), (1, 16, 16)]
    keys = []
    for grapher in graphers:
        grapher.graph_conv.register_forward_pre_hook(
            lambda conv, args: keys.append(tuple(reduced_keys(args[0], conv.r).shape[-2:]) if conv.r > 1
                                           else tuple(args[0].shape[-2:])))
    logits = model(torch.randn(2, 3, 32, 32))
    logits.sum().backward()
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert keys == [(8, 8)] * 3 + [(4, 4)]
    assert {g.graph_conv.graph for g in graphers} == {"knn" if start_thresh is None else "threshold"}


def _first_test_image(class_name: str = "horse") -> Path:
    folder = shared_path("data", "cifar10-subset", "test", class_name)
    return sorted(folder.iterdir())[0]


def test_visualize_writes_the_picture_of_a_cifar_model_on_a_real_image(tmp_path: Path) -> None:
    out = visualize("vig_ti_cifar", _first_test_image(), tmp_path / "graph.png", blocks=[0])
    with Image.open(out) as picture:
        assert picture.size == graph_figure_size_px(1, ["knn"])


@pytest.mark.parametrize("name, kwargs, grids", [
    ("vig_ti_cifar", dict(channels=16, depth=3), [((16, 16), (16, 16))] * 2),
    ("svig_ti_cifar", dict(channels=16, depth=3), [((16, 16), (16, 16))] * 2),
    # pyramid blocks 0 and 11: stage 0 (32 x 32, keys pooled by 4) and stage 3 (4 x 4)
    ("pvig_ti_cifar", {}, [((32, 32), (8, 8)), ((4, 4), (4, 4))]),
])
def test_visualize_draws_the_cifar_graph_on_its_patch_grid(name: str, kwargs: dict, grids: list) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSettings(model=name, model_kwargs=kwargs))
    image, shown = preprocess(model, _first_test_image())
    assert tuple(image.shape) == (1, 3, 32, 32) and shown.shape == (32, 32, 3)
    blocks = default_blocks(len(graph_convs(model)))
    graphs = capture_graphs(model, image, [blocks[0], blocks[-1]])
    assert [(g.grid, g.key_grid) for g in graphs] == grids
    figure = draw_graphs({graphs[0].kind: graphs}, shown, None, name)
    for axes, graph in zip([a for a in figure.axes if a.images], graphs):
        (h, w), (key_h, key_w) = graph.grid, graph.key_grid
        vertical = [line for line in axes.lines if line.get_xdata()[0] == line.get_xdata()[1]]
        assert len(vertical) == w - 1 and len(axes.lines) == (h - 1) + (w - 1)  # the patch grid
        centre, *neighbours = sorted(axes.patches, key=lambda patch: patch.get_fill())
        # the centre is the middle patch, 32 / w pixels a side; each neighbour one key cell (32 / key_w)
        assert (centre.get_width(), tuple(centre.get_xy())) == (32 / w, (w // 2 * 32 / w, h // 2 * 32 / h))
        assert {(p.get_width(), p.get_height()) for p in neighbours} <= {(32 / key_w, 32 / key_h)}
        assert neighbours or graph.kind == "threshold"  # a threshold graph may leave a node only itself


@pytest.mark.parametrize("name", ["vig_ti_cifar"])
def test_cifar_config_trains_through_train_py_on_real_images(tmp_path: Path, name: str) -> None:
    data = _tiny_cifar_folder(tmp_path / "data", per_class_train=2, per_class_test=1, classes=2)
    assert train.main([str(data), "--val-split", "test", "--model", name, "--model-kwargs", "channels=16", "depth=2",
                       "--epochs", "1", "--warmup-epochs", "0", "-b", "2", "-j", "0", "--output", str(tmp_path / "out"),
                       "--experiment", "tiny"]) == 0
    with open(tmp_path / "out" / "tiny" / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["0"] and 0 <= float(rows[0]["eval_top1"]) <= 100
    checkpoint = torch.load(tmp_path / "out" / "tiny" / "last.pth.tar", map_location="cpu", weights_only=False)
    assert tuple(checkpoint["state_dict"]["pos_embed"].shape) == (1, 16, 16, 16)  # the 16 x 16 node grid
