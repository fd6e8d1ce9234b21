"""train.py on webdataset shards (`--dataset wds/...`, written by vig-make-shards from the CIFAR-10 subset) and on
a local Hugging Face dataset (`--dataset hfds/FOLDER`), on 1 and 2 gloo processes: each image once per epoch
under the sharding rule, corrupt samples stopped or skipped as in ImageFolder."""
from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.shared_files import import_or_skip, shared_path
from tests.train_helpers import REPO_ROOT, child_env, last_json_line, run_train
from vig.tools import make_shards

IMAGES = 200  # per split
SHARD_SIZE = 50  # 4 shards per split: 2 ranks x 2 workers, 50 images each, 2 batches of 25
BASE = ["--model", "vig_ti_224_gelu", "--img-size", "32", "--allow-small-graph", "-b", "25", "-j", "2", "--epochs", "1",
        "--warmup-epochs", "0", "--log-interval", "100", "--experiment", "run"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun() -> list[str]:
    return ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}"]


def _shards(root: Path, out: Path, limit: int = IMAGES) -> Path:
    status = make_shards.main([str(root), str(out), "--splits", "train", "test:val", "--limit", str(limit),
                               "--shard-size", str(SHARD_SIZE)])
    assert status == 0
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _shards(shared_path("data", "cifar10-subset"), tmp_path_factory.mktemp("wds"))


def _summary(folder: Path) -> list[dict]:
    with open(folder / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_make_shards_writes_timm_split_info(shards: Path) -> None:
    info = json.loads((shards / "_info.json").read_text())
    assert len(info["classes"]) == 10
    for split in ("train", "val"):
        entry = info["splits"][split]
        assert entry["num_samples"] == IMAGES
        assert entry["shard_lengths"] == [SHARD_SIZE] * (IMAGES // SHARD_SIZE)
        assert all((shards / name).is_file() for name in entry["filenames"])


def test_make_shards_refuses_a_used_folder(shards: Path, capsys: pytest.CaptureFixture) -> None:
    assert make_shards.main([str(shared_path("data", "cifar10-subset")), str(shards), "--splits", "train"]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.slow
def test_wds_train_then_evaluate_one_process(tmp_path: Path, shards: Path) -> None:
    output = tmp_path / "out"
    result = run_train([str(shards), "--dataset", "wds/cifar", *BASE, "--output", str(output)])
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"mean over the {IMAGES} images trained in this epoch by 1 process(es)" in result.stderr
    assert f"validation {IMAGES} images" in result.stderr
    assert "read twice or not at all" not in result.stderr
    assert [row["epoch"] for row in _summary(output / "run")] == ["0"]
    evaluation = run_train([str(shards), "--dataset", "wds/cifar", "--model", "vig_ti_224_gelu", "--img-size", "32",
                            "-b", "25", "-j", "2", "--evaluate", "--pretrain_path",
                            str(output / "run" / "model_best.pth.tar")])
    assert evaluation.returncode == 0, evaluation.stderr[-4000:]
    assert last_json_line(evaluation.stdout)["count"] == IMAGES


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_wds_resume_repeats_the_uninterrupted_run(tmp_path: Path, shards: Path, workers: str) -> None:
    """Epoch 1 resumed from epoch 0's checkpoint gives the uninterrupted run's weights: the stream's shard and
    sample order of an epoch follow from --seed and the epoch alone, also when read in the main process (-j 0)."""
    common = [str(shards), "--dataset", "wds/cifar", *BASE, "-j", workers, "--epochs", "2", "--output",
              str(tmp_path / "out")]
    full = run_train([*common, "--experiment", "full"])
    assert full.returncode == 0, full.stderr[-4000:]
    resumed_folder = tmp_path / "out" / "resumed"
    resumed_folder.mkdir()
    shutil.copy(tmp_path / "out" / "full" / "checkpoint-0.pth.tar", resumed_folder / "last.pth.tar")
    resumed = run_train([*common, "--experiment", "resumed", "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    expected = torch.load(tmp_path / "out" / "full" / "last.pth.tar", weights_only=True)
    actual = torch.load(resumed_folder / "last.pth.tar", weights_only=True)
    assert actual["epoch"] == expected["epoch"] == 1
    torch.testing.assert_close(actual["state_dict"], expected["state_dict"], rtol=0, atol=0)


def test_wds_input_key_png_trains(tmp_path: Path, shards: Path) -> None:
    """The shards hold .png images; before the guard timm 1.0.31's reader stopped the run (it keys the decoded
    image 'jpg', then renames the field named by --input-key)."""
    output = tmp_path / "out"
    result = run_train([str(shards), "--dataset", "wds/cifar", *BASE, "-j", "0", "--input-key", "png",
                        "--train-num-samples", "50", "--output", str(output)])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "images trained in this epoch" in result.stderr and f"validation {IMAGES} images" in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--repeated-aug"], "--repeated-aug needs random access"),
    (["--dataset", "wds/cifar", "--train-num-samples", "0"], "--train-num-samples must be positive"),
    (["--dataset", "", "--train-num-samples", "10"], "sets the epoch length of a wds/ stream"),
])
def test_wds_usage_errors_are_one_line(tmp_path: Path, shards: Path, flags: list[str], message: str) -> None:
    result = run_train([str(shards), "--dataset", "wds/cifar", *BASE, "--output", str(tmp_path), *flags])
    assert result.returncode == 2, result.stderr[-4000:]
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_wds_two_ranks_see_each_image_once_per_epoch(tmp_path: Path, shards: Path) -> None:
    """2 ranks x 2 workers = 4 slots over 4 equal shards: every epoch the ranks' training targets (the samples'
    indices, --target-key index) are disjoint and together every image once, in an order that changes from
    epoch to epoch; validation reads every image once."""
    output = tmp_path / "out"
    command = [sys.executable, *_torchrun(), str(REPO_ROOT / "tests" / "stream_keys_worker.py"), str(tmp_path),
               str(shards), "--dataset", "wds/cifar", "--target-key", "index", "--num-classes", str(IMAGES), *BASE,
               "--epochs", "2", "--output", str(output)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for epoch in range(2):
        seen = [rank["train"][epoch] for rank in ranks]
        assert [len(part) for part in seen] == [IMAGES // 2] * 2
        assert sorted(seen[0] + seen[1]) == list(range(IMAGES))
    assert ranks[0]["train"][0] != ranks[0]["train"][1]
    for epoch in range(2):
        assert sorted(ranks[0]["eval"][epoch] + ranks[1]["eval"][epoch]) == list(range(IMAGES))
    assert f"mean over the {IMAGES} images trained in this epoch by 2 process(es)" in result.stderr
    assert result.stderr.count(f"validation {IMAGES} images") == 2


def test_wds_uneven_shards_are_named_in_a_warning(tmp_path: Path, shards: Path) -> None:
    result = run_train([str(shards), "--dataset", "wds/cifar", *BASE, "-j", "3", "--output", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "4 shards over 3 slots (processes x workers)" in result.stderr


@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of a 40-image tree (4 + 4 per class, 5 classes) whose first training image is garbage bytes."""
    source = shared_path("data", "cifar10-subset")
    tree = tmp_path_factory.mktemp("tree")
    for split in ("train", "test"):
        for folder in sorted((source / split).iterdir())[:5]:
            (tree / split / folder.name).mkdir(parents=True)
            for path in sorted(folder.iterdir())[:4]:
                shutil.copy(path, tree / split / folder.name / path.name)
    first = sorted((tree / "train" / "airplane").iterdir())[0]
    first.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    return _shards(tree, tmp_path_factory.mktemp("corrupt-wds"), limit=20)


@pytest.mark.parametrize("skip", [False, True])
def test_wds_corrupt_sample_stops_or_is_skipped(tmp_path: Path, corrupt_shards: Path, skip: bool) -> None:
    flags = [str(corrupt_shards), "--dataset", "wds/cifar", "--model", "vig_ti_224_gelu", "--img-size", "32",
             "--allow-small-graph",
             "-b", "10", "-j", "1", "--epochs", "1", "--warmup-epochs", "0", "--output", str(tmp_path),
             "--experiment", "run", *(["--skip-corrupt"] if skip else [])]
    result = run_train(flags)
    if skip:
        assert result.returncode == 0, result.stderr[-4000:]
        assert "skipped 1 corrupt training and 0 corrupt validation image reads (--skip-corrupt)" in result.stderr
    else:
        assert result.returncode == 1, result.stderr[-4000:]
        line = result.stderr.strip().splitlines()[-1]
        assert "corrupt image" in line and "train-000000.tar:train" in line and "--skip-corrupt" in line
        assert "Traceback" not in result.stderr


def _parquet_dataset(folder: Path) -> Path:
    """folder/data/{train,validation}-00000-of-00001.parquet: 10 + 3 CIFAR images per class, bytes embedded."""
    datasets = import_or_skip("datasets")
    source = shared_path("data", "cifar10-subset")
    classes = sorted(entry.name for entry in (source / "train").iterdir())
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=classes))
    (folder / "data").mkdir(parents=True)
    for split, source_split, count in (("train", "train", 10), ("validation", "test", 3)):
        rows = [({"bytes": path.read_bytes(), "path": path.name}, label) for label, name in enumerate(classes)
                for path in sorted((source / source_split / name).iterdir())[:count]]
        table = datasets.Dataset.from_dict({"image": [row[0] for row in rows], "label": [row[1] for row in rows]},
                                           features=features)
        table.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


@pytest.mark.slow
def test_hfds_train_then_evaluate(tmp_path: Path) -> None:
    folder = _parquet_dataset(tmp_path / "hf")
    output, cache = tmp_path / "out", tmp_path / "cache"
    source = ["--dataset", f"hfds/{folder}"]
    result = run_train([str(cache), *source, *BASE, "-j", "1", "--output", str(output)])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "mean over the 100 images trained in this epoch by 1 process(es)" in result.stderr
    assert "validation 30 images" in result.stderr  # --val-split val falls back to the 'validation' split
    evaluation = run_train([str(cache), *source, "--model", "vig_ti_224_gelu", "--img-size", "32", "-b", "25",
                            "-j", "0", "--evaluate", "--pretrain_path", str(output / "run" / "model_best.pth.tar")])
    assert evaluation.returncode == 0, evaluation.stderr[-4000:]
    assert last_json_line(evaluation.stdout)["count"] == 30


def test_hfds_missing_folder_is_one_line(tmp_path: Path) -> None:
    result = run_train(["--dataset", f"hfds/{tmp_path / 'absent'}", *BASE, "--output", str(tmp_path)])
    assert result.returncode == 2
    assert "never the hub" in result.stderr and "Traceback" not in result.stderr


def test_dataset_trust_remote_code_is_gone(tmp_path: Path) -> None:
    """datasets >= 4.0 (the project needs >= 5.2) runs no loading scripts, so the flag could only fail; a config
    written before its removal still loads when it holds the harmless false."""
    from vig.errors import UsageError
    from vig.trainer.cli import parse_args

    with pytest.raises(UsageError, match="unrecognized arguments: --dataset-trust-remote-code"):
        parse_args(["--dataset-trust-remote-code"])
    config = tmp_path / "args.yaml"
    config.write_text("dataset_trust_remote_code: false\nlr: 0.5\n")
    assert parse_args(["-c", str(config)]).optimiser.lr == 0.5
    config.write_text("dataset_trust_remote_code: true\n")
    with pytest.raises(UsageError, match="--dataset-trust-remote-code was removed"):
        parse_args(["-c", str(config)])
