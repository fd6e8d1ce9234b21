"""The published training recipe under torchrun and torch.distributed.launch: 2 CPU processes, gloo."""
from __future__ import annotations

import csv
import re
import socket
from pathlib import Path

import pytest
import torch

from tests.train_helpers import last_json_line, make_image_folder, run_train

pytestmark = pytest.mark.slow

TRAIN_IMAGES = 18  # RepeatAugSampler: ceil(18 / 2) = 9 per process and epoch, 2 batches of 4
VAL_IMAGES = 7  # shards of 4 and 3: nothing padded, nothing counted twice

RECIPE = (
    "--model vig_ti_224_gelu --sched cosine --epochs 2 --opt adamw -j 1 --warmup-lr 1e-6 --mixup .8 --cutmix 1.0 "
    "--model-ema --model-ema-decay 0.99996 --aa rand-m9-mstd0.5-inc1 --color-jitter 0.4 --warmup-epochs 1 "
    "--opt-eps 1e-8 --repeated-aug --remode pixel --reprob 0.25 --amp --lr 2e-3 --weight-decay .05 --drop 0 "
    "--drop-path .1 -b 4 --start-thresh 0.9 --dec 0.01 --img-size 32"
).split()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launcher(kind: str) -> list[str]:
    module = "torch.distributed.run" if kind == "torchrun" else "torch.distributed.launch"
    return ["-m", module, "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagenet-like")
    return make_image_folder(root, {"train": {"a": 9, "b": 9}, "val": {"a": 4, "b": 3}})


def _check_run_folder(folder: Path) -> None:
    for name in ("args.yaml", "summary.csv", "curves.png", "last.pth.tar", "model_best.pth.tar"):
        assert (folder / name).is_file(), name
    assert sorted(p.name for p in folder.glob("checkpoint-*.pth.tar")) == ["checkpoint-0.pth.tar",
                                                                         "checkpoint-1.pth.tar"]
    with open(folder / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert set(rows[0]) == {"epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr",
                            "ema_eval_loss", "ema_eval_top1", "ema_eval_top5"}
    state = torch.load(folder / "last.pth.tar", weights_only=True)
    assert {"state_dict", "state_dict_ema", "optimizer", "scheduler", "epoch", "arch", "args", "metric"} <= set(state)
    assert (state["epoch"], state["arch"], state["args"]["start_thresh"]) == (1, "vig_ti_224_gelu", 0.9)
    assert not any(key.startswith("module.") for key in state["state_dict"])


def _check_log(stderr: str) -> None:
    assert stderr.count("epoch 0: train loss") == 1, stderr[-3000:]  # only rank 0 reports
    # shards of 9 in batches of 4: 8 images trained and 1 left out on each of the 2 ranks
    assert re.search(rf"epoch 1: train loss [\d.]+ = mean over the {2 * 8} images trained in this epoch by 2 "
                     r"process\(es\) \(2 more in incomplete last batches, not trained\)", stderr), stderr
    assert stderr.count(f"validation {VAL_IMAGES} images") == 2
    assert "MACs" in stderr
    assert "AMP: bfloat16 autocast on CPU" in stderr or "falling back to float32" in stderr


def test_recipe_under_torchrun_then_evaluate(tmp_path: Path, image_folder: Path) -> None:
    output = tmp_path / "out"
    result = run_train([str(image_folder), *RECIPE, "--output", str(output), "--experiment", "run"],
                       launcher=_launcher("torchrun"))
    assert result.returncode == 0, result.stderr[-4000:]
    _check_run_folder(output / "run")
    _check_log(result.stderr)

    evaluation = run_train([str(image_folder), "--model", "vig_ti_224_gelu", "--img-size", "32", "-j", "1",
                            "--amp", "-b", "2", "--pretrain_path", str(output / "run" / "model_best.pth.tar"),
                            "--evaluate", "--start-thresh", "0.9", "--dec", "0.01", "--model-ema"],
                           launcher=_launcher("torchrun"))
    assert evaluation.returncode == 0, evaluation.stderr[-4000:]
    assert evaluation.stdout.count('"count"') == 1  # one result, from rank 0
    assert last_json_line(evaluation.stdout)["count"] == VAL_IMAGES


def test_recipe_under_distributed_launch_with_dated_folder(tmp_path: Path, image_folder: Path) -> None:
    output = tmp_path / "out"
    result = run_train([str(image_folder), *RECIPE, "--output", str(output)], launcher=_launcher("launch"))
    assert result.returncode == 0, result.stderr[-4000:]
    folders = list(output.iterdir())
    assert len(folders) == 1 and re.fullmatch(r"\d{8}-\d{6}-vig_ti_224_gelu-32", folders[0].name), folders
    _check_run_folder(folders[0])
    _check_log(result.stderr)
