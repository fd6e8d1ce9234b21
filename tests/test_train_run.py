"""End-to-end runs of train.py in one process: README main job, resume, evaluation of the shared fixture."""
from __future__ import annotations

import csv
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import train
import vig
from tests.shared_files import shared_path
from tests.train_helpers import REPO_ROOT, last_json_line, make_image_folder, run_train
from vig.trainer.cli import parse_args
from vig.trainer.data import build_dataset, eval_transform, resolve_preprocessing

pytestmark = pytest.mark.slow


def _readme_main_job() -> list[list[str]]:
    """The train.py invocations of the README's main-job command (first line of its first bash block)."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(commands) == 2 and "pytest" in commands[1], "README must open with main job, then tests"
    steps = [shlex.split(part) for part in commands[0].split("&&")]
    return [step[2:] for step in steps if len(step) > 1 and step[1] == "train.py"]


def test_readme_main_job_trains_above_chance_and_evaluates(tmp_path: Path) -> None:
    steps = _readme_main_job()
    assert len(steps) == 2 and "--evaluate" in steps[1]
    training = run_train(steps[0], cwd=tmp_path, timeout=600)
    assert training.returncode == 0, training.stderr[-3000:]
    experiment = tmp_path / "output" / "demo"
    for name in ("args.yaml", "summary.csv", "curves.png", "last.pth.tar", "model_best.pth.tar"):
        assert (experiment / name).is_file(), name
    evaluation = run_train(steps[1], cwd=tmp_path, timeout=300)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    result = last_json_line(evaluation.stdout)
    assert result["count"] == 256
    assert result["top1"] > 50.0, result  # 4 balanced classes: chance is 25 %


def _summary(folder: Path) -> list[dict[str, str]]:
    with open(folder / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_resume_continues_epochs_optimizer_scheduler_and_ema(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}})
    common = [str(data), "--model", "vig_ti_224_gelu", "--img-size", "32", "--allow-small-graph", "--epochs", "2", "--warmup-epochs", "0",
              "--lr", "1e-3", "-b", "4", "-j", "0", "--model-ema", "--model-ema-decay", "0.9",
              "--output", str(tmp_path / "out"), "--checkpoint-hist", "2"]
    assert train.main([*common, "--experiment", "full"]) == 0
    full = tmp_path / "out" / "full"
    interrupted = tmp_path / "out" / "resumed"
    interrupted.mkdir()
    epoch_zero = torch.load(full / "checkpoint-0.pth.tar", weights_only=True)
    torch.save(epoch_zero, interrupted / "last.pth.tar")
    assert train.main([*common, "--experiment", "resumed", "--resume", "auto"]) == 0

    expected = torch.load(full / "last.pth.tar", weights_only=True)
    resumed = torch.load(interrupted / "last.pth.tar", weights_only=True)
    assert resumed["epoch"] == expected["epoch"] == 1
    # the summary row of epoch 0 comes back from the last.pth.tar it resumed from
    assert _summary(interrupted) == _summary(full)
    steps_per_epoch = 2  # 8 images, batch 4
    state = resumed["optimizer"]["state"][0]
    assert int(state["step"]) == 2 * steps_per_epoch
    torch.testing.assert_close(resumed["optimizer"], expected["optimizer"])
    torch.testing.assert_close(resumed["state_dict"], expected["state_dict"])
    torch.testing.assert_close(resumed["state_dict_ema"], expected["state_dict_ema"])
    assert resumed["scheduler"] == expected["scheduler"]

    assert train.main([*common, "--experiment", "fresh-opt", "--resume", str(full / "checkpoint-0.pth.tar"),
                       "--no-resume-opt"]) == 0
    fresh = torch.load(tmp_path / "out" / "fresh-opt" / "last.pth.tar", weights_only=True)
    assert fresh["epoch"] == 1 and int(fresh["optimizer"]["state"][0]["step"]) == steps_per_epoch


def _expected_eval(data: Path, argv: list[str]) -> tuple[float, int]:
    """Mean cross-entropy and top-1 hits computed directly with vig.load_checkpoint (float32); thresholds
    from the flags, else the ones the checkpoint's training flags record."""
    config = parse_args(argv)
    given = config.model
    recorded = vig.read_checkpoint(given.initial_checkpoint)["args"]
    thresholds = (given.start_thresh, given.dec) if given.start_thresh else (recorded.start_thresh, recorded.dec)
    dataset, _ = build_dataset(config.data, "val", is_training=False)
    model = timm.create_model("vig_ti_224_gelu", num_classes=1000, start_thresh=thresholds[0], dec=thresholds[1])
    vig.load_checkpoint(model, given.initial_checkpoint, use_ema=given.model_ema)
    model.eval()
    dataset.transform = eval_transform(resolve_preprocessing(config.data, given.img_size, model))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    targets = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        logits = model(images)
        if config.loop.flip_tta:
            logits = (logits + model(images.flip(3))) / 2
    return F.cross_entropy(logits, targets).item(), int((logits.argmax(1) == targets).sum())


@pytest.mark.parametrize(
    "extra",
    [[], ["--model-ema", "--tta"], ["--start-thresh", "0.9", "--dec", "0.01"],
     ["--start-thresh", "0.9", "--dec", "0.01", "--model-ema"]],
    ids=["recorded-threshold", "recorded-threshold-ema-tta", "flag-threshold", "flag-threshold-ema"],
)
def test_evaluate_shared_fixture(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]) -> None:
    checkpoint = shared_path("fixtures", "svig_ti_checkpoint.pth.tar")
    data = make_image_folder(tmp_path, {"val": {"n01": 3, "n02": 2}}, size=40)
    argv = [str(data), "--model", "vig_ti_224_gelu", "-j", "0", "-b", "2", "--num-classes", "1000",
            "--pretrain_path", str(checkpoint), "--evaluate", *extra]
    assert train.main(argv) == 0
    result = last_json_line(capsys.readouterr().out)
    loss, hits = _expected_eval(data, argv)
    assert result["count"] == 5
    assert result["loss"] == pytest.approx(loss, rel=1e-4)
    assert result["top1"] == pytest.approx(100 * hits / 5)
    assert result["ema"] == ("--model-ema" in extra)
    assert (result["start_thresh"], result["dec"]) == ((0.9, 0.01) if extra[:1] == ["--start-thresh"] else (0.89, 0.03))


def test_evaluate_ema_and_plain_weights_differ(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = shared_path("fixtures", "svig_ti_checkpoint.pth.tar")
    data = make_image_folder(tmp_path, {"validation": {"n01": 2}}, size=40)
    argv = [str(data), "--model", "vig_ti_224_gelu", "-j", "0", "--num-classes", "1000",
            "--pretrain_path", str(checkpoint), "--evaluate"]
    losses = []
    for extra in ([], ["--model-ema"]):
        assert train.main(argv + extra) == 0
        losses.append(last_json_line(capsys.readouterr().out)["loss"])
    assert losses[0] != pytest.approx(losses[1])
