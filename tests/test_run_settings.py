"""Runs never mix in one folder, and checkpoints carry the settings their model was built with (issue #12)."""
from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import pytest
import torch

from PIL import Image

import train
import vig.trainer.setup
import vig.tools.visualize
from tests.train_helpers import last_json_line, make_image_folder, run_train
from vig.checkpoint import read_checkpoint
from vig.errors import UsageError
from vig.model_settings import ModelSettings, SettingConflict, merge_settings, recorded_settings
from vig.tools.visualize import graph_convs
from vig.tools.visualize import main as visualize_main
from vig.trainer.cli import parse_args

# a model whose every construction setting differs from the defaults: image size, activation, thresholds
BUILD = ["--model", "vig_ti_224_gelu", "--img-size", "64", "--model-kwargs", "act=relu",
         "--start-thresh", "0.8", "--dec", "0.02"]
RUN = ["--warmup-epochs", "0", "--lr", "1e-3", "-b", "8", "-j", "0", "--epochs", "1"]


pytestmark = pytest.mark.usefixtures("fast_in_process_runs")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 training and 6 validation images in 3 classes."""
    return make_image_folder(tmp_path_factory.mktemp("data"), {"train": {"a": 6, "b": 5, "c": 5},
                                                               "val": {"a": 2, "b": 2, "c": 2}}, size=40)


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of one finished 1-epoch run with the non-default BUILD settings."""
    output = tmp_path_factory.mktemp("trained")
    torch.set_num_threads(1)
    assert train.main([str(data), *BUILD, *RUN, "--output", str(output), "--experiment", "run"]) == 0
    return output / "run"


def _digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def _one_error_line(status: int, capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# --- runs never mix ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kept", ["all", "args.yaml", "summary.csv", "model_best.pth.tar", "checkpoint-0.pth.tar"])
def test_a_fresh_run_in_a_used_folder_stops_before_training(tmp_path: Path, data: Path, trained: Path,
                                                            capsys: pytest.CaptureFixture[str], kept: str) -> None:
    folder = tmp_path / "out" / "run"
    shutil.copytree(trained, folder)
    for path in folder.iterdir():
        if kept != "all" and path.name != kept:
            path.unlink()
    before = _digests(folder)
    capsys.readouterr()
    status = train.main([str(data), *BUILD, *RUN, "--lr", "5e-4", "--seed", "7", "--output", str(tmp_path / "out"),
                         "--experiment", "run"])
    line = _one_error_line(status, capsys)
    assert f"run folder {folder} already holds another run" in line and (kept == "all" or kept in line)
    assert "--resume auto" in line and "another --experiment" in line
    assert _digests(folder) == before  # nothing written, nothing deleted


def test_a_used_folder_is_the_only_line_on_stderr(tmp_path: Path, data: Path, trained: Path) -> None:
    """Checked before the model is built: a kNN model at 64 px would first log its capped kNN schedule."""
    shutil.copytree(trained, tmp_path / "out" / "run")
    result = run_train([str(data), "--model", "vig_ti_224_gelu", "--img-size", "64", *RUN,
                        "--output", str(tmp_path / "out"), "--experiment", "run"])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: run folder "), result.stderr


def test_resume_auto_refuses_results_without_last_checkpoint(tmp_path: Path, data: Path, trained: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "out" / "run"
    shutil.copytree(trained, folder)
    (folder / "last.pth.tar").unlink()
    before = _digests(folder)
    capsys.readouterr()
    status = train.main([str(data), *BUILD, *RUN, "--output", str(tmp_path / "out"), "--experiment", "run",
                         "--resume", "auto"])
    line = _one_error_line(status, capsys)
    assert f"run folder {folder} holds results" in line and "no last.pth.tar" in line
    assert _digests(folder) == before


def test_resume_auto_continues_and_a_folder_with_only_args_starts_afresh(tmp_path: Path, data: Path,
                                                                         trained: Path) -> None:
    folder = tmp_path / "out" / "run"
    shutil.copytree(trained, folder)
    common = [str(data), *BUILD, *RUN, "--output", str(tmp_path / "out"), "--experiment", "run", "--resume", "auto"]
    assert train.main([*common[:-6], "--epochs", "2", *common[-6:]]) == 0
    assert read_checkpoint(folder / "last.pth.tar")["epoch"] == 1
    only_args = tmp_path / "out" / "died"
    only_args.mkdir()
    shutil.copy(trained / "args.yaml", only_args / "args.yaml")  # a run that died in its first epoch
    assert train.main([*common[:-3], "died", "--resume", "auto"]) == 0
    assert read_checkpoint(only_args / "last.pth.tar")["epoch"] == 0


# --- checkpoints carry their settings --------------------------------------------------------------------

def _evaluate(data: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> dict:
    capsys.readouterr()
    assert train.main([str(data), "-j", "0", "-b", "4", "--evaluate", "--pretrain_path", str(checkpoint),
                       *flags]) == 0
    return last_json_line(capsys.readouterr().out)


def test_evaluate_takes_the_settings_from_the_checkpoint(data: Path, trained: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = trained / "model_best.pth.tar"
    bare = _evaluate(data, checkpoint, capsys)
    repeated = _evaluate(data, checkpoint, capsys, *BUILD)
    assert (bare["model"], bare["img_size"], bare["num_classes"]) == ("vig_ti_224_gelu", 64, 3)
    assert (bare["start_thresh"], bare["dec"], bare["graph"]) == (0.8, 0.02, "threshold start 0.8 dec 0.02")
    for key in ("loss", "top1", "top5", "count"):
        assert bare[key] == repeated[key], key


def test_an_overriding_flag_wins_with_a_warning(data: Path, trained: Path, capsys: pytest.CaptureFixture[str],
                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        result = _evaluate(data, trained / "model_best.pth.tar", capsys, "--img-size", "32", "--start-thresh", "0.7")
    assert (result["img_size"], result["start_thresh"], result["dec"]) == (32, 0.7, 0.02)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("--img-size 32 overrides img_size" in text and "trained with 64" in text for text in warnings), warnings
    assert any("--start-thresh 0.7 overrides start_thresh" in text for text in warnings), warnings


@pytest.mark.parametrize("flags, message", [
    (["--num-classes", "5"], "--num-classes 5 contradicts"),
    (["--model", "vig_s_224_gelu"], "--model vig_s_224_gelu contradicts"),
])
def test_a_contradicting_model_or_class_count_is_one_line(data: Path, trained: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          flags: list[str], message: str) -> None:
    capsys.readouterr()
    status = train.main([str(data), "-j", "0", "--evaluate", "--pretrain_path", str(trained / "last.pth.tar"),
                         *flags])
    line = _one_error_line(status, capsys)
    assert message in line and str(trained / "last.pth.tar") in line


def test_a_bare_state_dict_gets_its_class_count_from_the_classifier(tmp_path: Path, data: Path, trained: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    state = read_checkpoint(trained / "last.pth.tar")["state_dict"]
    bare = tmp_path / "bare.pth"
    torch.save(state, bare)
    result = _evaluate(data, bare, capsys, *BUILD)
    assert result["num_classes"] == 3
    assert result["loss"] == _evaluate(data, trained / "last.pth.tar", capsys)["loss"]


def test_initial_checkpoint_builds_the_model_it_holds(tmp_path: Path, data: Path, trained: Path) -> None:
    output = tmp_path / "out"
    assert train.main([str(data), *RUN, "--initial-checkpoint", str(trained / "last.pth.tar"),
                       "--output", str(output), "--experiment", "tuned"]) == 0
    args = read_checkpoint(output / "tuned" / "last.pth.tar")["args"]
    assert (args["model"], args["img_size"], args["model_kwargs"], args["start_thresh"], args["dec"]) == (
        "vig_ti_224_gelu", 64, {"act": "relu"}, 0.8, 0.02)


def test_visualize_loads_any_checkpoint_without_its_flags(tmp_path: Path, trained: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    picture = tmp_path / "picture.png"
    Image.new("RGB", (40, 40), (120, 30, 200)).save(picture)
    built = []
    original = vig.tools.visualize.build_model

    def spy(*args: object, **kwargs: object) -> torch.nn.Module:
        model = original(*args, **kwargs)
        built.append(model)
        return model

    monkeypatch.setattr(vig.tools.visualize, "build_model", spy)
    out = tmp_path / "graph.png"
    assert visualize_main(["--checkpoint", str(trained / "last.pth.tar"), "--image", str(picture),
                           "--out", str(out)]) == 0
    assert out.is_file()
    model = built[0]
    assert model.num_classes == 3 and model.img_size == (64, 64)
    assert [round(conv.threshold, 6) for conv in graph_convs(model)][:2] == [0.8, 0.78]


# --- honest progress ------------------------------------------------------------------------------------

def test_warmup_that_never_ends_is_warned(tmp_path: Path, data: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        assert train.main([str(data), *BUILD, *RUN, "--warmup-epochs", "1", "-b", "6", "--output", str(tmp_path),
                           "--experiment", "warm"]) == 0
    messages = [record.getMessage() for record in caplog.records]
    assert any("--warmup-epochs 1 >= --epochs 1" in text for text in messages), messages
    epoch_line = next(text for text in messages if text.startswith("epoch 0: train loss"))
    # 16 images, batches of 6, one process: two steps of 6, 4 images in the dropped last batch
    assert ("= mean over the 12 images trained in this epoch by 1 process(es) (4 more in incomplete last batches, "
            "not trained)") in epoch_line, epoch_line


def test_evaluate_names_the_graph_the_model_was_built_with(data: Path, trained: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    result = _evaluate(data, trained / "last.pth.tar", capsys, "--model-kwargs", "start_thresh=0.7", "dec=0.01")
    assert (result["graph"], result["start_thresh"], result["dec"]) == ("threshold start 0.7 dec 0.01", 0.7, 0.01)


def test_checkpoint_settings_make_a_new_config_worded_in_flags_by_the_trainer(trained: Path) -> None:
    """The checkpoint's recorded settings fill a new config (the parsed one is unchanged); the model layer's
    conflict names settings, the trainer's message names the flag to drop."""
    checkpoint_path = str(trained / "last.pth.tar")
    given = parse_args(["--pretrain_path", checkpoint_path, "--img-size", "32", "--num-classes", "3"])
    merged, source = vig.trainer.setup.apply_checkpoint_settings(given, use_class_count=True)
    checkpoint = source.checkpoint
    assert (given.model.model, given.model.start_thresh, given.model.model_kwargs) == (None, None, {})
    assert (merged.model.model, merged.model.img_size, merged.model.start_thresh, merged.model.dec,
            merged.model.model_kwargs, merged.data.num_classes) == ("vig_ti_224_gelu", 32, 0.8, 0.02, {"act": "relu"}, 3)
    assert merged.to_flags() == given.to_flags() | {"model": "vig_ti_224_gelu", "start_thresh": 0.8, "dec": 0.02,
                                                    "model_kwargs": {"act": "relu"}}
    recorded = recorded_settings(checkpoint, checkpoint["state_dict"])
    with pytest.raises(SettingConflict) as info:
        merge_settings(ModelSettings(model="vig_s_224_gelu"), recorded, checkpoint_path)
    assert str(info.value) == (f"model vig_s_224_gelu contradicts {checkpoint_path}, which holds a model of "
                               "vig_ti_224_gelu")
    with pytest.raises(UsageError, match="; drop --model to use the checkpoint's$"):
        vig.trainer.setup.apply_checkpoint_settings(given.replace(model={"model": "vig_s_224_gelu"}), True)


def test_a_recorded_decrement_without_a_threshold_builds_the_knn_model(tmp_path: Path, trained: Path) -> None:
    """A checkpoint whose flags record --dec but no --start-thresh (a kNN run) still loads: the decrement is
    dropped, not refused as the flag alone would be."""
    state = read_checkpoint(trained / "last.pth.tar")
    state["args"] = {**state["args"], "start_thresh": None}
    path = tmp_path / "knn.pth.tar"
    torch.save(state, path)
    config, _ = vig.trainer.setup.apply_checkpoint_settings(parse_args(["--pretrain_path", str(path)]), True)
    assert (config.model.start_thresh, config.model.dec, config.model.img_size) == (None, None, 64)
