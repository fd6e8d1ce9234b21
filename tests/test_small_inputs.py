"""Inputs that used to train quietly on nonsense: an image too small for the model's graph, an empty class folder,
and the message of a run resumed from an interrupt in its first epoch."""
from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm

import train
import vig.models  # noqa: F401  (registers the models)
from tests.train_helpers import REPO_ROOT, child_env, make_image_folder

pytestmark = pytest.mark.usefixtures("fast_in_process_runs")

RUN = ["--warmup-epochs", "0", "--lr", "1e-3", "-b", "8", "-j", "0", "--epochs", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), {"train": {"a": 8, "b": 8}, "val": {"a": 2, "b": 2}})


# vig_ti_224_gelu: stem stride 16, first k 9; 7 px gives 1 node, 20 px 2 x 2, 33 px (rounded up) 3 x 3
@pytest.mark.parametrize(("size", "found"), [
    ("7", "the model's graph would have a single node"),
    ("20", "the first graph layer (backbone.0.0.graph_conv) has 4 node(s) and its k is 9"),
])
def test_train_refuses_an_image_too_small_for_the_first_graph(tmp_path: Path, data: Path,
                                                              capsys: pytest.CaptureFixture[str], size: str,
                                                              found: str) -> None:
    status = train.main([str(data), "--model", "vig_ti_224_gelu", "--img-size", size, *RUN,
                         "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --img-size {size} is too small: {found}, ") and "smallest size that works is 33 px" \
        in err, err
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]  # refused before anything was written


def test_allow_small_graph_trains_anyway(tmp_path: Path, data: Path) -> None:
    assert train.main([str(data), "--model", "vig_ti_224_gelu", "--img-size", "20", "--allow-small-graph", *RUN,
                       "--output", str(tmp_path), "--experiment", "run"]) == 0
    assert (tmp_path / "run" / "last.pth.tar").exists()


def test_the_smallest_size_named_trains(tmp_path: Path, data: Path) -> None:
    assert train.main([str(data), "--model", "vig_ti_224_gelu", "--img-size", "33", *RUN,
                       "--output", str(tmp_path), "--experiment", "run"]) == 0


@pytest.mark.parametrize(("size", "builds"), [(7, False), (16, False), (17, True), (20, True)])
def test_a_timm_user_gets_a_value_error_only_for_a_single_node(size: int, builds: bool) -> None:
    if builds:
        timm.create_model("vig_ti_224_gelu", img_size=size)
        return
    with pytest.raises(ValueError, match=rf"img_size {size} gives a single graph node at stem stride 16.*17 px"):
        timm.create_model("vig_ti_224_gelu", img_size=size)


def test_an_empty_class_folder_in_both_splits_is_one_warning(tmp_path: Path, data: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    tree = make_image_folder(tmp_path / "data", {"train": {"a": 8, "b": 8}, "val": {"a": 2, "b": 2}})
    for split in ("train", "val"):
        (tree / split / "c-empty").mkdir()
    assert train.main([str(tree), "--model", "test_resnet", "--img-size", "32", *RUN, "--output",
                       str(tmp_path / "out"), "--experiment", "run"]) == 0
    lines = [record.getMessage() for record in caplog.records if "without images" in record.getMessage()]
    assert len(lines) == 1, caplog.text
    assert f"{tree / 'train' / 'c-empty'}, {tree / 'val' / 'c-empty'}" in lines[0] and "2 classes" in lines[0]


@pytest.mark.slow
def test_resuming_an_interrupt_in_the_first_epoch_says_so(tmp_path: Path, data: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    argv = [str(data), "--model", "test_resnet", "--img-size", "32", *RUN, "--output", str(tmp_path),
            "--experiment", "run"]
    paused = tmp_path / "paused"
    env = {**child_env(), "VIG_FAULT_AT": "train-step:0:1", "VIG_FAULT_ACTION": f"pause:{paused}"}
    child = subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), *argv], cwd=REPO_ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not paused.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.terminate()
    assert child.wait(timeout=120) == 143, child.communicate()[1]
    caplog.set_level(logging.INFO)
    assert train.main([*argv, "--resume", "auto"]) == 0
    resumed = [record.getMessage() for record in caplog.records if record.getMessage().startswith("resumed from")]
    assert resumed == [f"resumed from {tmp_path / 'run' / 'interrupted.pth.tar'} (stopped in its first epoch, none "
                       "finished; continuing epoch 0 after step 1)"], resumed
