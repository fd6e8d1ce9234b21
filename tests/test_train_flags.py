"""timm train.py flags run through train.py: gradient accumulation (1 and 2 gloo processes), distillation
through timm.task, experiment logs, fine-tuning flags."""
from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from timm.loss import BinaryCrossEntropy

import train
from tests.shared_files import shared_path
from tests.test_train_distributed import _launcher
from tests.train_helpers import REPO_ROOT, child_env, make_image_folder
from vig.trainer.cli import parse_args
from vig.trainer.setup import build_model, build_optimizer, loss_and_mixup, resolve_lr

pytestmark = pytest.mark.slow

# test_vit has no BatchNorm: a batch of 16 and two accumulated batches of 8 see the same normalisation
ACCUM_FLAGS = ("--model test_vit --img-size 32 --model-dtype float64 --epochs 1 --warmup-epochs 0 --lr 1e-3 "
               "--drop-path 0 -j 0 --model-ema --model-ema-decay 0.9 --clip-grad 1").split()


@pytest.fixture(scope="module")
def accum_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 training images: 32 per rank on 2 processes, 2 batches of 16 or 4 of 8 per rank."""
    return make_image_folder(tmp_path_factory.mktemp("accum"), {"train": {"a": 32, "b": 32}, "val": {"a": 2, "b": 2}})


def _max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert first.keys() == second.keys()
    return max((first[key].double() - second[key].double()).abs().max().item() for key in first)


def test_grad_accumulation_matches_the_full_batch_on_one_process(tmp_path: Path, accum_data: Path) -> None:
    common = [str(accum_data), *ACCUM_FLAGS, "--output", str(tmp_path)]
    assert train.main([*common, "-b", "16", "--experiment", "full"]) == 0
    assert train.main([*common, "-b", "8", "--grad-accum-steps", "2", "--experiment", "accum"]) == 0
    full = torch.load(tmp_path / "full" / "last.pth.tar", weights_only=True)
    accum = torch.load(tmp_path / "accum" / "last.pth.tar", weights_only=True)
    assert next(iter(full["state_dict"].values())).dtype == torch.float64
    assert int(full["optimizer"]["state"][0]["step"]) == int(accum["optimizer"]["state"][0]["step"]) == 4
    for entry in ("state_dict", "state_dict_ema"):  # the EMA stepped once per update, not per batch
        assert _max_difference(full[entry], accum[entry]) < 1e-13, entry
    assert full["scheduler"] == accum["scheduler"]


def _torchrun_weights(tmp_path: Path, data: Path, flags: list[str]) -> dict:
    weights = tmp_path / "weights"
    weights.mkdir(parents=True)
    command = [sys.executable, *_launcher("torchrun"), str(REPO_ROOT / "tests" / "train_worker.py"), str(weights),
               str(data), *flags, "--output", str(tmp_path / "out"), "--experiment", "run"]
    result = subprocess.run(command, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return [torch.load(weights / f"rank{rank}.pth", weights_only=True) for rank in (0, 1)]


def test_grad_accumulation_matches_the_full_batch_on_two_gloo_processes(tmp_path: Path, accum_data: Path) -> None:
    full = _torchrun_weights(tmp_path / "full", accum_data, [*ACCUM_FLAGS, "-b", "16"])
    accum = _torchrun_weights(tmp_path / "accum", accum_data, [*ACCUM_FLAGS, "-b", "8", "--grad-accum-steps", "2"])
    # 4 batches per rank in groups of 2: the first of each group backpropagates without an all-reduce
    assert [rank["no_sync"] for rank in accum] == [2, 2] and [rank["no_sync"] for rank in full] == [0, 0]
    for entry in ("model", "ema"):
        assert _max_difference(full[0][entry], accum[0][entry]) < 1e-13, entry
        assert _max_difference(accum[0][entry], accum[1][entry]) == 0, entry


def test_partial_last_group_and_exact_resume_with_accumulation(tmp_path: Path, accum_data: Path) -> None:
    """64 images in batches of 16, groups of 3: 2 updates per epoch (3 batches, then 1); a run resumed from
    epoch 0's checkpoint repeats the uninterrupted run."""
    common = [str(accum_data), *ACCUM_FLAGS[:-2], "--epochs", "2", "-b", "16", "--grad-accum-steps", "3",
              "--output", str(tmp_path)]
    assert train.main([*common, "--experiment", "full"]) == 0
    full = torch.load(tmp_path / "full" / "last.pth.tar", weights_only=True)
    assert int(full["optimizer"]["state"][0]["step"]) == 4
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "full" / "checkpoint-0.pth.tar", tmp_path / "resumed" / "last.pth.tar")
    assert train.main([*common, "--experiment", "resumed", "--resume", "auto"]) == 0
    resumed = torch.load(tmp_path / "resumed" / "last.pth.tar", weights_only=True)
    for entry in ("state_dict", "state_dict_ema", "optimizer"):
        torch.testing.assert_close(resumed[entry], full[entry], rtol=0, atol=0)
    assert resumed["scheduler"] == full["scheduler"]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 training and 2 test images per class of the shared CIFAR-10 subset (10 classes)."""
    source = shared_path("data", "cifar10-subset")
    root = tmp_path_factory.mktemp("cifar")
    for split, count in (("train", 4), ("test", 2)):
        for folder in sorted(entry for entry in (source / split).iterdir() if entry.is_dir()):
            (root / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:count]:
                shutil.copy(image, root / split / folder.name / image.name)
    return root


@pytest.fixture(scope="module")
def teacher(cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test_vit trained by train.py for one short epoch on the CIFAR subset (32 px)."""
    out = tmp_path_factory.mktemp("teacher")
    assert train.main([str(cifar), "--val-split", "test", "--model", "test_vit", "--img-size", "32", "-b", "8",
                       "-j", "0", "--epochs", "1", "--warmup-epochs", "0", "--output", str(out),
                       "--experiment", "t"]) == 0
    return out / "t" / "last.pth.tar"


def _student_keys(folder: Path) -> set[str]:
    return set(torch.load(folder / "last.pth.tar", weights_only=True)["state_dict"])


KD_COMMON = ["--val-split", "test", "--img-size", "32", "-b", "8", "-j", "0", "--epochs", "1", "--warmup-epochs",
             "0", "--kd-model-name", "test_vit"]


@pytest.mark.parametrize("student, extra", [
    (["--model", "convmixer_cifar", "--model-kwargs", "dim=16", "depth=2"],
     ["--kd-distill-type", "logit", "--kd-temperature", "2", "--distill-loss-weight", "0.5"]),
    (["--model", "convmixer_cifar", "--model-kwargs", "dim=16", "depth=2"],
     ["--kd-distill-type", "feature", "--task-loss-weight", "0.3"]),
    (["--model", "deit_tiny_distilled_patch16_224", "--model-kwargs", "depth=1", "embed_dim=24", "num_heads=2"],
     ["--kd-distill-type", "token", "--kd-token-distill-type", "hard"]),
    (["--model", "deit_tiny_distilled_patch16_224", "--model-kwargs", "depth=1", "embed_dim=24", "num_heads=2"],
     ["--kd-distill-type", "token", "--kd-token-distill-type", "soft", "--grad-accum-steps", "2"]),
    # the efficient family's published recipe distils hard tokens into its dist_head
    (["--model", "mobilevig_ti"], ["--kd-distill-type", "token", "--kd-token-distill-type", "hard"]),
    (["--model", "greedyvig_s"], ["--kd-distill-type", "token", "--kd-token-distill-type", "hard"]),
])
def test_distillation_trains_the_student_and_saves_it_alone(tmp_path: Path, cifar: Path, teacher: Path,
                                                           student: list[str], extra: list[str]) -> None:
    teacher_before = torch.load(teacher, weights_only=True)["state_dict"]
    assert train.main([str(cifar), *student, *KD_COMMON, "--kd-pretrained-path", str(teacher), *extra,
                       "--output", str(tmp_path), "--experiment", "kd"]) == 0
    state = torch.load(tmp_path / "kd" / "last.pth.tar", weights_only=True)
    assert not any(key.startswith(("teacher", "model.")) for key in state["state_dict"])
    # the same student built without distillation has exactly these weights: the teacher is not saved
    config = parse_args([str(cifar), *student, "--img-size", "32"])
    assert set(state["state_dict"]) == set(build_model(config.model, 10).state_dict())
    # convmixer's 16 pre-logit features against test_vit's 64: feature KD trains a projection, saved beside
    assert ("kd_projection" in state) == ("feature" in extra)
    torch.testing.assert_close(torch.load(teacher, weights_only=True)["state_dict"], teacher_before)
    with open(tmp_path / "kd" / "summary.csv", newline="") as handle:
        assert float(next(csv.DictReader(handle))["train_loss"]) > 0


def test_token_distillation_needs_a_distillation_head(tmp_path: Path, cifar: Path, teacher: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main([str(cifar), "--model", "test_vit", *KD_COMMON, "--kd-pretrained-path", str(teacher),
                       "--kd-distill-type", "token", "--output", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "set_distilled_training" in error[0], error


def test_pretrained_path_loads_through_timm_and_resets_a_head_of_another_class_count(cifar: Path,
                                                                                     teacher: Path) -> None:
    saved = torch.load(teacher, weights_only=True)["state_dict"]
    same = build_model(parse_args([str(cifar), "--model", "test_vit", "--img-size", "32",
                                   "--pretrained-path", str(teacher)]).model, 10).state_dict()
    torch.testing.assert_close(same, saved, rtol=0, atol=0)
    other = build_model(parse_args([str(cifar), "--model", "test_vit", "--img-size", "32",
                                    "--pretrained-path", str(teacher)]).model, 7).state_dict()
    assert other["head.weight"].shape == (7, 64)
    torch.testing.assert_close({key: value for key, value in other.items() if not key.startswith("head.")},
                               {key: value for key, value in saved.items() if not key.startswith("head.")},
                               rtol=0, atol=0)


def test_lr_base_rule_loss_and_layer_decay_follow_timm(cifar: Path) -> None:
    base = [str(cifar), "--model", "test_vit", "--img-size", "32", "-b", "8", "--lr-base", "0.1"]

    def lr(argv: list[str], world_size: int) -> float:
        return resolve_lr(parse_args(argv).optimiser, 8, world_size)

    assert lr(base, 2) == pytest.approx(0.1 * (16 / 256) ** 0.5)  # adamw: sqrt
    assert lr([*base, "--opt", "sgd", "--grad-accum-steps", "4"], 2) == pytest.approx(0.1 * 64 / 256)
    assert lr([*base, "--lr-base-scale", "linear", "--lr-base-size", "8"], 1) == pytest.approx(0.1)
    assert lr([*base, "--lr", "0.02"], 2) == 0.02
    assert lr(base[:-2], 1) == 1e-3
    loss, _ = loss_and_mixup(parse_args([*base, "--bce-loss", "--bce-target-thresh", "0.2"]).augmentation, 10)
    assert isinstance(loss, BinaryCrossEntropy) and loss.target_threshold == 0.2
    config = parse_args([*base, "--lr", "1", "--layer-decay", "0.5"])
    model = build_model(config.model, 10)
    scales = sorted({group["lr_scale"] for group in build_optimizer(config.optimiser, model, "test_vit").param_groups})
    layers = len(model.blocks) + 2  # stem, blocks, head (timm's group_matcher layers)
    assert scales == pytest.approx([0.5 ** depth for depth in reversed(range(layers))])


def test_fine_tuning_flags_run_together(tmp_path: Path, cifar: Path, teacher: Path) -> None:
    """--pretrained-path, --layer-decay, --lr-base, --bce-loss, --model-ema-warmup, --val-interval, --eval-metric,
    --input-size, --data-dir, --device, --aug-repeats in one train.py run of 3 epochs."""
    assert train.main(["--data-dir", str(cifar), "--val-split", "test", "--model", "test_vit", "--input-size", "3",
                       "32", "32", "-b", "8", "-j", "0", "--epochs", "3", "--warmup-epochs", "0", "--pretrained-path",
                       str(teacher), "--layer-decay", "0.75", "--lr-base", "0.01", "--bce-loss", "--model-ema",
                       "--model-ema-warmup", "--val-interval", "2", "--eval-metric", "loss", "--device", "cpu",
                       "--aug-repeats", "2", "--output", str(tmp_path), "--experiment", "ft"]) == 0
    folder = tmp_path / "ft"
    with open(folder / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1", "2"]  # epoch 0 left out by --val-interval 2; the last kept
    saved = yaml.safe_load((folder / "args.yaml").read_text())
    assert saved["lr"] == pytest.approx(0.01 * (8 / 256) ** 0.5) and saved["img_size"] == 32
    assert saved["data_dir"] == str(cifar) and saved["aug_repeats"] == 2
    best = torch.load(folder / "model_best.pth.tar", weights_only=True)
    assert best["metric"] == pytest.approx(min(float(row["ema_eval_loss"]) for row in rows))
    assert sorted(path.name for path in folder.glob("checkpoint-*")) == ["checkpoint-1.pth.tar", "checkpoint-2.pth.tar"]


def test_tensorboard_and_offline_wandb_logs_hold_the_summary_rows(tmp_path: Path, cifar: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert train.main([str(cifar), "--val-split", "test", "--model", "test_vit", "--img-size", "32", "-b", "8",
                       "-j", "0", "--epochs", "2", "--warmup-epochs", "0", "--log-tensorboard", str(tmp_path / "tb"),
                       "--log-wandb", "--wandb-project", "vig-test", "--output", str(tmp_path),
                       "--experiment", "logs"]) == 0
    with open(tmp_path / "logs" / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    for column in ("train_loss", "eval_top1", "lr"):
        scalars = events.Scalars(column)
        assert [event.step for event in scalars] == [0, 1]
        torch.testing.assert_close([event.value for event in scalars], [float(row[column]) for row in rows])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), runs


def test_missing_logging_package_is_one_error_line(tmp_path: Path, cifar: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    assert train.main([str(cifar), "--val-split", "test", "--model", "test_vit", "--img-size", "32", "-b", "8",
                       "-j", "0", "--epochs", "1", "--log-wandb", "--output", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["error: --log-wandb needs the package wandb: pip install 'vig-toolkit[logging]'"]


def test_help_shows_every_default() -> None:
    result = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "--help"], env=child_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for shown in ("--grad-accum-steps N accumulate", "(default: 1)", "--lr-base-size LR_BASE_SIZE", "(default: 256)",
                  "--kd-temperature KD_TEMPERATURE", "(default: 4.0)", "--eval-metric {top1,top5,loss}"):
        assert shown in text, shown


def test_teacher_sees_the_batch_in_its_own_normalisation(cifar: Path, teacher: Path) -> None:
    """convmixer_cifar (CIFAR mean / std) distils from test_vit (0.5 / 0.5): the teacher re-normalises, runs in
    eval mode and gets no gradients."""
    from vig.trainer.data import resolve_preprocessing
    from vig.trainer.distill import build_distillation_task, build_teacher

    run_config = parse_args([str(cifar), "--model", "convmixer_cifar", "--model-kwargs", "dim=16", "depth=2",
                             *KD_COMMON, "--kd-pretrained-path", str(teacher)])
    student = build_model(run_config.model, 10)
    config = resolve_preprocessing(run_config.data, run_config.model.img_size, student)
    distill = run_config.distill
    task = build_distillation_task(distill, student, build_teacher(distill, 10, torch.device("cpu"), None),
                                   torch.nn.CrossEntropyLoss(), config.mean, config.std, torch.device("cpu"), None,
                                   verbose=False)
    raw = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    mean, std = (torch.tensor(values, dtype=torch.float64).view(1, 3, 1, 1) for values in (config.mean, config.std))
    seen = task.teacher.normalize_input((raw - mean) / std, task.student_mean.double(), task.student_std.double())
    torch.testing.assert_close(seen, (raw - 0.5) / 0.5)
    task.train()
    assert student.training and not task.teacher.training
    assert not any(parameter.requires_grad for parameter in task.teacher.parameters())


@pytest.mark.parametrize("flags, message", [
    (["--grad-accum-steps", "0"], "--grad-accum-steps must be positive"),
    (["--kd-model-name", "test_vit"], "--kd-model-name and --kd-pretrained-path go together"),
    (["--input-size", "1", "32", "32"], "--input-size must be 3 H H"),
    (["--input-size", "3", "32", "32", "--img-size", "48"], "--input-size 32 px and --img-size 48 differ"),
    (["--aug-repeats", "1"], "--aug-repeats 1 repeats nothing"),
    (["--repeated-aug", "--aug-repeats", "2"], "--repeated-aug means --aug-repeats 3"),
    (["--model-dtype", "float64", "--amp"], "--model-dtype float64 and --amp exclude each other"),
    (["--bce-sum"], "need --bce-loss"),
    (["--layer-decay", "0"], "--layer-decay must be in (0, 1]"),
    (["--data-dir", "/elsewhere"], "and --data-dir /elsewhere differ"),
    (["--pretrained-path", "/no/such.pth"], "--pretrained-path: no such file"),
])
def test_bad_new_flags_are_one_line_usage_errors(tmp_path: Path, flags: list[str], message: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main([str(tmp_path), *flags, "--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_device_cuda_without_cuda_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main(["--device", "cuda", "--epochs", "1", "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: --device cuda: no CUDA device is available (use --device cpu)"


def test_feature_distillation_resumes_exactly_with_its_projection(tmp_path: Path, cifar: Path, teacher: Path) -> None:
    common = [str(cifar), "--model", "convmixer_cifar", "--model-kwargs", "dim=16", "depth=2", *KD_COMMON,
              "--kd-pretrained-path", str(teacher), "--kd-distill-type", "feature", "--epochs", "2",
              "--output", str(tmp_path)]
    assert train.main([*common, "--experiment", "full"]) == 0
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "full" / "checkpoint-0.pth.tar", tmp_path / "resumed" / "last.pth.tar")
    assert train.main([*common, "--experiment", "resumed", "--resume", "auto"]) == 0
    full = torch.load(tmp_path / "full" / "last.pth.tar", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "last.pth.tar", weights_only=True)
    for entry in ("state_dict", "kd_projection", "optimizer"):
        torch.testing.assert_close(resumed[entry], full[entry], rtol=0, atol=0)


def test_logit_distillation_on_two_gloo_processes_keeps_the_ranks_in_step(tmp_path: Path, cifar: Path,
                                                                          teacher: Path) -> None:
    ranks = _torchrun_weights(tmp_path, cifar, ["--model", "convmixer_cifar", "--model-kwargs", "dim=16", "depth=2",
                                                *KD_COMMON, "--kd-pretrained-path", str(teacher),
                                                "--grad-accum-steps", "2", "-b", "4"])
    assert ranks[0]["model"].keys() == ranks[1]["model"].keys() == ranks[0]["initial"].keys()
    assert _max_difference(ranks[0]["model"], ranks[1]["model"]) == 0
    assert _max_difference(ranks[0]["model"], ranks[0]["initial"]) > 0
    assert [rank["no_sync"] for rank in ranks] == [2, 2]  # 20 images per rank, 5 batches of 4: groups 2, 2, 1


@pytest.mark.parametrize("model", ["mobilevig_ti", "greedyvig_s"])
def test_efficient_family_trains_an_epoch_without_a_teacher(tmp_path: Path, cifar: Path, model: str) -> None:
    assert train.main([str(cifar), "--model", model, *KD_COMMON[:KD_COMMON.index("--kd-model-name")],
                       "--output", str(tmp_path), "--experiment", "plain"]) == 0
    with open(tmp_path / "plain" / "summary.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert float(row["train_loss"]) > 0 and 0 <= float(row["eval_top1"]) <= 100
