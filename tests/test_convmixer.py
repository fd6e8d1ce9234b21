"""ConvMixer / ConvMixer-XL for CIFAR (project issue #17): published parameter counts and layer order, the
inter-block skip as a real residual, checkpointing and features of the grouped stack, the published
per-step learning-rate schedule, and short train.py runs of both models."""
from __future__ import annotations

import copy
import csv
from pathlib import Path
from typing import Any, Callable

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import group_parameters
from torch import nn
from torch.testing import assert_close

import train
import vig  # noqa: F401  (registers the models with timm)
from tests.train_helpers import make_image_folder
from vig.complexity import count_saved_activations
from vig.models.convmixer_cifar import BlockSequence, ConvMixerCifar
from vig.trainer.schedule import OneCycleLinearScheduler

SMALL = dict(dim=8, kernel_size=3)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


@pytest.mark.parametrize(("name", "kwargs", "expected"), [
    ("convmixer_cifar", {}, 594_186),
    ("convmixer_cifar", dict(act="relu"), 594_186),
    ("convmixer_xl_cifar", {}, 4_855_562),
    ("convmixer_xl_cifar", dict(skip_period=0, act="gelu"), 4_855_562),
])
def test_parameter_counts_are_the_published_ones(name: str, kwargs: dict[str, Any], expected: int) -> None:
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    assert sum(param.numel() for param in model.parameters()) == expected


def _bn(x: torch.Tensor, norm: nn.BatchNorm2d) -> torch.Tensor:
    return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)


def _reference(model: ConvMixerCifar, images: torch.Tensor, act: str, patch: int, skip_period: int) -> torch.Tensor:
    """The published ConvMixer(-XL) forward in eval mode, written out with functional ops on the model's
    weights: images (B, 3, H, W) -> logits (B, classes)."""
    f = ACTIVATIONS[act]
    conv, norm = model.stem[0], model.stem[2]
    x = _bn(f(F.conv2d(images, conv.weight, conv.bias, stride=patch)), norm)
    blocks = _blocks(model)
    per_group = len(blocks) // skip_period if skip_period else len(blocks)
    for start in range(0, len(blocks), per_group):
        group_input = x
        for residual, pointwise, _, norm2 in blocks[start:start + per_group]:
            depthwise, _, norm1 = residual.fn
            pad = depthwise.kernel_size[0] // 2
            x = x + _bn(f(F.conv2d(x, depthwise.weight, depthwise.bias, padding=pad, groups=x.shape[1])), norm1)
            x = _bn(f(F.conv2d(x, pointwise.weight, pointwise.bias)), norm2)
        if skip_period:
            x = x + group_input
    return F.linear(x.mean(dim=(2, 3)), model.head.weight, model.head.bias)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """Every block of the model, in order (inside the residual groups too)."""
    return [block for sequence in model.modules() if isinstance(sequence, BlockSequence) for block in sequence]


def _randomise_norms(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            for tensor in (module.weight.data, module.bias.data, module.running_mean):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


@pytest.mark.parametrize(("act", "depth", "skip_period", "patch"),
                         [("gelu", 3, 0, 2), ("relu", 2, 0, 4), ("silu", 6, 3, 2), ("gelu", 6, 2, 1)])
def test_forward_is_the_published_layer_order(act: str, depth: int, skip_period: int, patch: int) -> None:
    torch.manual_seed(0)
    model = ConvMixerCifar(act=act, depth=depth, skip_period=skip_period, patch_size=patch, **SMALL).eval()
    _randomise_norms(model)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_close(model(images), _reference(model, images, act, patch, skip_period))


def _grouped_weights(flat: dict[str, torch.Tensor], depth: int, skip_period: int) -> dict[str, torch.Tensor]:
    """State dict of a skip_period 0 model renamed for a model with residual groups (blocks.i -> blocks.g.fn.j)."""
    per_group = depth // skip_period
    renamed = {}
    for key, value in flat.items():
        parts = key.split(".")
        if parts[0] == "blocks":
            index = int(parts[1])
            parts[1:2] = [str(index // per_group), "fn", str(index % per_group)]
        renamed[".".join(parts)] = value
    return renamed


def _zero_block_outputs(model: nn.Module) -> None:
    """Scale and shift 0 in the last BatchNorm of every block: each block then outputs zeros."""
    for block in _blocks(model):
        nn.init.zeros_(block[3].weight)
        nn.init.zeros_(block[3].bias)


@pytest.mark.parametrize("skip_period", [3, 2])
def test_the_inter_block_skip_is_a_residual_around_each_group(skip_period: int) -> None:
    torch.manual_seed(0)
    plain = ConvMixerCifar(depth=6, skip_period=0, **SMALL).eval()
    _randomise_norms(plain)
    grouped = ConvMixerCifar(depth=6, skip_period=skip_period, **SMALL).eval()
    grouped.load_state_dict(_grouped_weights(plain.state_dict(), 6, skip_period), strict=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(grouped(images), plain(images), atol=1e-3)
        for model in (plain, grouped):
            _zero_block_outputs(model)
        stem_through_head = grouped.forward_head(grouped.stem(images))
        assert_close(grouped(images), stem_through_head)
        # without the skip the zeroed stack leaves nothing of the stem: only the classifier's bias
        assert_close(plain(images), plain.head.bias.expand(2, -1))
        assert not torch.allclose(stem_through_head, plain.head.bias.expand(2, -1), atol=1e-3)


def _saved_bytes(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    """Output, bytes of activations kept for backward (parameters not counted), and gradients."""
    with count_saved_activations(model) as saved:
        output = model(images)
    output.square().sum().backward()
    return output.detach(), saved.bytes, {key: param.grad.clone() for key, param in model.named_parameters()}


@pytest.mark.parametrize("skip_period", [0, 3])
def test_grad_checkpointing_recomputes_every_block(skip_period: int) -> None:
    torch.manual_seed(0)
    model = ConvMixerCifar(depth=6, skip_period=skip_period, **SMALL).double().train()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    output, plain_bytes, grads = _saved_bytes(model, images)
    output_ckpt, ckpt_bytes, grads_ckpt = _saved_bytes(checkpointed, images)
    assert_close(output_ckpt, output)
    for key in grads:
        assert_close(grads_ckpt[key], grads[key], msg=key)
    # each of the 6 blocks keeps only its input (and each group its residual input, the same tensor)
    block_input = 2 * 8 * 16 * 16 * 8
    assert ckpt_bytes < plain_bytes / 3 and ckpt_bytes <= 6 * block_input + plain_bytes / 6, (ckpt_bytes, plain_bytes)


@pytest.mark.parametrize(("skip_period", "stages"), [(0, 6), (3, 3), (2, 2)])
def test_stages_are_blocks_or_residual_groups(skip_period: int, stages: int) -> None:
    kwargs = dict(depth=6, skip_period=skip_period, **SMALL)
    torch.manual_seed(0)
    model = timm.create_model("convmixer_xl_cifar", **kwargs).eval()
    torch.manual_seed(0)  # the same initial weights
    backbone = timm.create_model("convmixer_xl_cifar", features_only=True, **kwargs).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, maps = model.forward_intermediates(images)
        features = backbone(images)
        assert_close(final, model.forward_features(images))
    assert len(maps) == len(features) == len(model.feature_info) == stages
    assert [feature.shape for feature in features] == [(2, 8, 16, 16)] * stages
    assert_close(maps[-1], final)
    for feature, expected in zip(features, maps):
        assert_close(feature, expected)
    for coarse, groups in ((False, 6), (True, stages)):
        grouped = group_parameters(model, model.group_matcher(coarse=coarse))
        assert sorted(n for names in grouped.values() for n in names) == sorted(n for n, _ in model.named_parameters())
        assert len(grouped) == groups + 2  # stem, blocks (or groups), head


@pytest.mark.parametrize(("kwargs", "message"), [(dict(depth=8, skip_period=3), "skip_period"),
                                                  (dict(act="nonsense"), "act"), (dict(dim=0), "dim")])
def test_bad_arguments_are_one_line_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConvMixerCifar(**kwargs)


LR = 0.005


@pytest.mark.parametrize(("total", "step", "expected"), [
    (100, 0, 0.0), (100, 20, LR / 2), (100, 40, LR), (100, 60, (LR + LR / 20) / 2), (100, 80, LR / 20),
    (100, 90, LR / 40), (100, 100, 0.0), (250, 100, LR), (250, 200, LR / 20), (250, 250, 0.0), (250, 0, 0.0),
])
def test_onecycle_linear_values(total: int, step: int, expected: float) -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = OneCycleLinearScheduler(optimizer, total)
    assert optimizer.param_groups[0]["lr"] == 0.0  # the first step runs at the schedule's start
    scheduler.step_update(num_updates=step)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    scheduler.step(epoch=1)  # epoch ends change nothing: the schedule is per update
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_onecycle_linear_resumes_from_its_state() -> None:
    """What a resumed run does: fresh optimizer and scheduler, both states loaded, then scheduler.step(epoch)."""
    weights = [nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW(weights, lr=LR)
    scheduler = OneCycleLinearScheduler(optimizer, 100)
    scheduler.step_update(num_updates=55)
    state = copy.deepcopy({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
    scheduler.step_update(num_updates=56)

    resumed_optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=LR)
    resumed = OneCycleLinearScheduler(resumed_optimizer, 100)
    resumed_optimizer.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["scheduler"])
    resumed.step(epoch=5)
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(LR / 20 + (LR - LR / 20) * 25 / 40)
    resumed.step_update(num_updates=56)
    assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert resumed.state_dict() == scheduler.state_dict()


@pytest.mark.parametrize(("name", "epochs", "lrs"), [
    # 2 updates per epoch: after update 2 of 4 the rate is on the 40 % -> 80 % ramp; at the end it is 0
    ("convmixer_cifar", 2, [LR * (1 - 0.25 * 0.95), 0.0]),
    ("convmixer_xl_cifar", 1, [0.0]),
])
def test_train_py_runs_each_model_with_the_published_schedule(tmp_path: Path, name: str, epochs: int,
                                                              lrs: list[float]) -> None:
    data = make_image_folder(tmp_path / "data", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}}, size=32)
    argv = [str(data), "--model", name, "--epochs", str(epochs), "-b", "2", "-j", "0", "--opt", "adamw",
            "--lr", str(LR),
            "--weight-decay", "0.01", "--smoothing", "0", "--sched", "onecycle-linear",
            "--output", str(tmp_path / "out"), "--experiment", "run"]
    assert train.main(argv) == 0
    folder = tmp_path / "out" / "run"
    with open(folder / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["lr"]) for row in rows] == pytest.approx(lrs)
    state = torch.load(folder / "last.pth.tar", weights_only=True)
    with torch.device("meta"):
        expected = timm.create_model(name, num_classes=2).state_dict()
    assert {key: value.shape for key, value in state["state_dict"].items()} == \
        {key: value.shape for key, value in expected.items()}


def test_train_py_resumes_the_published_schedule(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}}, size=32)
    common = [str(data), "--model", "convmixer_cifar", "--model-kwargs", "dim=8", "depth=2", "--epochs", "3",
              "-b", "2", "-j", "0", "--lr", str(LR), "--sched", "onecycle-linear", "--output", str(tmp_path / "out")]
    assert train.main([*common, "--experiment", "full"]) == 0
    full, resumed = tmp_path / "out" / "full", tmp_path / "out" / "resumed"
    resumed.mkdir()
    torch.save(torch.load(full / "checkpoint-0.pth.tar", weights_only=True), resumed / "last.pth.tar")
    assert train.main([*common, "--experiment", "resumed", "--resume", "auto"]) == 0
    expected = torch.load(full / "last.pth.tar", weights_only=True)
    state = torch.load(resumed / "last.pth.tar", weights_only=True)
    assert state["scheduler"] == expected["scheduler"]
    torch.testing.assert_close(state["optimizer"], expected["optimizer"])
    torch.testing.assert_close(state["state_dict"], expected["state_dict"])
