"""Checkpoint files: safe reading, the published layouts, strict loading and one-line errors."""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch.testing import assert_close

import vig
from tests.shared_files import shared_path
from vig.checkpoint import CheckpointError, extract_state_dict, load_state_dict_into, read_checkpoint
from vig.model_settings import recorded_settings
from vig.models import VisionGNN





@pytest.fixture(scope="module")
def published() -> Path:
    return shared_path("fixtures", "svig_ti_checkpoint.pth.tar")


def _small(num_classes: int = 10, seed: int = 0) -> VisionGNN:
    torch.manual_seed(seed)
    return VisionGNN(channels=16, depth=2, num_classes=num_classes, img_size=32)


def _assert_same_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert set(own) == set(state_dict)
    for key, value in state_dict.items():
        assert_close(own[key], value, rtol=0, atol=0)


def _assert_one_line_naming(error: pytest.ExceptionInfo, path: Path) -> str:
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    return message


def test_published_checkpoint_reads_safely(published: Path) -> None:
    checkpoint = vig.read_checkpoint(published)
    assert isinstance(checkpoint["args"], argparse.Namespace)
    assert checkpoint["arch"] == "vig_ti_224_gelu"
    assert {"state_dict", "state_dict_ema", "optimizer", "epoch"} <= set(checkpoint)


@pytest.mark.parametrize("use_ema, entry", [(False, "state_dict"), (True, "state_dict_ema")])
def test_published_checkpoint_loads_strictly(published: Path, use_ema: bool, entry: str) -> None:
    model = timm.create_model("vig_ti_224_gelu")
    report = vig.load_checkpoint(model, published, use_ema=use_ema)
    assert report.source == entry and not (report.missing or report.unexpected or report.mis_shaped)
    _assert_same_weights(model, vig.read_checkpoint(published)[entry])


@pytest.mark.parametrize("layout", ["bare", "bare-ddp", "timm-saver-ddp", "model"])
def test_layouts_and_module_prefix(tmp_path: Path, layout: str) -> None:
    source = _small(seed=1)
    weights = source.state_dict()
    prefixed = {f"module.{key}": value for key, value in weights.items()}
    ema = {key: value + 1 if value.is_floating_point() else value for key, value in weights.items()}
    content = {
        "bare": weights,
        "bare-ddp": prefixed,
        "timm-saver-ddp": {"state_dict": prefixed, "state_dict_ema": ema, "epoch": 3,
                           "args": argparse.Namespace(model="x"), "metric": np.float64(71.2)},
        "model": {"model": weights, "model_ema": ema},
    }[layout]
    path = tmp_path / "weights.pth"
    torch.save(content, path)
    model = _small(seed=2)
    vig.load_checkpoint(model, path)
    _assert_same_weights(model, weights)
    if layout in ("timm-saver-ddp", "model"):
        vig.load_checkpoint(model, path, use_ema=True)
        _assert_same_weights(model, ema)
    else:
        with pytest.raises(CheckpointError, match="no EMA weights") as error:
            vig.load_checkpoint(model, path, use_ema=True)
        _assert_one_line_naming(error, path)


def test_wrong_size_fails_with_one_clear_message(published: Path) -> None:
    with torch.device("meta"):
        model = timm.create_model("vig_s_224_gelu")
    with pytest.raises(CheckpointError) as error:
        vig.load_checkpoint(model, published)
    message = _assert_one_line_naming(error, published)
    assert "does not fit VisionGNN" in message
    assert "missing backbone.12.0.fc1.0.weight" in message
    assert "mis-shaped pos_embed (file (1, 192, 14, 14), model (1, 320, 14, 14))" in message


def test_wrong_class_count_strict_and_not(published: Path) -> None:
    model = timm.create_model("vig_ti_224_gelu", num_classes=10)
    with pytest.raises(CheckpointError) as error:
        vig.load_checkpoint(model, published)
    message = _assert_one_line_naming(error, published)
    assert "mis-shaped prediction.4.weight (file (1000, 1024, 1, 1), model (10, 1024, 1, 1))" in message
    assert "missing" not in message and "unexpected" not in message

    fresh_classifier = model.get_classifier().weight.detach().clone()
    report = vig.load_checkpoint(model, published, strict=False)
    assert report.mis_shaped == ["prediction.4.weight", "prediction.4.bias"]
    assert_close(model.get_classifier().weight, fresh_classifier, rtol=0, atol=0)
    assert_close(model.pos_embed, vig.read_checkpoint(published)["state_dict"]["pos_embed"], rtol=0, atol=0)


class _RunsCode:
    """Unpickling this object calls ``exec``: the shape of a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle-protocol-2", "pickle-protocol-4"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth.tar"
    if writer == "torch.save":
        torch.save({"state_dict": _small().state_dict(), "args": _RunsCode(marker)}, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump({"args": _RunsCode(marker), "epoch": 1}, handle, protocol=int(writer[-1]))
    with pytest.raises(CheckpointError) as error:
        vig.load_checkpoint(_small(), path)
    message = _assert_one_line_naming(error, path)
    if writer == "pickle-protocol-4":  # rejected at its first frame opcode, before any global is looked up
        assert "not a PyTorch checkpoint that loads safely" in message
    else:
        assert "refused to load: unpickling it would call" in message and "exec" in message
    assert not marker.exists()


def test_truncated_file(tmp_path: Path) -> None:
    whole = tmp_path / "whole.pth"
    torch.save({"state_dict": _small().state_dict()}, whole)
    data = whole.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as error:
        vig.load_checkpoint(_small(), path)
    _assert_one_line_naming(error, path)


@pytest.mark.parametrize("content, match", [
    (b"model: vig_ti_224_gelu\nlr: 0.002\n", "not a PyTorch checkpoint that loads safely"),
    (b"", "not a readable PyTorch checkpoint"),
    ([torch.zeros(2)], "holds a list"),
    ({"epoch": 3, "optimizer": {}}, "no weights found"),
    ({"state_dict": {"a": torch.zeros(1), "b": 3}}, "not a state dict of named tensors"),
])
def test_non_checkpoint_files(tmp_path: Path, content: object, match: str) -> None:
    path = tmp_path / "not-a-checkpoint.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=match) as error:
        vig.load_checkpoint(_small(), path)
    _assert_one_line_naming(error, path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.pth.tar"
    with pytest.raises(CheckpointError, match="no such checkpoint file") as error:
        vig.read_checkpoint(path)
    _assert_one_line_naming(error, path)
    assert issubclass(CheckpointError, ValueError)


def test_extract_state_dict_prefers_state_dict_over_model() -> None:
    weights = {"w": torch.ones(1)}
    state_dict, entry = extract_state_dict({"state_dict": weights, "model": {"w": torch.zeros(1)}})
    assert entry == "state_dict" and state_dict == weights


@pytest.mark.parametrize("name, recorded", [("mobilevig_ti", "mobilevig_ti"), ("greedyvig_s", "GreedyViG_S")])
@pytest.mark.parametrize("use_ema", [False, True])
def test_efficient_training_script_layout(tmp_path: Path, name: str, recorded: str, use_ema: bool) -> None:
    """The dict MobileViG's / GreedyViG's main.py saves: the recorded model name maps to ours, --model-ema
    picks ``state_dict_ema``, and the weights load strictly."""
    state = torch.load(shared_path("fixtures", f"{name}_checkpoint.pth"), map_location="cpu")
    ema = {key: value + 1 if key == "head.bias" else value for key, value in state.items()}
    layout = dict(state_dict=state, state_dict_ema=ema, optimizer={"state": {}, "param_groups": []},
                  lr_scheduler={"base_values": [2e-3]}, epoch=299, scaler={"scale": 65536.0, "_growth_tracker": 0},
                  args=argparse.Namespace(model=recorded, nb_classes=1000, input_size=224, model_ema=True))
    path = tmp_path / "checkpoint.pth"
    torch.save(layout, path)
    checkpoint = read_checkpoint(path)
    weights, entry = extract_state_dict(checkpoint, use_ema=use_ema)
    assert entry == ("state_dict_ema" if use_ema else "state_dict")
    settings = recorded_settings(checkpoint, weights)
    assert (settings.model, settings.num_classes) == (name, 1000)
    model = timm.create_model(settings.model, num_classes=settings.num_classes)
    load_state_dict_into(model, weights, str(path), entry, strict=True)  # the trainer's loader
    torch.testing.assert_close(model.head.bias, (ema if use_ema else state)["head.bias"])


def test_a_refused_pickle_never_passes_on_the_advice_to_drop_weights_only(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's message (2.x) ends in advice to load with weights_only=False, the opposite of what is safe."""
    path = tmp_path / "odd.pth"
    path.write_bytes(b"anything")
    reason = ("Unsupported operand 149. Please file an issue with the following so that we can make "
              "`weights_only=True` compatible with your use case: WeightsUnpickler error: ... "
              "In PyTorch 2.6, we changed the default value of the `weights_only` argument in `torch.load` "
              "from `False` to `True`. ... set `weights_only` to False.")

    def refuse(*args: object, **kwargs: object) -> None:
        raise pickle.UnpicklingError(f"Weights only load failed. WeightsUnpickler error: {reason}")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "Unsupported operand 149)" in message and "set `weights_only` to False" not in message, message
