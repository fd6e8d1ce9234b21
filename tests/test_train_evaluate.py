"""train.py --evaluate keeps timm validate.py's habits: every flag that changes an evaluation takes effect
(checked against an independent float64 oracle, torch._dynamo's own counters, the plain run), the result can
be written to a file, validate.py's spellings work, and no flag is taken by an unknown prefix."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch._dynamo
import torch.nn.functional as F
from PIL import Image

import train
import vig.models  # noqa: F401  (registers the models)
from tests.train_helpers import last_json_line, make_image_folder
from vig.trainer.cli import parse_args

pytestmark = pytest.mark.usefixtures("fast_in_process_runs")

MODEL = "pvig_ti_cifar"  # per-image predictions, 32-px inputs: the evaluation transform is the plain image
CLASSES = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 validation images of 32 px in 3 classes (and a token training split)."""
    return make_image_folder(tmp_path_factory.mktemp("data"), {"train": {"a": 1, "b": 1, "c": 1},
                                                               "val": {"a": 3, "b": 3, "c": 2}}, size=32, seed=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare state dict of the model: seeded weights with BatchNorm statistics of random inputs, so that the
    logits are of a trained model's scale."""
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=CLASSES)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    path = tmp_path_factory.mktemp("ckpt") / "weights.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def plain(data: Path, checkpoint: Path) -> dict:
    """The result of the evaluation without flags."""
    torch.set_num_threads(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert train.main([str(data), "--model", MODEL, "--pretrain_path", str(checkpoint), "--evaluate", "-j", "0",
                           "-b", "3"]) == 0
    return last_json_line(printed.getvalue())


def _evaluate(data: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> dict:
    capsys.readouterr()
    status = train.main([str(data), "--model", MODEL, "--pretrain_path", str(checkpoint), "--evaluate", "-j", "0",
                         "-b", "3", *flags])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return last_json_line(captured.out)


def _float64_oracle(data: Path, checkpoint: Path) -> float:
    """Mean cross-entropy of the validation images computed here: the images read with PIL, normalised in
    float32 as the loader does (ToTensor, then the model's mean / std), then model and inputs in float64."""
    model = timm.create_model(MODEL, num_classes=CLASSES)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    model.double().eval()
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"], dtype=torch.float32)[:, None, None]
    std = torch.tensor(cfg["std"], dtype=torch.float32)[:, None, None]
    images, targets = [], []
    for index, folder in enumerate(sorted((data / "val").iterdir())):
        for path in sorted(folder.iterdir()):
            pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
            images.append(((pixels.float() / 255) - mean) / std)
            targets.append(index)
    with torch.no_grad():
        logits = model(torch.stack(images).double())
    return float(F.cross_entropy(logits, torch.tensor(targets), reduction="mean"))


def test_model_dtype_float64_evaluates_in_float64(data: Path, checkpoint: Path, plain: dict,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Before the fix --model-dtype float64 gave the float32 loss bit for bit."""
    oracle = _float64_oracle(data, checkpoint)
    double = _evaluate(data, checkpoint, capsys, "--model-dtype", "float64")
    assert double["loss"] != plain["loss"]
    torch.testing.assert_close(double["loss"], oracle, rtol=1e-12, atol=0)
    assert abs(plain["loss"] - oracle) > 1e-9 * abs(oracle)  # float32 rounding (and the kNN edges it flips) shows
    assert double["model_dtype"] == "float64" and plain["model_dtype"] == "float32"
    assert double["count"] == plain["count"] == 8


def test_torchcompile_compiles_the_evaluated_model(data: Path, checkpoint: Path, plain: dict,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """torch._dynamo's counters show frames compiled during the evaluation (the eager backend: no compiler
    needed); before the fix --torchcompile was never read by --evaluate."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    result = _evaluate(data, checkpoint, capsys, "--torchcompile", "eager")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert result["torchcompile"] == "eager"
    torch.testing.assert_close(result["loss"], plain["loss"], rtol=1e-5, atol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize(("flags", "field", "value"), [
    (["--amp"], "amp", "bfloat16"),
    (["--amp-dtype", "bfloat16"], "amp", "bfloat16"),
    (["--amp-dtype", "float16"], "amp", "float16"),  # on the CPU too (it once warned and took bfloat16)
    (["--tta"], "tta", 2),
    (["--tta", "2"], "tta", 2),
    (["--model-dtype", "bfloat16"], "model_dtype", "bfloat16"),
    (["--channels-last"], "channels_last", True),  # another float32 summation order: other kNN edges flip
])
def test_precision_and_tta_flags_change_the_evaluation(data: Path, checkpoint: Path, plain: dict,
                                                       capsys: pytest.CaptureFixture[str], flags: list[str], field: str,
                                                       value: object) -> None:
    result = _evaluate(data, checkpoint, capsys, *flags)
    assert result["loss"] != plain["loss"]
    assert result[field] == value


@pytest.mark.parametrize("flags", [["--tta", "0"], ["--tta", "1"]])
def test_flags_that_keep_the_plain_evaluation(data: Path, checkpoint: Path, plain: dict,
                                              capsys: pytest.CaptureFixture[str], flags: list[str]) -> None:
    result = _evaluate(data, checkpoint, capsys, *flags)
    assert result["loss"] == plain["loss"] and result["tta"] == 0


def test_crop_pct_changes_an_imagenet_style_evaluation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_image_folder(tmp_path / "data", {"val": {"a": 2, "b": 2}, "train": {"a": 1, "b": 1}}, size=56)
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=2, img_size=48)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    common = [str(data), "--model", MODEL, "--img-size", "48", "--pretrain_path", str(tmp_path / "w.pth"),
              "--evaluate", "-j", "0", "-b", "4"]
    results = []
    for crop in ("0.875", "1.0"):
        capsys.readouterr()
        assert train.main([*common, "--crop-pct", crop]) == 0
        results.append(last_json_line(capsys.readouterr().out))
    assert [result["crop_pct"] for result in results] == [0.875, 1.0]
    assert results[0]["loss"] != results[1]["loss"]


def test_crop_pct_on_a_32_px_input_is_refused(data: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    status = train.main([str(data), "--model", MODEL, "--pretrain_path", str(checkpoint), "--evaluate", "-j", "0",
                         "--crop-pct", "0.9"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "--crop-pct 0.9" in err, err


@pytest.mark.parametrize("name", ["result.json", "result.CSV", "deeper/result.txt"])
def test_results_file(data: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                      name: str) -> None:
    path = tmp_path / name
    printed = _evaluate(data, checkpoint, capsys, "--results-file", str(path), "--tta")
    if name.endswith(".CSV"):
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == 1
        written = rows[0]
        assert list(written)[:8] == ["model", "checkpoint", "top1", "top5", "loss", "count", "img_size", "crop_pct"]
        assert float(written["loss"]) == printed["loss"] and float(written["top1"]) == printed["top1"]
        assert int(written["count"]) == 8 and written["crop_pct"] == "" and written["tta"] == "2"
    else:
        written = json.loads(path.read_text())
        assert written == printed
    assert written["model"] == MODEL and written["checkpoint"] == str(checkpoint)


def test_results_file_needs_evaluate(capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main(["--results-file", "x.json"]) == 2
    assert "--results-file writes the result of --evaluate" in capsys.readouterr().err


def test_validate_py_spellings_evaluate_the_ema_weights(data: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """--checkpoint and --use-ema, timm validate.py's names; before the fix --checkpoint PATH was taken as an
    abbreviation of --checkpoint-hist ("invalid int value")."""
    torch.manual_seed(1)
    model = timm.create_model(MODEL, num_classes=CLASSES)
    ema = {key: value + 0.01 if value.is_floating_point() else value for key, value in model.state_dict().items()}
    path = tmp_path / "ckpt.pth.tar"
    torch.save({"state_dict": model.state_dict(), "state_dict_ema": ema, "arch": MODEL}, path)
    results = []
    for flags in (["--pretrain_path", str(path)], ["--checkpoint", str(path)],
                  ["--pretrain_path", str(path), "--model-ema"], ["--checkpoint", str(path), "--use-ema"]):
        capsys.readouterr()
        assert train.main([str(data), "--evaluate", "-j", "0", "-b", "4", *flags]) == 0, capsys.readouterr().err
        results.append(last_json_line(capsys.readouterr().out))
    assert results[0]["loss"] == results[1]["loss"] != results[2]["loss"] == results[3]["loss"]
    assert [result["ema"] for result in results] == [False, False, True, True]


@pytest.mark.parametrize(("argv", "message"), [
    (["--checkpoint-h", "3"], "unrecognized arguments: --checkpoint-h"),
    (["--eval"], "unrecognized arguments: --eval"),
    (["--model-e"], "unrecognized arguments: --model-e"),
    (["--tta", "3"], "--tta 3: the test-time augmentation here is the flip average"),
    (["--tta", "x"], None),  # bare --tta, then the data folder x
])
def test_no_prefix_matching_and_the_tta_factor(argv: list[str], message: str | None) -> None:
    from vig.errors import UsageError

    if message is None:
        config = parse_args(argv)
        assert config.loop.tta == 2 and config.data.data_dir == "x"
        return
    with pytest.raises(UsageError, match=message):
        parse_args(argv)


# the published commands that run train.py, as their READMEs give them (launcher prefix removed, placeholders
# filled): huawei-noah/Efficient-AI-Backbones vig_pytorch/readme.md, the SViG readme, and this README's own
PUBLISHED = {
    "vig evaluate": "/path/to/imagenet/ --model pvig_s_224_gelu -b 128 --pretrain_path {ckpt} --evaluate",
    "vig train": "/path/to/imagenet/ --model vig_s_224_gelu --sched cosine --epochs 300 --opt adamw -j 8 "
                 "--warmup-lr 1e-6 --mixup .8 --cutmix 1.0 --model-ema --model-ema-decay 0.99996 "
                 "--aa rand-m9-mstd0.5-inc1 --color-jitter 0.4 --warmup-epochs 20 --opt-eps 1e-8 --repeated-aug "
                 "--remode pixel --reprob 0.25 --amp --lr 2e-3 --weight-decay .05 --drop 0 --drop-path .1 -b 128 "
                 "--output /path/to/save/models/",
    "pyramid vig train": "/path/to/imagenet/ --model pvig_s_224_gelu --sched cosine --epochs 300 --opt adamw -j 8 "
                         "--warmup-lr 1e-6 --mixup .8 --cutmix 1.0 --model-ema --model-ema-decay 0.99996 "
                         "--aa rand-m9-mstd0.5-inc1 --color-jitter 0.4 --warmup-epochs 20 --opt-eps 1e-8 "
                         "--repeated-aug --remode pixel --reprob 0.25 --amp --lr 2e-3 --weight-decay .05 --drop 0 "
                         "--drop-path .1 -b 128 --output /path/to/save/models/",
    "svig evaluate": "/data/imagenet --model vig_ti_224_gelu -j 8 --amp --drop 0 --drop-path .1 -b 128 "
                     "--num-classes 1000 --pretrain_path {ckpt} --evaluate --start-thresh 0.89 --dec 0.03 "
                     "--model-ema",
    "svig train": "/data/imagenet --model vig_ti_224_gelu --sched cosine --epochs 300 --opt adamw -j 8 "
                  "--warmup-lr 1e-6 --mixup .8 --cutmix 1.0 --model-ema --model-ema-decay 0.99996 "
                  "--aa rand-m9-mstd0.5-inc1 --color-jitter 0.4 --warmup-epochs 20 --opt-eps 1e-8 --repeated-aug "
                  "--remode pixel --reprob 0.25 --amp --lr 2e-3 --weight-decay .05 --drop 0 --drop-path .1 -b 128 "
                  "--output /out --start-thresh 0.89 --dec 0.03",
    "cifar recipe": "data --dataset torch/cifar10 --dataset-download --val-split test --model cnn_gat_cifar "
                    "--opt adamw --lr 1e-3 --weight-decay 1e-3 --epochs 200 --warmup-epochs 5 --smoothing 0.1 "
                    "--aa rand-n2-m9 --reprob 0.1 --tta --amp --amp-dtype bfloat16 -b 128 -j 8 --output output "
                    "--experiment cifar10-gat",
    "cifar evaluate": "data --dataset torch/cifar10 --val-split test --model cnn_gat_cifar --model-kwargs hidden=128 "
                      "heads=1 num_blocks=1 --pretrain_path {ckpt} --evaluate --tta",
    "svig checkpoint evaluate": "/path/to/imagenet -b 128 -j 8 --amp --pretrain_path {ckpt} --evaluate --model-ema "
                                "--tta",
    "bare tta before the folder": "--evaluate --pretrain_path {ckpt} --tta /path/to/imagenet",
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_commands_parse_with_their_meaning(tmp_path: Path, name: str) -> None:
    ckpt = tmp_path / "ckpt.pth"
    ckpt.write_bytes(b"x")
    argv = shlex.split(PUBLISHED[name].format(ckpt=ckpt))
    flags = parse_args(argv).to_flags()
    assert flags["data_dir"] == argv[0] if not argv[0].startswith("-") else flags["data_dir"] == argv[-1]
    assert flags["evaluate"] == ("--evaluate" in argv)
    assert flags["tta"] == (2 if "--tta" in argv else 0)
    assert flags["model_ema"] == ("--model-ema" in argv)
    assert flags["initial_checkpoint"] == (str(ckpt) if "--pretrain_path" in argv else "")
    if "-b" in argv:
        assert flags["batch_size"] == int(argv[argv.index("-b") + 1])
    if "--model" in argv:
        assert flags["model"] == argv[argv.index("--model") + 1]


# MobileViG's and GreedyViG's READMEs run DeiT's main.py, not train.py (the train.py form of their recipe is
# in docs/models.md and parsed by tests/test_readme.py): their flags are refused in one line, never half-read
DEIT_MAIN = [
    "--data-path ../../Datasets/ILSVRC/Data/CLS-LOC/ --model mobilevig_m --output_dir mobilevig_test_results",
    "--data-path ../../Datasets/ILSVRC/Data/CLS-LOC/ --model mobilevig_s "
    "--resume Pretrained_Models_MobileViG/MobileViG_S_78_2.pth.tar --eval",
    "--data-path ../../Datasets/ILSVRC/Data/CLS-LOC/ --model GreedyViG_S "
    "--resume Pretrained_Models_GreedyViG/S_GreedyViG_81_1.pth --eval",
]


@pytest.mark.parametrize("command", DEIT_MAIN)
def test_deit_main_py_commands_are_refused_not_half_read(command: str) -> None:
    from vig.errors import UsageError

    with pytest.raises(UsageError, match="unrecognized arguments: --data-path"):
        parse_args(shlex.split(command))
