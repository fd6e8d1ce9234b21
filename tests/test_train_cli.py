"""train.py flags: the published recipes parse with their meaning; bad input gives one line and exit 2."""
from __future__ import annotations

import csv
import dataclasses
import math
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

import train
from tests.shared_files import shared_path
from tests.train_helpers import make_image_folder, run_train
from vig.errors import UsageError
from vig.trainer.cli import build_parser, parse_args
from vig.trainer.config import TrainConfig
from vig.trainer.saver import write_args_yaml

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
    flags = parse_args(shlex.split(TRAIN_RECIPE) + ["--local-rank=3"]).to_flags()
    assert (flags["data_dir"], flags["model"], flags["sched"], flags["epochs"], flags["opt"]) == (
        "/data/imagenet", "vig_ti_224_gelu", "cosine", 300, "adamw")
    assert (flags["workers"], flags["batch_size"], flags["lr"], flags["warmup_lr"], flags["warmup_epochs"]) == (
        8, 128, 2e-3, 1e-6, 20)
    assert (flags["mixup"], flags["cutmix"], flags["model_ema"], flags["model_ema_decay"]) == (0.8, 1.0, True, 0.99996)
    assert (flags["aa"], flags["color_jitter"], flags["opt_eps"], flags["repeated_aug"]) == (
        "rand-m9-mstd0.5-inc1", 0.4, 1e-8, True)
    assert (flags["remode"], flags["reprob"], flags["amp"], flags["weight_decay"]) == ("pixel", 0.25, True, 0.05)
    assert (flags["drop"], flags["drop_path"], flags["output"], flags["start_thresh"], flags["dec"]) == (
        0.0, 0.1, "/tmp/out", 0.9, 0.01)
    assert flags["local_rank"] == 3


def test_evaluation_recipe_flags_keep_their_meaning(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pth.tar"
    ckpt.write_bytes(b"x")
    flags = parse_args(shlex.split(EVAL_RECIPE.format(ckpt=ckpt)) + ["--local_rank", "1"]).to_flags()
    assert flags["evaluate"] and flags["model_ema"] and flags["initial_checkpoint"] == str(ckpt)
    assert (flags["num_classes"], flags["start_thresh"], flags["dec"], flags["local_rank"]) == (1000, 0.9, 0.01, 1)


def test_config_file_sets_defaults_and_flags_win(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"lr": 0.5, "batch-size": 16, "model_kwargs": {"k": 3},
                                      "mean": [0.1, 0.2, 0.3], "clip_mode": "value", "amp": True}))
    flags = parse_args(["-c", str(config), "--lr", "0.25", "--mean", "0.4", "0.5", "0.6",
                        "--clip-mode", "agc"]).to_flags()
    assert (flags["lr"], flags["batch_size"], flags["model_kwargs"]) == (0.25, 16, {"k": 3})
    assert (flags["mean"], flags["clip_mode"], flags["amp"]) == ([0.4, 0.5, 0.6], "agc", True)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("clip_mode", "bogus", "argument --clip-mode: invalid choice: 'bogus'"),
    ("amp_dtype", "float8", "argument --amp-dtype: invalid choice: 'float8'"),
    ("epochs", "ten", "argument --epochs: invalid int value: 'ten'"),
    ("epochs", 10.5, "argument --epochs: invalid int value: '10.5'"),
    ("lr", [1], "--lr takes one value, got [1]"),
    ("weight_decay", None, "--weight-decay takes a value, not null"),
    ("batch-size", True, "--batch-size takes one value, got True"),
    ("model", ["a", "b"], "--model takes one value"),
    ("data_dir", {"root": "x"}, "DIR takes one value"),
    ("mean", 0.5, "argument --mean: expected 3 arguments"),
    ("std", [0.2, 0.2], "argument --std: expected 3 arguments"),
    ("opt_betas", [], "argument --opt-betas: expected at least one argument"),
    ("amp", "sure", "--amp is a switch: expected true or false"),
    ("model_ema", 1, "--model-ema is a switch: expected true or false"),
    ("model_kwargs", ["novalue"], "--model-kwargs expects key=value pairs"),
    ("model_kwargs", {1: 2}, "--model-kwargs takes a mapping with string keys"),
])
def test_bad_config_values_are_one_line_usage_errors(tmp_path: Path, key: str, value: object, message: str) -> None:
    """A config value is held to its flag's type, choices and number of values, and the error names file and key."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({key: value}))
    with pytest.raises(UsageError) as info:
        parse_args(["-c", str(config)])
    text = str(info.value)
    assert text.startswith(f"config {config}: key {key!r}: ") and message in text and "\n" not in text


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("lr", "1e-3", 1e-3),  # YAML 1.1 reads an exponent without a dot as a string; --lr's type converts it
    ("epochs", "10", 10),
    ("mean", [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    ("opt_betas", 0.9, [0.9]),
    ("amp", True, True),
    ("amp", False, False),
    ("torchcompile", "eager", "eager"),
    ("model_kwargs", "k=3", {"k": 3}),
    ("data_dir", "-odd-name", "-odd-name"),
    ("num_classes", None, None),
    ("tta", True, 2),  # the seed recipe's switch, as args.yaml files written before --tta took a factor hold it
    ("tta", False, 0),
    ("tta", 2, 2),
    ("patience_epochs", 3, 3),
])
def test_config_values_convert_as_flags_do(tmp_path: Path, key: str, value: object, expected: object) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({key: value}))
    assert parse_args(["-c", str(config)]).to_flags()[key] == expected


@pytest.mark.parametrize("argv", [
    TRAIN_RECIPE,
    "--dataset synthetic --mean 0.4 0.5 0.6 --std 0.2 0.2 0.2 --opt-betas 0.9 0.99 --torchcompile eager "
    "--model-kwargs act=relu num_knn=6 --amp-dtype float16 --clip-grad 1.0 --clip-mode agc --img-size 64 "
    "--interpolation bicubic --experiment run-1 --seed 7 --skip-nonfinite",
])
def test_args_yaml_of_a_run_loads_back_with_c(tmp_path: Path, argv: str) -> None:
    """args.yaml as a run writes it (vig.trainer.saver.write_args_yaml) gives the same arguments through -c."""
    config = parse_args(shlex.split(argv))
    write_args_yaml(tmp_path, config.to_flags())
    again = parse_args(["-c", str(tmp_path / "args.yaml")])
    assert again == dataclasses.replace(config, config=str(tmp_path / "args.yaml"))
    assert again.to_flags() == config.to_flags() | {"config": str(tmp_path / "args.yaml")}


def test_model_kwargs_are_parsed_as_literals() -> None:
    model = parse_args(["--model-kwargs", "channels=32", "act=gelu", "scale=0.5", "flag=True"]).model
    assert model.model_kwargs == {"channels": 32, "act": "gelu", "scale": 0.5, "flag": True}


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
        (["--sched", "bogus"], "argument --sched: invalid choice: 'bogus'"),
        (["--aa", "tv-rand-n2-x3"], "--aa 'tv-rand-n2-x3': expected tv-rand[-n<ops>][-m<magnitude>][-b<bins>]"),
        (["--aa", "tv-randn2"], "expected tv-rand[-n<ops>]"),
        (["--aa", "tv-rand-n2-n3"], "expected tv-rand[-n<ops>]"),
        (["--aa", "tv-rand-m"], "expected tv-rand[-n<ops>]"),
        (["--aa", "tv-rand-m31"], "magnitude 31 is not a bin of 0 .. 30"),
        (["--aa", "tv-rand-m5-b5"], "magnitude 5 is not a bin of 0 .. 4"),
        (["--aa", "tv-rand-n0"], "at least one op per image (n >= 1)"),
        (["--aa", "tv-rand-b1-m0"], "at least 2 magnitude bins (b >= 2)"),
        (["--train-crop", "pad", "--scale", "0.5", "1"], "they do not apply to --train-crop pad"),
        (["--train-crop", "pad", "--ratio", "1", "1"], "they do not apply to --train-crop pad"),
        (["--train-crop", "crop"], "argument --train-crop: invalid choice: 'crop'"),
        (["--scale", "0.9", "0.5"], "--scale must be two fractions 0 < low <= high <= 1, got 0.9 0.5"),
        (["--scale", "0", "1"], "--scale must be two fractions"),
        (["--scale", "0.5", "1.5"], "--scale must be two fractions"),
        (["--scale", "0.5"], "argument --scale: expected 2 arguments"),
        (["--ratio", "0", "1"], "--ratio must be two aspect ratios 0 < low <= high, got 0 1"),
        (["--ratio", "2", "1"], "--ratio must be two aspect ratios"),
        (["--force-color-jitter"], "--force-color-jitter keeps --color-jitter alongside --aa"),
        (["--aa", "foo"], "--aa 'foo' is not a timm augmentation policy"),
        (["--aa", "rand-x9"], "--aa 'rand-x9' is not a timm augmentation policy"),
        (["--weight-decay", "-1"], "--weight-decay must be >= 0, got -1"),
        (["--warmup-epochs", "-1"], "--warmup-epochs must be >= 0, got -1"),
        (["--mixup-prob", "2"], "--mixup-prob must be in [0, 1], got 2"),
    ],
)
def test_bad_flags_raise_one_line_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as info:
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


def test_bad_config_value_ends_train_py_with_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("clip_mode: bogus\n")
    line = _main_error(["-c", str(config)], capsys)
    assert line.startswith(f"error: config {config}: key 'clip_mode': argument --clip-mode: invalid choice")


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

    from vig.trainer.run import _optimizer

    config = parse_args(shlex.split(TRAIN_RECIPE))
    model = timm.create_model("vig_ti_224_gelu")
    optimizer = _optimizer(config.optimiser, model, "vig_ti_224_gelu")
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    undecayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "pos_embed" in undecayed and "stem.convs.1.weight" in undecayed and "prediction.4.bias" in undecayed
    assert decayed == {n for n, p in model.named_parameters() if p.ndim > 1 and n != "pos_embed"}
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.05}
    assert type(optimizer).__name__ == "AdamW" and optimizer.defaults["eps"] == 1e-8


def test_scale_with_the_default_padded_crop_ends_train_py_with_one_error_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _main_error(["--model", "convmixer_cifar", "--model-kwargs", "dim=16", "depth=2", "--scale", "0.75", "1",
                        "--epochs", "1", "-j", "0",
                        "--output", str(tmp_path)], capsys)
    assert line == ("error: --scale set the random-resized crop, but this run trains on the padded crop "
                    "(--train-crop pad, the default for 32-px inputs); add --train-crop rrc")


# the published ConvMixer-XL CIFAR-10 recipe (docs/CIFAR.md), on a tiny ConvMixer and 40 real images
CONVMIXER_RECIPE = ["--opt", "adamw", "--lr", "0.005", "--weight-decay", "0.01", "--sched", "onecycle-linear",
                    "--smoothing", "0", "--train-crop", "rrc", "--scale", "0.75", "1", "--ratio", "1", "1",
                    "--aa", "tv-rand-n2-m12", "--color-jitter", "0.2", "--force-color-jitter", "--reprob", "0.2",
                    "--remode", "const"]


def test_convmixer_recipe_flags_train_one_epoch_on_real_images(tmp_path: Path) -> None:
    source = shared_path("data", "cifar10-subset")
    for split, count in (("train", 4), ("test", 2)):
        for folder in sorted(entry for entry in (source / split).iterdir() if entry.is_dir()):
            (tmp_path / "data" / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:count]:
                shutil.copy(image, tmp_path / "data" / split / folder.name / image.name)
    assert train.main([str(tmp_path / "data"), "--val-split", "test", "--model", "convmixer_cifar",
                       "--model-kwargs", "dim=16", "depth=2", *CONVMIXER_RECIPE, "-b", "10", "-j", "0",
                       "--epochs", "1", "--output", str(tmp_path / "out"), "--experiment", "recipe"]) == 0
    saved = yaml.safe_load((tmp_path / "out" / "recipe" / "args.yaml").read_text())
    assert (saved["train_crop"], saved["scale"], saved["ratio"], saved["aa"], saved["force_color_jitter"]) == (
        "rrc", [0.75, 1.0], [1.0, 1.0], "tv-rand-n2-m12", True)
    with open(tmp_path / "out" / "recipe" / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["0"] and math.isfinite(float(rows[0]["train_loss"]))


def test_config_sections_hold_every_flag_once_and_serialise_back() -> None:
    """to_flags gives every flag destination of the parser (args.yaml / a checkpoint's args keep their keys);
    from_flags reads it back to an equal config; the config and its sections are frozen."""
    dests = {action.dest for action in build_parser()._actions if action.dest != "help"}
    config = parse_args(shlex.split(TRAIN_RECIPE))
    assert set(config.to_flags()) == dests
    assert TrainConfig.from_flags(config.to_flags()) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optimiser.lr = 1.0  # type: ignore[misc]
    with pytest.raises(UsageError, match="unknown settings: learning_rate"):
        TrainConfig.from_flags({"learning_rate": 0.1})


def test_alias_flags_fold_into_the_settings_and_stay_recorded(tmp_path: Path) -> None:
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    config = parse_args(["--data-dir", "/d", "--input-size", "3", "48", "48", "--repeated-aug",
                         "--pretrained-path", str(weights)])
    assert (config.data.data_dir, config.model.img_size, config.data.aug_repeats, config.model.pretrained) == (
        "/d", 48, 3, True)
    flags = config.to_flags()
    assert (flags["data_dir_option"], flags["input_size"], flags["repeated_aug"]) == ("/d", [3, 48, 48], True)
    assert config.replace(model={"model": "resnet10t"}).model.img_size == 48


def test_pretrained_path_and_initial_checkpoint_are_one_source_of_weights_too(tmp_path: Path) -> None:
    """--pretrained-path implies --pretrained, so it excludes --initial-checkpoint as --pretrained does."""
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    with pytest.raises(UsageError, match="both give starting weights; give one"):
        parse_args(["--pretrained-path", str(weights), "--initial-checkpoint", str(weights)])
