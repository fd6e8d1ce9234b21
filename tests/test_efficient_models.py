"""MobileViG and GreedyViG: exact parameter counts, the published fixtures in float64, the DeiT-style
distillation head and the feature API."""
from __future__ import annotations

import pytest
import timm
import torch

import vig  # (registers the models)
from vig.checkpoint import checkpoint_filter_fn
from tests.shared_files import shared_path

PARAMS = {"mobilevig_ti": 5_271_074, "mobilevig_s": 7_276_538, "mobilevig_m": 14_075_786, "mobilevig_b": 26_868_506,
          "greedyvig_s": 11_983_376, "greedyvig_m": 21_928_112, "greedyvig_b": 30_905_296}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_trainable_parameter_count(name: str) -> None:
    model = timm.create_model(name, device="meta")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == PARAMS[name]
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("loader", ["timm pretrained=True", "vig.load_checkpoint"])
@pytest.mark.parametrize("name", ["mobilevig_ti", "greedyvig_s"])
def test_published_fixture_float64(name: str, loader: str) -> None:
    """The published code's float64 logits and stage maps, exactly (the same operations in the same order), with
    the published state dict loaded strictly through timm's pretrained path (our checkpoint_filter_fn) or the
    trainer's loader."""
    path = shared_path("fixtures", f"{name}_checkpoint.pth")
    reference = torch.load(shared_path("fixtures", f"{name}_reference_outputs.pt"), map_location="cpu")
    if loader == "vig.load_checkpoint":
        model = timm.create_model(name)
        vig.load_checkpoint(model, path, strict=True)
    else:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    model = model.double().eval()
    x = reference["input"][:2].double()
    with torch.no_grad():
        logits = model(x)
        maps = model.forward_intermediates(x, intermediates_only=True)
    torch.testing.assert_close(logits, reference["logits"][:2], rtol=0, atol=0)
    assert [m.shape[-1] for m in maps] == [56, 28, 14, 7]
    for got, expected in zip(maps, reference["features"]):
        torch.testing.assert_close(got, expected[:2], rtol=0, atol=0)


def test_greedyvig_published_inverted_residuals_are_renamed_into_the_shared_block() -> None:
    """GreedyViG publishes its inverted residuals as ``dws.{pw1,norm1,dw,norm2,pw2,norm3}`` with a (C,) layer scale;
    the shared block (MobileViG's layout) holds ``mlp.*`` and (C, 1, 1). The filter renames the one into the other
    and leaves a state dict already in the shared layout as it is."""
    published = torch.load(shared_path("fixtures", "greedyvig_s_checkpoint.pth"), map_location="cpu")
    assert "backbone.0.0.dws.pw1.weight" in published and published["backbone.0.0.layer_scale_2"].shape == (48,)
    model = timm.create_model("greedyvig_s")
    remapped = checkpoint_filter_fn(published, model)
    assert sorted(remapped) == sorted(model.state_dict())
    assert remapped["backbone.0.0.layer_scale_2"].shape == (48, 1, 1)
    assert remapped["backbone.0.2.layer_scale_2"].shape == (48,)  # a graph block's own (C,) scale is kept
    torch.testing.assert_close(remapped["backbone.0.0.mlp.mid.weight"], published["backbone.0.0.dws.dw.weight"])
    again = checkpoint_filter_fn(remapped, model)
    assert again.keys() == remapped.keys() and all(again[key] is remapped[key] for key in again)


@pytest.mark.parametrize("name", ["mobilevig_ti", "greedyvig_s"])
def test_distillation_head_as_deit(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        mean = model(x)
        features = model.prediction(model.forward_features(x))
        head, dist = model.head(features).flatten(1), model.dist_head(features).flatten(1)
    torch.testing.assert_close(mean, (head + dist) / 2)
    model.train()
    assert torch.is_tensor(model(x))
    model.set_distilled_training(True)
    pair = model(x)
    assert isinstance(pair, tuple) and [p.shape for p in pair] == [(2, 5), (2, 5)]
    model.eval()
    assert torch.is_tensor(model(x))


@pytest.mark.parametrize("name", ["mobilevig_ti", "greedyvig_s"])
def test_features_only_strides(name: str) -> None:
    model = timm.create_model(name, features_only=True).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 64, 96))
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert [m.shape[1] for m in maps] == model.feature_info.channels()


@pytest.mark.parametrize("name", ["mobilevig_ti", "greedyvig_s"])
def test_features_only_takes_a_coco_style_800_by_1216_input(name: str) -> None:
    model = timm.create_model(name, features_only=True).eval()
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 800, 1216))
    assert [tuple(m.shape[-2:]) for m in maps] == [(800 // s, 1216 // s) for s in (4, 8, 16, 32)]
    assert all(torch.isfinite(m).all() for m in maps)


@pytest.mark.parametrize("name", ["mobilevig_ti", "greedyvig_s"])
def test_forward_intermediates_stops_after_the_last_requested_stage(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        last, early = model.forward_intermediates(x, indices=[0, 1], stop_early=True)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert len(early) == 2 and all(torch.equal(a, b) for a, b in zip(early, maps[:2]))
    assert torch.equal(last, maps[1])  # no layer after stage 1 ran


@pytest.mark.parametrize("name", ["mobilevig_ti", "greedyvig_s"])
def test_efficient_models_run_channels_last_except_in_float64(name: str) -> None:
    """The stem hands the maps on channels-last (the fast layout for these convolutions on the CPU); float64,
    the dtype of the bit-exact checks against the published code, keeps the contiguous layout. Both layouts
    give the same logits to float32 rounding."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        assert all(m.is_contiguous(memory_format=torch.channels_last) and not m.is_contiguous() for m in maps)
        logits = model(x)
        double = model.double()
        maps64 = double.forward_intermediates(x.double(), intermediates_only=True)
        assert all(m.is_contiguous() for m in maps64)
        torch.testing.assert_close(logits.double(), double(x.double()), rtol=1e-4, atol=1e-4)
