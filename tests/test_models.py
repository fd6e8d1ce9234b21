"""Isotropic ViG / SViG models: published outputs, sizes, MACs, graph arguments and the timm API."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import timm
import torch
from torch.testing import assert_close

import vig
from tests.shared_files import shared_path
from vig.models import SIZES, VisionGNN
from vig.models import vig_blocks
from vig.models.isotropic import knn_schedule
from vig.models.vig_blocks import Grapher
from vig.tools.macs import count_macs, count_parameters

NAMES = [f"{prefix}_{size}_224_gelu" for prefix in ("vig", "svig") for size in ("ti", "s", "b")]




@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(shared_path("fixtures", "vig_ti_reference_outputs.pt"), weights_only=True)


@pytest.fixture(scope="module")
def checkpoint_path() -> Path:
    return shared_path("fixtures", "svig_ti_checkpoint.pth.tar")


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("case", ["svig0", "svig1", "svig2", "knn"])
def test_published_logits_reproduced_in_float64(case: str, reference: dict, checkpoint_path: Path) -> None:
    checkpoint = vig.read_checkpoint(checkpoint_path)
    weights, ema = checkpoint["state_dict"], checkpoint["state_dict_ema"]
    differing = {key for key in weights if not torch.equal(weights[key], ema[key])}
    # The EMA weights differ only in the classifier, so one backbone pass serves both heads.
    assert differing <= {"prediction.4.weight", "prediction.4.bias"}

    if case == "knn":
        expected, kwargs = reference["knn"], {}
    else:
        expected = reference["svig"][int(case[-1])]
        kwargs = dict(start_thresh=expected["start_thresh"], dec=expected["dec"])
    model = timm.create_model("vig_ti_224_gelu", **kwargs)
    vig.load_checkpoint(model, checkpoint_path, strict=True)
    model.double().eval()
    with torch.no_grad():
        features = model.forward_features(reference["input"].double())
        logits = model.forward_head(features)
        vig.load_checkpoint(model, checkpoint_path, use_ema=True, strict=True)
        logits_ema = model.forward_head(features)
    assert logits.dtype == torch.float64 and logits.shape == expected["logits"].shape
    assert _relative_error(logits, expected["logits"]) < 1e-6
    assert _relative_error(logits_ema, expected["logits_ema"]) < 1e-6


def _spec_parameter_count(channels: int, depth: int, num_classes: int = 1000, grid: int = 14) -> int:
    """Parameters of an isotropic ViG counted from the architecture description, not from the code."""
    def conv(c_in: int, c_out: int, kernel: int = 1, groups: int = 1) -> int:
        return c_in // groups * c_out * kernel * kernel + c_out

    def bn(width: int) -> int:
        return 2 * width

    widths = [3, channels // 8, channels // 4, channels // 2, channels]
    stem = sum(conv(a, b, 3) + bn(b) for a, b in zip(widths[:-1], widths[1:])) + conv(channels, channels, 3) + bn(channels)
    grapher = (conv(channels, channels) + bn(channels) + conv(2 * channels, 2 * channels, groups=4)
               + bn(2 * channels) + conv(2 * channels, channels) + bn(channels))
    ffn = conv(channels, 4 * channels) + bn(4 * channels) + conv(4 * channels, channels) + bn(channels)
    head = conv(channels, 1024) + bn(1024) + conv(1024, num_classes)
    return stem + channels * grid * grid + depth * (grapher + ffn) + head


@pytest.mark.parametrize("name, published_millions", [
    ("vig_ti_224_gelu", 7.18), ("vig_s_224_gelu", 22.75), ("vig_b_224_gelu", 86.84), ("svig_ti_224_gelu", 7.18),
])
def test_parameter_counts(name: str, published_millions: float) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = timm.create_model(name)
    size = SIZES[name.split("_")[1]]
    count = count_parameters(model)
    assert count == _spec_parameter_count(size.channels, size.depth)
    assert round(count / 1e6, 2) == published_millions


def test_vig_ti_macs_match_published() -> None:
    macs = count_macs(timm.create_model("vig_ti_224_gelu"), 224)
    assert abs(macs / 1.31e9 - 1) < 0.01


@pytest.mark.parametrize("name", NAMES)
def test_every_name_is_one_class_with_the_published_config(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    assert type(model) is VisionGNN
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    assert (model.start_thresh is not None) == name.startswith("svig")


def _graph_convs(model: VisionGNN) -> list:
    return [block[0].graph_conv for block in model.backbone]


def test_knn_schedule_is_the_published_one() -> None:
    convs = _graph_convs(timm.create_model("vig_ti_224_gelu"))
    assert [c.k for c in convs] == [9, 9, 10, 11, 12, 13, 13, 14, 15, 16, 17, 18]
    assert [c.dilation for c in convs] == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert all(c.graph == "knn" for c in convs)
    convs = _graph_convs(timm.create_model("vig_s_224_gelu", num_knn=6))
    assert [c.k for c in convs][::5] == [6, 8, 10, 12]
    assert [c.dilation for c in convs][::5] == [1, 2, 3, 4]


@pytest.mark.parametrize("name, kwargs, start, dec", [
    ("svig_ti_224_gelu", {}, 0.89, 0.03),
    ("vig_ti_224_gelu", dict(start_thresh=0.93, dec=0.03), 0.93, 0.03),
    ("vig_ti_224_gelu", dict(starting_threshold=0.8, decrement=0.05), 0.8, 0.05),
    ("svig_ti_224_gelu", dict(start_thresh=0.9, dec=0.0), 0.9, 0.0),
    ("svig_ti_224_gelu", dict(dec=0.1), 0.89, 0.1),
])
def test_threshold_arguments(name: str, kwargs: dict, start: float, dec: float) -> None:
    convs = _graph_convs(timm.create_model(name, img_size=32, **kwargs))
    assert all(c.graph == "threshold" for c in convs)
    assert [c.threshold for c in convs] == pytest.approx([start - i * dec for i in range(12)])


@pytest.mark.parametrize("kwargs, message", [
    (dict(dec=0.03), "needs start_thresh"),
    (dict(start_thresh=0.9, starting_threshold=0.9), "not both"),
    (dict(start_thresh=1.0), "below 1"),
    (dict(start_thresh=0.9, dec=-0.1), "threshold >= 1"),
])
def test_bad_graph_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        timm.create_model("vig_ti_224_gelu", **kwargs)


@pytest.mark.parametrize("graph, message", [
    (dict(kernel_size=3, threshold=0.5), "graph='knn' does not use threshold=0.5"),
    (dict(dilation=2, threshold=0.5), "graph='knn' does not use threshold=0.5"),
    (dict(graph="threshold", threshold=0.5, kernel_size=3), "graph='threshold' does not use kernel_size=3"),
])
def test_grapher_refuses_arguments_its_graph_does_not_use(graph: dict, message: str) -> None:
    """A Grapher hands its graph arguments to DynConv2d unchanged; none is silently dropped."""
    with pytest.raises(ValueError, match=re.escape(message)):
        Grapher(16, "gelu", 0.0, **graph)


def test_small_img_size_caps_k_and_dilation_with_a_warning(caplog: pytest.LogCaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vig_blocks, "_logged_caps", set())  # as in a fresh process
    with caplog.at_level(logging.WARNING, logger="vig.models.vig_blocks"):
        model = timm.create_model("vig_ti_224_gelu", img_size=64, num_classes=3)
    assert "16 graph nodes cap the kNN schedule" in caplog.text
    assert model.pos_embed.shape == (1, 192, 4, 4)
    for conv in _graph_convs(model):
        assert conv.k * conv.dilation <= 16
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vig.models.vig_blocks"):
        published = timm.create_model("vig_ti_224_gelu")
    assert caplog.text == ""
    assert knn_schedule(9, 12, 196) == [(c.k, c.dilation) for c in _graph_convs(published)]


@pytest.mark.parametrize("num_nodes", [4, 16])
def test_the_knn_cap_warning_is_logged_once_per_process_and_schedule(num_nodes: int, caplog: pytest.LogCaptureFixture,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vig_blocks, "_logged_caps", set())
    with caplog.at_level(logging.WARNING, logger="vig.models.vig_blocks"):
        first = [knn_schedule(9, 12, num_nodes) for _ in range(3)]
        other = knn_schedule(9, 12, num_nodes + 1)
    assert first[0] == first[1] == first[2] != other
    messages = [record.getMessage() for record in caplog.records]
    assert [message.split(" graph nodes")[0] for message in messages] == [str(num_nodes), str(num_nodes + 1)], messages


def test_checkpoint_at_another_img_size_resizes_pos_embed(checkpoint_path: Path) -> None:
    model = timm.create_model("svig_ti_224_gelu", img_size=112)
    vig.load_checkpoint(model, checkpoint_path, strict=True)
    source = vig.read_checkpoint(checkpoint_path)["state_dict"]["pos_embed"]
    expected = torch.nn.functional.interpolate(source, size=(7, 7), mode="bicubic", align_corners=False)
    assert_close(model.pos_embed.data, expected)
    with pytest.raises(ValueError, match="img_size"):
        model(torch.randn(1, 3, 224, 224))


def _tiny(name: str = "vig_ti_224_gelu", **kwargs) -> VisionGNN:
    torch.manual_seed(0)
    kwargs.setdefault("img_size", 48)
    return timm.create_model(name, **kwargs).eval()


def test_num_classes_and_reset_classifier_round_trip() -> None:
    model = _tiny(num_classes=10, drop_rate=0.25)
    image = torch.randn(2, 3, 48, 48)
    assert model.prediction[3].p == 0.25
    assert model(image).shape == (2, 10)
    assert model.get_classifier().out_channels == 10
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features(image), pre_logits=True)
        assert pre_logits.shape == (2, 1024)
        model.reset_classifier(5)
        assert model(image).shape == (2, 5) and model.num_classes == 5
        model.reset_classifier(0)
        assert_close(model(image), pre_logits)
    assert "prediction.4.weight" not in model.state_dict()


def test_forward_is_head_of_features() -> None:
    model = _tiny("svig_ti_224_gelu")
    image = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        features = model.forward_features(image)
        assert features.shape == (2, 192, 3, 3)
        assert_close(model(image), model.forward_head(features))


def test_drop_path_schedule() -> None:
    model = _tiny(drop_path_rate=0.1)
    rates = [block[0].drop_path.drop_prob if i else 0.0 for i, block in enumerate(model.backbone)]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 12).tolist())
    assert isinstance(model.backbone[0][1].drop_path, torch.nn.Identity)


def test_features_only_gives_every_block_at_stride_16() -> None:
    model = _tiny()
    features = _tiny(features_only=True)
    assert features.feature_info.channels() == [192] * 12
    assert features.feature_info.reduction() == [16] * 12
    image = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        maps = features(image)
        assert len(maps) == 12 and all(m.shape == (2, 192, 3, 3) for m in maps)
        assert_close(maps[-1], model.forward_features(image))
        some = _tiny(features_only=True, out_indices=(1, 4))
        assert len(some.model.backbone) == 5
        picked = some(image)
    assert [m.shape for m in picked] == [(2, 192, 3, 3)] * 2
    assert_close(picked[1], maps[4])


def test_models_do_not_print(capsys: pytest.CaptureFixture) -> None:
    model = _tiny(img_size=32)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert capsys.readouterr().out == ""
