"""The trainer on CIFAR: 32 x 32 transforms, torchvision CIFAR-10 flags, flip TTA, a real-image run of cnn_gat_cifar."""
from __future__ import annotations

import csv
import pickle
import random
import shutil
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import DataLoader, TensorDataset
from torchvision import transforms

import train
import vig  # noqa: F401  (registers the models with timm)
import vig.models.cifar_gat
from tests.shared_files import shared_path
from tests.train_helpers import last_json_line
from vig.trainer.cli import parse_args
from vig.trainer.data import build_dataset, eval_transform, resolve_preprocessing, train_transform
from vig.trainer.distributed import DistributedContext
from vig.trainer.engine import Precision, validate
from vig.errors import UsageError
from vig.tta import predict_flip_tta

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
TINY_MODEL_KWARGS = ["--model-kwargs", "embed_dim=16", "hidden=16", "heads=2", "num_blocks=2"]


def _transforms(argv: list[str]) -> tuple[list, list]:
    """(training, evaluation) transform steps the trainer builds for these flags."""
    run_config = parse_args(argv)
    model = timm.create_model(run_config.model.model, num_classes=10, **run_config.model.model_kwargs)
    config = resolve_preprocessing(run_config.data, run_config.model.img_size, model)
    return list(train_transform(run_config.augmentation, config).transforms), list(eval_transform(config).transforms)


def _random_image(size: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


@pytest.mark.parametrize("argv", [["--model", "cnn_gat_cifar"], ["--model", "vig_ti_224_gelu", "--img-size", "32", "--allow-small-graph"]],
                         ids=["cifar-model", "vig-at-32"])
def test_32px_inputs_train_with_padded_crop_and_flip_then_the_usual_flags(argv: list[str]) -> None:
    steps, eval_steps = _transforms([*argv, "--aa", "rand-n2-m9", "--reprob", "0.1"])
    crop, flip = steps[:2]
    assert isinstance(crop, transforms.RandomCrop) and crop.size == (32, 32) and crop.padding == 4
    assert isinstance(flip, transforms.RandomHorizontalFlip) and flip.p == 0.5
    assert not any(isinstance(step, (RandomResizedCropAndInterpolation, transforms.Resize)) for step in steps)
    rand_augment = [step for step in steps if isinstance(step, RandAugment)]
    assert len(rand_augment) == 1 and rand_augment[0].num_layers == 2
    assert {op.magnitude for op in rand_augment[0].ops} == {9}
    assert not any(isinstance(step, transforms.ColorJitter) for step in steps)  # --aa replaces colour jitter
    erasing = steps[-1]
    assert isinstance(erasing, RandomErasing) and erasing.probability == 0.1
    assert not any(isinstance(step, transforms.Resize) for step in eval_steps)

    out = transforms.Compose(steps)(_random_image(32))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_cifar_model_normalises_with_cifar_statistics_and_evaluates_the_plain_image() -> None:
    steps, eval_steps = _transforms(["--model", "cnn_gat_cifar"])
    normalise = next(step for step in steps if isinstance(step, transforms.Normalize))
    torch.testing.assert_close(normalise.mean, torch.tensor(CIFAR10_MEAN))
    torch.testing.assert_close(normalise.std, torch.tensor(CIFAR10_STD))
    assert not any(isinstance(step, (RandomErasing, RandAugment)) for step in steps)  # off unless asked for

    image = _random_image(32, seed=3)
    expected = (transforms.functional.to_tensor(image) - torch.tensor(CIFAR10_MEAN)[:, None, None]) \
        / torch.tensor(CIFAR10_STD)[:, None, None]
    torch.testing.assert_close(transforms.Compose(eval_steps)(image), expected, rtol=0, atol=1e-6)


def test_imagenet_model_keeps_the_resized_crop() -> None:
    steps, eval_steps = _transforms(["--model", "vig_ti_224_gelu", "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25"])
    assert isinstance(steps[0], RandomResizedCropAndInterpolation) and steps[0].size == (224, 224)
    assert not any(isinstance(step, transforms.RandomCrop) for step in steps)
    assert isinstance(eval_steps[0], transforms.Resize)
    assert isinstance(eval_steps[1], transforms.CenterCrop) and eval_steps[1].size == (224, 224)
    out = transforms.Compose(steps)(_random_image(40))
    assert out.shape == (3, 224, 224)


def test_trainer_tta_is_the_models_flip_average() -> None:
    assert vig.models.cifar_gat.predict_flip_tta is predict_flip_tta
    torch.manual_seed(0)
    model = timm.create_model("cnn_gat_cifar", embed_dim=8, hidden=8, heads=2, num_blocks=2).double().eval()
    images = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 3, 4, 5])
    with torch.no_grad():
        plain, mirrored = model(images), model(images.flip(-1))
        tta_logits = predict_flip_tta(model, images)
    torch.testing.assert_close(tta_logits, (plain + mirrored) / 2, rtol=0, atol=1e-12)
    assert not torch.allclose(tta_logits, plain)  # the mirror changes the logits, so the check has teeth

    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    loader = DataLoader(TensorDataset(images, targets), batch_size=4)
    stats = validate(model, loader, ctx, Precision("cpu", None, None), tta=True)
    scored = tta_logits.float()  # validate scores float32 logits
    assert stats.count == 6
    assert stats.loss == pytest.approx(torch.nn.functional.cross_entropy(scored, targets).item(), rel=1e-6)
    assert stats.top1 == pytest.approx(100 * (scored.argmax(1) == targets).double().mean().item())


def _fake_cifar10(root: Path, train_count: int = 6, test_count: int = 4) -> None:
    """A tiny torchvision CIFAR-10 tree (python pickles of random pixels), as the download would leave it."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        count = test_count if name == "test_batch" else train_count
        batch = {"data": rng.integers(0, 256, size=(count, 3 * 32 * 32), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, size=count)]}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump(meta, handle)


def test_dataset_download_flag_builds_the_torchvision_cifar10(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cifar10(tmp_path)
    # the fake files cannot match torchvision's checksums; accept them as a finished download
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    args = parse_args([str(tmp_path), "--dataset", "torch/cifar10", "--dataset-download", "--val-split", "test",
                       "--model", "cnn_gat_cifar"]).data
    train_set, classes = build_dataset(args, args.train_split, is_training=True)
    test_set, _ = build_dataset(args, args.val_split, is_training=False)
    assert isinstance(train_set, torchvision.datasets.CIFAR10) and train_set.train
    assert isinstance(test_set, torchvision.datasets.CIFAR10) and not test_set.train
    assert (len(train_set), len(test_set)) == (5 * 6, 4)
    assert classes[:2] == ["airplane", "automobile"] and len(classes) == 10
    image, label = train_set[0]
    assert image.size == (32, 32) and 0 <= label < 10


def test_failed_download_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_network)
    args = parse_args([str(tmp_path), "--dataset", "torch/cifar10", "--dataset-download",
                       "--model", "cnn_gat_cifar"]).data
    with pytest.raises(UsageError, match=r"^cannot download torch/cifar10 into .*Name or service not known$"):
        build_dataset(args, "train", is_training=True)
    args = parse_args([str(tmp_path), "--dataset", "torch/cifar10", "--model", "cnn_gat_cifar"]).data
    with pytest.raises(UsageError, match=r"torch/cifar10 not found under .*\(add --dataset-download\)$"):
        build_dataset(args, "train", is_training=True)


def _tiny_cifar_folder(root: Path, per_class_train: int, per_class_test: int, classes: int = 4) -> Path:
    """root/{train,test}/<class>/ with the first images of the shared CIFAR-10 subset (real 32 x 32 images)."""
    source = shared_path("data", "cifar10-subset")
    names = sorted(entry.name for entry in (source / "train").iterdir() if entry.is_dir())[:classes]
    for split, count in (("train", per_class_train), ("test", per_class_test)):
        for name in names:
            target = root / split / name
            target.mkdir(parents=True)
            for image in sorted((source / split / name).iterdir())[:count]:
                shutil.copy(image, target / image.name)
    return root


@pytest.mark.slow
def test_cnn_gat_cifar_trains_on_real_images_and_its_checkpoint_evaluates_the_same(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _tiny_cifar_folder(tmp_path / "data", per_class_train=8, per_class_test=4)
    common = [str(data), "--val-split", "test", "--model", "cnn_gat_cifar", *TINY_MODEL_KWARGS, "-b", "8", "-j", "0",
              "--tta"]
    assert train.main([*common, "--train-split", "train", "--epochs", "1", "--warmup-epochs", "0",
                       "--aa", "rand-n2-m9", "--reprob", "0.1", "--smoothing", "0.1", "--weight-decay", "1e-3",
                       "--output", str(tmp_path / "out"), "--experiment", "tiny"]) == 0
    folder = tmp_path / "out" / "tiny"
    with open(folder / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["0"]

    assert train.main([*common, "--pretrain_path", str(folder / "last.pth.tar"), "--evaluate"]) == 0
    result = last_json_line(capsys.readouterr().out)
    assert result["count"] == 16 and result["tta"] == 2
    # evaluation is deterministic: the checkpoint scores what the training run's validation saw
    assert result["top1"] == pytest.approx(float(rows[0]["eval_top1"]))
    assert result["loss"] == pytest.approx(float(rows[0]["eval_loss"]), rel=1e-5)
    assert train.main([*common[:-1], "--pretrain_path", str(folder / "last.pth.tar"), "--evaluate"]) == 0
    plain = last_json_line(capsys.readouterr().out)
    assert plain["tta"] == 0 and plain["loss"] != pytest.approx(result["loss"], rel=1e-9)
