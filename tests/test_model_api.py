"""The project's own checks of timm's model API on every registered model (project issue #13).

These are the project's reading of the API, not timm's: timm's own model test suite is the judge
(`tests/test_timm_suite.py` runs it on one model per class, `benchmarks/timm_suite.py` on all of them).

The models are found through timm's registry (every module of ``vig.models``), so a newly registered
model that misses part of the API fails here without being listed. Every registered name is checked
on the meta device (no compute); the smallest model of each class also runs every call for real.
"""
from __future__ import annotations

import copy
import pkgutil
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from timm.models import group_parameters
from torch import nn
from torch.testing import assert_close

import vig.models
from vig.complexity import count_saved_activations
from vig.models.training_api import BatchDependent

# construction arguments that keep each test fast on a CPU; models not listed are built with their defaults
SMALL: dict[str, dict[str, Any]] = {
    "bgnn": dict(backbone="mobilenetv3_small_050", edge_features=8),
    "bgnn_mobilenetv3_small_100": dict(edge_features=8),
    "cnn_gat_cifar": dict(hidden=16, heads=2, embed_dim=16, num_blocks=2),
    "convmixer_cifar": dict(dim=16, depth=4),
    "convmixer_xl_cifar": dict(dim=16, depth=3),  # the smaller: the API runs through the residual groups
    "vig_ti_cifar": dict(channels=16, depth=2),
    "svig_ti_cifar": dict(channels=16, depth=2),
    "pvig_ti_cifar": dict(stem_stride=4),  # the published stem: stage maps 8, 4, 2, 1 at 32 px
}
SMALL_IMG_SIZE = 32  # for models that take img_size


def project_models() -> list[str]:
    """Every timm model name registered by a module of the vig.models package."""
    modules = [info.name for info in pkgutil.iter_modules(vig.models.__path__)]
    return sorted(timm.list_models(module=modules))


MODELS = project_models()


def smallest_of_each_class() -> list[str]:
    """One model name per model class and graph rule (kNN or threshold, for classes that switch): the one
    with the fewest parameters (counted on the meta device)."""
    smallest: dict[tuple[type, bool], tuple[int, str]] = {}
    for name in MODELS:
        with torch.device("meta"):
            model = timm.create_model(name, **SMALL.get(name, {}))
        kind = (type(model), getattr(model, "start_thresh", None) is None)
        count = sum(param.numel() for param in model.parameters())
        if kind not in smallest or count < smallest[kind][0]:
            smallest[kind] = (count, name)
    return sorted(name for _, name in smallest.values())


def _build(name: str, **kwargs: Any) -> tuple[nn.Module, torch.Tensor]:
    """The model with small arguments and a batch of two matching images (2, 3, H, W)."""
    options = {**SMALL.get(name, {}), **kwargs}
    try:
        model = timm.create_model(name, img_size=SMALL_IMG_SIZE, **options)
        size = (SMALL_IMG_SIZE, SMALL_IMG_SIZE)
    except TypeError:  # a model without img_size runs at its configured input size
        model = timm.create_model(name, **options)
        size = tuple(model.pretrained_cfg["input_size"][1:])
    torch.manual_seed(0)
    return model, torch.randn(2, 3, *size)


RUN = smallest_of_each_class()


def test_the_registry_holds_every_model_family() -> None:
    assert {"vig_ti_224_gelu", "svig_ti_224_gelu", "pvig_ti_224_gelu", "vig_ti_cifar", "svig_ti_cifar",
            "pvig_ti_cifar", "cnn_gat_cifar", "convmixer_cifar", "convmixer_xl_cifar", "bgnn"} <= set(MODELS)
    # every model class of the package runs for real, the isotropic one with both graph rules
    with torch.device("meta"):
        run = [timm.create_model(name, **SMALL.get(name, {})) for name in RUN]
    classes = [cls for cls in vars(vig.models).values() if isinstance(cls, type) and issubclass(cls, nn.Module)]
    assert {type(model) for model in run} == set(classes)
    assert {model.start_thresh is None for model in run if type(model) is vig.models.VisionGNN} == {True, False}


@pytest.mark.parametrize("name", MODELS)
def test_every_registered_model_runs_on_the_meta_device(name: str) -> None:
    """A forward pass on tensors without data, in eval mode, at the model's default input size (what timm's
    test_model_default_cfgs does): no graph rule may read data to choose its path (the threshold graph's
    density choice did)."""
    with torch.device("meta"):
        model = timm.create_model(name, **SMALL.get(name, {})).eval()
        size = model.pretrained_cfg["input_size"]
        out = model(torch.randn(2, *size))
    assert out.is_meta and out.shape == (2, model.num_classes)


@pytest.mark.parametrize("name", MODELS)
def test_every_registered_model_has_the_api(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name, **SMALL.get(name, {}))
        headless = timm.create_model(name, num_classes=0, **SMALL.get(name, {}))
    for method in ("forward_features", "forward_head", "forward_intermediates", "get_classifier",
                   "reset_classifier", "set_grad_checkpointing", "group_matcher"):
        assert callable(getattr(model, method, None)), method
    classifiers = headless.get_classifier()  # distilled models (as timm's DeiT) give (head, dist_head)
    classifiers = classifiers if isinstance(classifiers, tuple) else (classifiers,)
    assert all(isinstance(c, nn.Identity) for c in classifiers) and headless.num_classes == 0
    assert model.num_features > 0 and model.head_hidden_size > 0
    assert len(model.feature_info) >= 1
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    groups = group_parameters(model, model.group_matcher())
    grouped = sorted(param for names in groups.values() for param in names)
    assert grouped == sorted(param for param, _ in model.named_parameters())
    names = model.pretrained_cfg["classifier"]
    assert set(names if isinstance(names, tuple) else (names,)) <= set(dict(model.named_modules()))


@pytest.mark.parametrize("name", RUN)
def test_pre_logits_three_ways(name: str) -> None:
    model, images = _build(name)
    model.eval()
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features(images), pre_logits=True)
        assert pre_logits.shape == (2, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0
        assert_close(model(images), pre_logits)
        model.reset_classifier(5)
        assert model(images).shape == (2, 5) and model.get_classifier() is not None
    headless, images = _build(name, num_classes=0)
    with torch.no_grad():
        assert headless.eval()(images).shape == (2, headless.head_hidden_size)


def _saved_bytes_and_grads(model: nn.Module,
                           images: torch.Tensor) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    """Output, bytes of activations the autograd graph keeps for backward (parameters not counted; tensors
    saved inside checkpointed regions are not kept), and gradients."""
    torch.manual_seed(1)
    with count_saved_activations(model) as saved:
        output = model(images)
    output.square().sum().backward()
    grads = {key: param.grad.clone() for key, param in model.named_parameters() if param.grad is not None}
    return output.detach(), saved.bytes, grads


@pytest.mark.parametrize("name", RUN)
def test_grad_checkpointing_is_switchable(name: str) -> None:
    model, images = _build(name)
    model.train().set_grad_checkpointing(True)
    _, checkpointed_bytes, grads = _saved_bytes_and_grads(model, images)
    model.set_grad_checkpointing(False)
    model.zero_grad()
    _, plain_bytes, _ = _saved_bytes_and_grads(model, images)
    assert grads.keys() == {key for key, param in model.named_parameters() if param.requires_grad}
    assert checkpointed_bytes < plain_bytes / 2, (checkpointed_bytes, plain_bytes)


@pytest.mark.parametrize("name", RUN)
def test_grad_checkpointing_keeps_values_and_saves_memory(name: str) -> None:
    model, images = _build(name)
    model, images = model.double().train(), images.double()  # float64: the recomputation is bitwise the same
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    output, plain_bytes, grads = _saved_bytes_and_grads(model, images)
    output_ckpt, ckpt_bytes, grads_ckpt = _saved_bytes_and_grads(checkpointed, images)
    assert_close(output_ckpt, output)
    assert grads_ckpt.keys() == grads.keys()
    for key in grads:
        assert_close(grads_ckpt[key], grads[key], msg=key)
    assert ckpt_bytes < plain_bytes / 2, (ckpt_bytes, plain_bytes)


@pytest.mark.parametrize("name", RUN)
@pytest.mark.parametrize("coarse", [False, True])
def test_group_matcher_groups_every_parameter(name: str, coarse: bool) -> None:
    model, _ = _build(name)
    groups = group_parameters(model, model.group_matcher(coarse=coarse))
    grouped = [param for names in groups.values() for param in names]
    assert sorted(grouped) == sorted(name for name, _ in model.named_parameters())
    assert len(groups) >= 3  # stem, at least one block, head


def _batch_dependent(name: str) -> bool:
    with torch.device("meta"):
        return isinstance(timm.create_model(name, **SMALL.get(name, {})), BatchDependent)


DENSE = [name for name in RUN if not _batch_dependent(name)]
BATCH_MIXING = [name for name in RUN if _batch_dependent(name)]


@pytest.mark.parametrize("name", BATCH_MIXING)
def test_a_batch_mixing_model_refuses_features_only_in_one_line(name: str) -> None:
    """Its head mixes the images of a batch: no dense per-image backbone to give a detector."""
    with pytest.raises(ValueError, match="features_only is not supported: the batch-graph head mixes") as err:
        _build(name, features_only=True)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", DENSE)
def test_features_only_leaves_no_parameter_unused(name: str) -> None:
    """A detector trains a features_only backbone under DDP with find_unused_parameters=False: every parameter
    must get a gradient from the maps (no classifier head left behind), at every deepest level."""
    full, images = _build(name)
    for last in range(len(full.feature_info)):
        backbone, _ = _build(name, features_only=True, out_indices=(last,))
        maps = backbone.train()(images)
        sum(m.sum() for m in maps).backward()
        unused = [key for key, param in backbone.named_parameters() if param.grad is None]
        assert not unused, f"out_indices=({last},): unused {unused}"


@pytest.mark.parametrize("name", DENSE)
def test_features_only_gives_maps_as_feature_info_says(name: str) -> None:
    backbone, images = _build(name, features_only=True)
    with torch.no_grad():
        maps = backbone.eval()(images)
    info = backbone.feature_info
    assert len(maps) == len(info.channels()) >= 1
    for feature, channels, reduction in zip(maps, info.channels(), info.reduction()):
        assert feature.shape[:2] == (2, channels)
        assert feature.shape[2:] == tuple(-(-side // reduction) for side in images.shape[2:])


@pytest.mark.parametrize("name", RUN)
@pytest.mark.parametrize("layout", ["trainer dict with module. prefixes", "bare state dict"])
def test_timm_loads_project_checkpoints_through_the_filter(tmp_path: Path, name: str, layout: str) -> None:
    source, _ = _build(name)
    weights = source.state_dict()
    if layout == "bare state dict":
        saved: dict[str, Any] = weights
    else:
        saved = {"state_dict": {f"module.{key}": value for key, value in weights.items()}, "epoch": 3}
    path = tmp_path / "weights.pth.tar"
    torch.save(saved, path)
    loaded, _ = _build(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, weights[key]), key
