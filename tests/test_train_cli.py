"""train.py flags: the published recipes parse with their meaning; bad input gives one line and exit 2."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

import train
from tests.train_helpers import make_image_folder, run_train
from vig.cli import parse_args
from vig.errors import UsageError

TRAIN_RECIPE = (
    "/data/imagenet --model vig_ti_224_gelu --sched cosine --epochs 300 --opt adamw -j 8 --warmup-lr 1e-6 "
    "--mixup .8 --cutmix 1.0 --model-ema --model-ema-decay 0.99996 --aa rand-m9-mstd0.5-inc1 --color-jitter 0.4 "
    "--warmup-epochs 20 --opt-eps 1e-8 --repeated-aug --remode pixel --reprob 0.25 --amp --lr 2e-3 "
    "--weight-decay .05 --drop 0 --drop-path .1 -b 128 --output /tmp/out --start-thresh 0.9 --dec 0.01"
)
EVAL_RECIPE = (
    "/data/imagenet --model vig_ti_224_gelu -j 8 --amp --drop 0 --drop-path .1 -b 128 --num-classes 1000 "
    "--pretrain_path {ckpt} --evaluate --start-thresh 0.9 --dec 0.01 --model-ema"
)


def test_training_recipe_flags_keep_their_meaning() -> None:
    args = parse_args(shlex.split(TRAIN_RECIPE) + ["--local-rank=3"])
    assert (args.data_dir, args.model, args.sched, args.epochs, args.opt) == (
        "/data/imagenet", "vig_ti_224_gelu", "cosine", 300, "adamw")
    assert (args.workers, args.batch_size, args.lr, args.warmup_lr, args.warmup_epochs) == (8, 128, 2e-3, 1e-6, 20)
    assert (args.mixup, args.cutmix, args.model_ema, args.model_ema_decay) == (0.8, 1.0, True, 0.99996)
    assert (args.aa, args.color_jitter, args.opt_eps, args.repeated_aug) == ("rand-m9-mstd0.5-inc1", 0.4, 1e-8, True)
    assert (args.remode, args.reprob, args.amp, args.weight_decay) == ("pixel", 0.25, True, 0.05)
    assert (args.drop, args.drop_path, args.output, args.start_thresh, args.dec) == (0.0, 0.1, "/tmp/out", 0.9, 0.01)
    assert args.local_rank == 3


def test_evaluation_recipe_flags_keep_their_meaning(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pth.tar"
    ckpt.write_bytes(b"x")
    args = parse_args(shlex.split(EVAL_RECIPE.format(ckpt=ckpt)) + ["--local_rank", "1"])
    assert args.evaluate and args.model_ema and args.initial_checkpoint == str(ckpt)
    assert (args.num_classes, args.start_thresh, args.dec, args.local_rank) == (1000, 0.9, 0.01, 1)


def test_config_file_sets_defaults_and_flags_win(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"lr": 0.5, "batch-size": 16, "model_kwargs": {"k": 3}}))
    args = parse_args(["-c", str(config), "--lr", "0.25"])
    assert (args.lr, args.batch_size, args.model_kwargs) == (0.25, 16, {"k": 3})


def test_model_kwargs_are_parsed_as_literals() -> None:
    args = parse_args(["--model-kwargs", "channels=32", "act=gelu", "scale=0.5", "flag=True"])
    assert args.model_kwargs == {"channels": 32, "act": "gelu", "scale": 0.5, "flag": True}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--start-thresh", "0"], "--start-thresh must be in (0, 1)"),
        (["--start-thresh", "1"], "--start-thresh must be in (0, 1)"),
        (["--start-thresh", "1.5"], "--start-thresh must be in (0, 1)"),
        (["--start-thresh", "nan"], "--start-thresh must be in (0, 1)"),
        (["--start-thresh", "0.9", "--dec", "-0.1"], "--dec must be >= 0"),
        (["--dec", "0.1"], "--dec needs --start-thresh"),
        (["-b", "0"], "--batch-size must be positive"),
        (["-b", "-4"], "--batch-size must be positive"),
        (["-b", "3", "--mixup", "0.8"], "even --batch-size"),
        (["--evaluate"], "--evaluate needs --pretrain_path"),
        (["--pretrain_path", "/no/such/file.pth"], "no such file"),
        (["--dataset", "torch/mnist"], "not supported"),
        (["--model-kwargs", "novalue"], "key=value"),
        (["--lr"], "expected one argument"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_bad_flags_raise_one_line_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=None) as info:
        parse_args(argv)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_config_key_is_a_usage_error(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("learning_rate: 0.1\n")
    with pytest.raises(UsageError, match="unknown key 'learning_rate'"):
        parse_args(["-c", str(config)])


def _main_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    status = train.main(argv)
    captured = capsys.readouterr()
    assert status == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_missing_and_empty_data_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--model", "resnet10t", "--output", str(tmp_path / "out"), "-j", "0"]
    assert "does not exist" in _main_error([str(tmp_path / "missing"), *common], capsys)
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    assert "no images under" in _main_error([str(tmp_path / "empty"), *common], capsys)
    make_image_folder(tmp_path / "noval", {"train": {"a": 1}})
    assert "no 'val' split" in _main_error([str(tmp_path / "noval"), *common], capsys)


def test_unknown_model_suggests_close_names(capsys: pytest.CaptureFixture[str]) -> None:
    line = _main_error(["--model", "resnet10", "--epochs", "1"], capsys)
    assert "unknown model 'resnet10'" in line and "resnet10t" in line


def test_unwritable_output_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    line = _main_error(["--model", "resnet10t", "--output", str(blocker), "--experiment", "x", "-j", "0"], capsys)
    assert "cannot write to output folder" in line


def test_process_exit_status_and_no_traceback(tmp_path: Path) -> None:
    result = run_train(["--start-thresh", "2"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --start-thresh must be in (0, 1), got 2.0"]
    assert "Traceback" not in result.stderr


def test_recipe_optimizer_decays_only_weights() -> None:
    """AdamW of the recipe: weight decay on conv weights only, not on norms, biases or the position embedding."""
    import timm

    from vig.training import _optimizer

    args = parse_args(shlex.split(TRAIN_RECIPE))
    model = timm.create_model("vig_ti_224_gelu")
    optimizer = _optimizer(args, model)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    undecayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "pos_embed" in undecayed and "stem.convs.1.weight" in undecayed and "prediction.4.bias" in undecayed
    assert decayed == {n for n, p in model.named_parameters() if p.ndim > 1 and n != "pos_embed"}
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.05}
    assert type(optimizer).__name__ == "AdamW" and optimizer.defaults["eps"] == 1e-8
