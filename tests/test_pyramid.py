"""Pyramid ViG (project issue #14): published outputs, sizes, MACs and configs, any input size, the feature pyramid."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import train
import vig
from gcn_lib import relative_position_table
from tests.shared_files import shared_path
from tests.train_helpers import make_image_folder
from vig.checkpoint import load_state_dict_into
from vig.complexity import count_macs
from vig.models import PyramidVisionGNN, vig_blocks
from vig.models.vig_blocks import FFN, Grapher
from vig.models.pyramid import SIZES, Downsample, key_grids, published_relative_pos, stage_grids

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
    assert all(param.requires_grad for param in model.parameters())


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


def test_a_224_checkpoint_loads_at_img_size_320_with_every_table_resized(checkpoint_path: Path) -> None:
    published = vig.read_checkpoint(checkpoint_path)
    model = timm.create_model("pvig_ti_224_gelu", img_size=320)
    fresh = model.state_dict()
    vig.load_checkpoint(model, checkpoint_path, strict=True)
    state = model.state_dict()
    assert_close(state["pos_embed"], F.interpolate(published["pos_embed"], size=(80, 80), mode="bicubic",
                                                   align_corners=False))
    # stage maps 80, 40, 20, 10 px; keys pooled by r = 4, 2, 1, 1
    for key, size in [("backbone.0.0.relative_pos", (6400, 400)), ("backbone.3.0.relative_pos", (1600, 400)),
                      ("backbone.6.0.relative_pos", (400, 400)), ("backbone.13.0.relative_pos", (100, 100))]:
        expected = F.interpolate(published[key][None], size=size, mode="bicubic", align_corners=False)[0]
        assert_close(state[key], expected, msg=key)
        assert_close(fresh[key], expected, msg=key)  # a new 320-px model resizes the 224-px tables the same way
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 320, 320, generator=torch.Generator().manual_seed(0)))
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def backbone() -> PyramidVisionGNN:
    torch.manual_seed(0)
    return timm.create_model("pvig_ti_224_gelu", features_only=True).eval()


@pytest.mark.parametrize("size", [(224, 224), (256, 320), (512, 512)])
def test_features_only_gives_four_stage_maps_at_strides_4_to_32(backbone: PyramidVisionGNN,
                                                                 size: tuple[int, int]) -> None:
    assert backbone.feature_info.channels() == [48, 96, 240, 384]
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, *size))
    assert [tuple(m.shape) for m in maps] == [(1, c, size[0] // s, size[1] // s)
                                             for c, s in zip([48, 96, 240, 384], [4, 8, 16, 32])]
    assert all(torch.isfinite(m).all() for m in maps)


def test_a_model_built_for_a_size_equals_one_resizing_at_run_time() -> None:
    """img_size=(256, 320) resizes pos_embed and relative_pos once; a 224-px model does the same per call."""
    torch.manual_seed(0)
    model = timm.create_model("pvig_ti_224_gelu", num_classes=0).eval()
    sized = timm.create_model("pvig_ti_224_gelu", num_classes=0, img_size=(256, 320)).eval()
    load_state_dict_into(sized, model.state_dict(), "224-px model", "state dict", strict=True)
    assert sized.pos_embed.shape == (1, 48, 64, 80)
    assert sized.backbone[0][0].relative_pos.shape == (1, 64 * 80, 16 * 20)
    image = torch.randn(1, 3, 256, 320)
    with torch.no_grad():
        assert_close(sized(image), model(image))


def test_non_square_detection_sizes_have_the_expected_maps() -> None:
    assert stage_grids((800, 1216)) == [(200, 304), (100, 152), (50, 76), (25, 38)]
    assert key_grids((800, 1216)) == [(50, 76), (50, 76), (50, 76), (25, 38)]
    with pytest.raises(ValueError, match="too small"):
        key_grids(8)


def test_forward_intermediates_picks_stages_and_prunes() -> None:
    torch.manual_seed(0)
    model = timm.create_model("pvig_ti_224_gelu", img_size=64).eval()
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(image)
        assert [m.shape[1:] for m in maps] == [(48, 16, 16), (96, 8, 8), (240, 4, 4), (384, 2, 2)]
        assert_close(final, model.forward_features(image))
        assert_close(maps[-1], final)
        early = model.forward_intermediates(image, indices=[1], stop_early=True, intermediates_only=True)
        assert_close(early[0], maps[1])
        some = timm.create_model("pvig_ti_224_gelu", img_size=64, features_only=True, out_indices=(0, 1))
        assert len(some.model.backbone) == 5 and some.feature_info.channels() == [48, 96]


def test_small_img_size_caps_k_and_dilation_with_one_warning(caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vig_blocks, "_logged_caps", set())  # as in a fresh process
    with caplog.at_level(logging.WARNING, logger="vig.models.vig_blocks"):
        model = timm.create_model("pvig_ti_224_gelu", img_size=64, num_classes=3)
        timm.create_model("pvig_ti_224_gelu", img_size=64, num_classes=3)
    assert len(caplog.records) == 1 and "[16, 16, 16, 4] key nodes" in caplog.text
    convs = [grapher.graph_conv for grapher in _graphers(model)]
    assert [(c.k, c.dilation) for c in convs] == [(9, 1)] * 4 + [(9, 1)] * 6 + [(4, 1)] * 2
    assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vig.models.vig_blocks"):
        timm.create_model("pvig_ti_224_gelu", img_size=224)
    assert caplog.text == ""


def test_models_do_not_print(capsys: pytest.CaptureFixture) -> None:
    model = timm.create_model("pvig_ti_224_gelu", img_size=64).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert capsys.readouterr().out == ""


def test_pvig_ti_macs_match_published() -> None:
    macs = count_macs(timm.create_model("pvig_ti_224_gelu"), 224)
    assert abs(macs / 1.7e9 - 1) < 0.03


# --- Similarity-threshold graph on pyramids (start_thresh / dec) -----------------------------------------

@pytest.fixture(scope="module")
def knn_64() -> PyramidVisionGNN:
    return timm.create_model("pvig_ti_224_gelu", img_size=64, num_classes=5)


@pytest.mark.parametrize("kwargs, start, dec", [
    (dict(start_thresh=0.89, dec=0.03), 0.89, 0.03),
    (dict(starting_threshold=0.8, decrement=0.05), 0.8, 0.05),
    (dict(start_thresh=0.9), 0.9, 0.03),
])
def test_start_thresh_builds_threshold_graphs_across_stages(knn_64: PyramidVisionGNN, kwargs: dict, start: float,
                                                           dec: float) -> None:
    model = timm.create_model("pvig_ti_224_gelu", img_size=64, num_classes=5, **kwargs)
    convs = [grapher.graph_conv for grapher in _graphers(model)]
    assert [c.graph for c in convs] == ["threshold"] * 12
    # Block i counts over all stages (Downsamples not counted): t_i = start - i * dec.
    assert_close([c.threshold for c in convs], [start - i * dec for i in range(12)], rtol=0, atol=1e-12)
    assert [c.r for c in convs] == [4, 4, 2, 2] + [1] * 8
    assert model.start_thresh == start and model.dec == dec and "graph=threshold" in model.extra_repr()
    knn = knn_64.state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in knn.items()}
    model.load_state_dict(knn, strict=True)


def test_threshold_pyramid_forward_backward_uses_pooled_keys_and_relative_pos() -> None:
    torch.manual_seed(0)
    model = timm.create_model("pvig_ti_224_gelu", img_size=64, num_classes=5, start_thresh=0.89, dec=0.03)
    graphs = []
    first = _graphers(model)[0]
    first.graph_conv.register_forward_hook(lambda conv, args, out: graphs.append(conv.build_graph(
        args[0], F.avg_pool2d(args[0], 4, 4), args[1])))
    image = torch.randn(2, 3, 64, 64)
    logits = model(image)
    logits.square().sum().backward()
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    assert graphs[0].shape == (2, 256, 16) and graphs[0].any()  # 16 x 16 centres against 4 x 4 pooled keys
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(not g.relative_pos.requires_grad and g.relative_pos.grad is None for g in _graphers(model))


def test_published_checkpoint_loads_into_the_threshold_pyramid(checkpoint_path: Path) -> None:
    model = timm.create_model("pvig_ti_224_gelu", start_thresh=0.89, dec=0.03)
    vig.load_checkpoint(model, checkpoint_path, strict=True)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 64, 64))).all()


def test_dec_without_start_thresh_is_refused() -> None:
    with pytest.raises(ValueError, match="needs start_thresh"):
        timm.create_model("pvig_ti_224_gelu", dec=0.03)


@pytest.mark.slow
@pytest.mark.parametrize("graph", [[], ["--start-thresh", "0.89", "--dec", "0.03"]], ids=["knn", "threshold"])
def test_short_training_run_with_each_graph(tmp_path: Path, graph: list[str]) -> None:
    """One optimiser step and one evaluation of pvig_ti_224_gelu at 64 px through train.py, with either graph."""
    data = make_image_folder(tmp_path / "data", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}}, size=64)
    argv = [str(data), "--model", "pvig_ti_224_gelu", "--img-size", "64", "--epochs", "1", "--warmup-epochs", "0",
            "--lr", "1e-3", "-b", "4", "-j", "0", "--output", str(tmp_path / "out"), "--experiment", "run", *graph]
    assert train.main(argv) == 0
    saved = torch.load(tmp_path / "out" / "run" / "last.pth.tar", weights_only=True)
    assert saved["args"]["start_thresh"] == (0.89 if graph else None)
    model = timm.create_model("pvig_ti_224_gelu", img_size=64, num_classes=2)
    model.load_state_dict(saved["state_dict"], strict=True)  # the kNN model's keys, whichever graph trained
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize("size", [(160, 160), (96, 96), (64, 64), (250, 250), (96, 160), (33, 47)])
def test_a_224_model_runs_at_smaller_and_odd_sizes_with_the_knn_capped_at_run_time(size: tuple[int, int]) -> None:
    model = PyramidVisionGNN(channels=(8, 16, 24, 32), blocks=(1, 1, 1, 3)).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        logits = model(x)
        maps = model.forward_intermediates(x, intermediates_only=True)
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    assert [tuple(m.shape[-2:]) for m in maps] == [tuple(g) for g in stage_grids(size)]


def test_sizes_whose_stage_maps_leave_no_key_node_are_one_value_error() -> None:
    model = PyramidVisionGNN(channels=(8, 16, 24, 32), blocks=(1, 1, 1, 1)).eval()
    with pytest.raises(ValueError, match="too small for pyramid ViG"):
        model(torch.randn(1, 3, 8, 8))


def test_relative_pos_is_a_persistent_buffer_and_no_parameter_is_frozen(checkpoint_path: Path) -> None:
    model = timm.create_model("pvig_ti_224_gelu")
    assert sum(not p.requires_grad for p in model.parameters()) == 0
    buffers = dict(model.named_buffers())
    assert all(key in buffers for key in model.state_dict() if key.endswith(".relative_pos"))
    assert sum(key.endswith(".relative_pos") for key in model.state_dict()) == 12
    model.load_state_dict(torch.load(checkpoint_path, map_location="cpu", weights_only=True), strict=True)
