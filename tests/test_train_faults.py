"""Fault tolerance of the trainer: atomic files, exact and automatic resume, non-finite losses,
corrupt data, hostile checkpoints, one-line errors (project issue #6)."""
from __future__ import annotations

import csv
import errno
import io
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import BinaryIO

import pytest
import timm
import torch
from torch import nn

import train
import vig.trainer.run
from tests.train_helpers import REPO_ROOT, child_env, make_image_folder
from vig.errors import RunError
from vig.trainer.saver import CheckpointSaver, append_summary, write_args_yaml

TINY = ["--model", "vig_ti_224_gelu", "--img-size", "32", "--allow-small-graph", "--warmup-epochs", "0", "--lr", "1e-3", "-b", "8"]

pytestmark = pytest.mark.usefixtures("fast_in_process_runs")


def _summary_epochs(folder: Path) -> list[str]:
    with open(folder / "summary.csv", newline="") as handle:
        return [row["epoch"] for row in csv.DictReader(handle)]


def _one_error_line(status: int, expected_status: int, capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == expected_status, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 training images (2 steps of 8 per epoch) and 4 validation images in two classes."""
    return make_image_folder(tmp_path_factory.mktemp("data"), {"train": {"a": 8, "b": 8}, "val": {"a": 2, "b": 2}})


# --- atomic files ---------------------------------------------------------------------------------------

def _write_then_stall(folder: Path, target: str, ready: Connection) -> None:
    """Child process: start writing a new version of `target`, report "mid-write", then wait to be killed."""
    def stall(*_: object) -> None:
        ready.send("mid-write")
        time.sleep(600)

    if target == "checkpoint":  # stop after half of the new checkpoint's bytes are on disk
        real_save = torch.save

        def half_save(state: dict, handle: BinaryIO) -> None:
            buffer = io.BytesIO()
            real_save(state, buffer)
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            handle.flush()
            stall()

        torch.save = half_save  # this process only
        CheckpointSaver(folder, max_history=3).save(
            {"epoch": 1, "metric": 2.0, "state_dict": {"w": torch.ones(1000)}}, 1, 2.0)
    else:  # stop with the new file complete but not yet renamed into place
        os.fsync = stall
        if target == "summary":
            append_summary(folder, {"epoch": 1, "train_loss": 0.5})
        else:
            write_args_yaml(folder, {"lr": 0.2})


@pytest.mark.parametrize("target", ["checkpoint", "summary", "args"])
def test_sigkill_while_writing_leaves_the_previous_file_intact(tmp_path: Path, target: str) -> None:
    CheckpointSaver(tmp_path, max_history=3).save(
        {"epoch": 0, "metric": 1.0, "state_dict": {"w": torch.zeros(1000)}}, 0, 1.0)
    append_summary(tmp_path, {"epoch": 0, "train_loss": 1.0})
    write_args_yaml(tmp_path, {"lr": 0.1})
    receiver, sender = multiprocessing.get_context("fork").Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(target=_write_then_stall, args=(tmp_path, target, sender))
    child.start()
    try:
        assert receiver.poll(60) and receiver.recv() == "mid-write"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(60)
    assert child.exitcode == -signal.SIGKILL
    temporaries = [path.name for path in tmp_path.iterdir() if path.name.endswith(".tmp")]
    assert len(temporaries) == 1  # the interrupted write, never renamed
    last = torch.load(tmp_path / "last.pth.tar", weights_only=True)
    assert last["epoch"] == 0 and torch.equal(last["state_dict"]["w"], torch.zeros(1000))
    assert _summary_epochs(tmp_path) == ["0"]
    assert (tmp_path / "args.yaml").read_text() == "lr: 0.1\n"
    restarted = CheckpointSaver(tmp_path, max_history=3)  # what a resumed run does first
    assert not any(path.name.endswith(".tmp") for path in tmp_path.iterdir())
    assert restarted.history == [(0, 1.0)] and restarted.best == (0, 1.0)


def test_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saver = CheckpointSaver(tmp_path, max_history=2)
    saver.save({"epoch": 0, "metric": 1.0, "state_dict": {"w": torch.zeros(3)}}, 0, 1.0)

    def disk_full(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(RunError) as error:
        saver.save({"epoch": 1, "metric": 2.0, "state_dict": {"w": torch.ones(3)}}, 1, 2.0)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "last.pth.tar") in message and "No space left" in message
    with pytest.raises(RunError, match="summary.csv"):
        append_summary(tmp_path, {"epoch": 1, "train_loss": 0.5})
    monkeypatch.undo()
    assert torch.load(tmp_path / "last.pth.tar", weights_only=True)["epoch"] == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-0.pth.tar", "last.pth.tar",
                                                                 "model_best.pth.tar"]


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "copies"])
def test_history_pruning_never_deletes_the_newest_complete_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                links: bool) -> None:
    if not links:  # file systems without hard links: atomic copies instead
        def no_links(source: Path, target: Path) -> None:
            raise OSError(errno.EPERM, "links not supported")

        monkeypatch.setattr(os, "link", no_links)
    foreign = tmp_path / "checkpoint-99.pth.tar"
    foreign.write_bytes(b"not a checkpoint")
    saver = CheckpointSaver(tmp_path, max_history=2)  # the foreign file is ignored, not fatal
    metrics = [50.0, 60.0, 40.0, 70.0, 30.0, 30.0]
    for epoch, metric in enumerate(metrics):
        saver.save({"epoch": epoch, "metric": metric, "state_dict": {"w": torch.full((4,), float(epoch))}},
                   epoch, metric)
        last = torch.load(tmp_path / "last.pth.tar", weights_only=True)
        assert last["epoch"] == epoch and torch.equal(last["state_dict"]["w"], torch.full((4,), float(epoch)))
        for kept_epoch, _ in saver.history:
            kept = torch.load(tmp_path / f"checkpoint-{kept_epoch}.pth.tar", weights_only=True)
            assert kept["epoch"] == kept_epoch
    assert saver.history == [(3, 70.0), (1, 60.0)]
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "checkpoint-1.pth.tar", "checkpoint-3.pth.tar", "checkpoint-99.pth.tar", "last.pth.tar",
        "model_best.pth.tar"]
    assert torch.load(tmp_path / "model_best.pth.tar", weights_only=True)["epoch"] == 3


@pytest.mark.parametrize("entry", ["state_dict", "state_dict_ema"])
def test_non_finite_weights_are_never_written(tmp_path: Path, entry: str) -> None:
    saver = CheckpointSaver(tmp_path, max_history=2)
    good = {"epoch": 0, "metric": 1.0, "state_dict": {"w": torch.zeros(2)}, "state_dict_ema": {"w": torch.zeros(2)}}
    saver.save(good, 0, 1.0)
    bad = {**good, "epoch": 1, entry: {"w": torch.tensor([0.0, float("nan")]), "n": torch.tensor(3)}}
    with pytest.raises(RunError, match=rf"epoch 1: weights are not finite \({entry}\.w\)"):
        saver.save(bad, 1, 99.0)
    for name in ("last.pth.tar", "model_best.pth.tar"):
        assert torch.load(tmp_path / name, weights_only=True)["epoch"] == 0
    assert not (tmp_path / "checkpoint-1.pth.tar").exists()


# --- exact and automatic resume -------------------------------------------------------------------------

AUGMENTED = ["--mixup", ".8", "--cutmix", "1.0", "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25",
             "--drop-path", ".1", "--repeated-aug", "--model-ema", "--model-ema-decay", "0.9"]


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_resume_from_epoch_k_is_bitwise_the_uninterrupted_run(tmp_path: Path, folder_data: Path,
                                                              workers: str) -> None:
    common = [str(folder_data), *TINY, *AUGMENTED, "--epochs", "2", "-j", workers, "--output", str(tmp_path)]
    assert train.main([*common, "--experiment", "full"]) == 0
    assert train.main([*common, "--experiment", "resumed",
                       "--resume", str(tmp_path / "full" / "checkpoint-0.pth.tar")]) == 0
    expected = torch.load(tmp_path / "full" / "last.pth.tar", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "last.pth.tar", weights_only=True)
    assert resumed["epoch"] == expected["epoch"] == 1
    for entry in ("state_dict", "state_dict_ema"):
        assert expected[entry].keys() == resumed[entry].keys()
        unequal = [key for key in expected[entry] if not torch.equal(expected[entry][key], resumed[entry][key])]
        assert not unequal, f"{entry}: {unequal[:5]}"
    epoch_zero = torch.load(tmp_path / "full" / "checkpoint-0.pth.tar", weights_only=True)
    assert any(not torch.equal(value, expected["state_dict"][key]) for key, value in epoch_zero["state_dict"].items())
    assert _summary_epochs(tmp_path / "resumed") == ["1"]


def _descendants(pid: int) -> list[int]:
    """Process ids below `pid` (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            parent = next(line for line in status.splitlines() if line.startswith("PPid:"))
            parents[int(entry.name)] = int(parent.split()[1])
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        children = [child for child, parent in parents.items() if parent == current]
        found += children
        frontier += children
    return found


def _worker_of_rank(launcher_pid: int, rank: int) -> int | None:
    for pid in _descendants(launcher_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ:
            return pid
    return None


@pytest.mark.slow
def test_torchrun_restarts_a_sigkilled_worker_and_every_epoch_is_logged_once(tmp_path: Path,
                                                                              folder_data: Path) -> None:
    run_folder = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--max-restarts=1", "--monitor-interval=0.1", str(REPO_ROOT / "train.py"), str(folder_data), *TINY,
               "-b", "4", "--epochs", "2", "-j", "0", "--output", str(tmp_path), "--experiment", "run",
               "--resume", "auto"]
    # the launcher's default settings: its agent shares one store with every worker round, where a plain env://
    # start of the restarted round would read the address of the killed rank (pytorch/pytorch#135712)
    launcher = subprocess.Popen(command, cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        killed = None
        while launcher.poll() is None and killed is None:  # kill rank 1 once epoch 0 is checkpointed
            if (run_folder / "last.pth.tar").exists():
                killed = _worker_of_rank(launcher.pid, 1)
                if killed is not None:
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        output, _ = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert killed is not None, output[-4000:]
    assert launcher.returncode == 0, output[-30000:]
    assert "resumed from" in output, output[-4000:]
    assert _summary_epochs(run_folder) == ["0", "1"]
    assert torch.load(run_folder / "last.pth.tar", weights_only=True)["epoch"] == 1


def test_bugs_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(args: object) -> None:
        raise ZeroDivisionError("a bug, not a user mistake")

    monkeypatch.setattr(train, "run", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        train.main(["--epochs", "1"])


def test_resume_auto_needs_a_fixed_experiment(capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_error_line(train.main(["--resume", "auto"]), 2, capsys)
    assert "--resume auto needs --experiment" in line


# --- non-finite loss ------------------------------------------------------------------------------------

class _NaNOnCall(nn.Module):
    """Wraps a loss; its `call`-th evaluation (1-based, over the whole run) returns NaN."""

    def __init__(self, loss_fn: nn.Module, call: int) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.call = call
        self.calls = 0

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = self.loss_fn(logits, targets)
        return loss * float("nan") if self.calls == self.call else loss


@pytest.mark.slow
@pytest.mark.parametrize("skip", [False, True], ids=["stop", "skip"])
def test_non_finite_loss(tmp_path: Path, folder_data: Path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, skip: bool) -> None:
    real = vig.trainer.run._loss_and_mixup
    monkeypatch.setattr(vig.trainer.run, "_loss_and_mixup",
                        lambda args, classes: (_NaNOnCall(real(args, classes)[0], call=3), None))
    argv = [str(folder_data), *TINY, "--epochs", "2", "-j", "0", "--output", str(tmp_path), "--experiment", "run"]
    status = train.main(argv + (["--skip-nonfinite"] if skip else []))
    last = torch.load(tmp_path / "run" / "last.pth.tar", weights_only=True)
    assert all(torch.isfinite(value).all() for value in last["state_dict"].values() if value.is_floating_point())
    if skip:
        assert status == 0
        assert "epoch 1: skipped 1 of 2 steps for a non-finite loss" in caplog.text
        assert last["epoch"] == 1 and int(last["optimizer"]["state"][0]["step"]) == 3
        assert _summary_epochs(tmp_path / "run") == ["0", "1"]
    else:
        line = _one_error_line(status, 1, capsys)
        # read back at the epoch's last step (log interval 50): step 2 ran on the bad weights, nothing was saved
        assert "non-finite training loss at epoch 1, step 1 of 2, found at step 2;" in line
        assert last["epoch"] == 0 and _summary_epochs(tmp_path / "run") == ["0"]
        assert not (tmp_path / "run" / "checkpoint-1.pth.tar").exists()


# --- data -----------------------------------------------------------------------------------------------

def _damage(image: Path, kind: str) -> None:
    if kind == "truncated":
        data = image.read_bytes()
        image.write_bytes(data[: len(data) // 2])
    else:
        image.write_bytes(b"<html>this is not a png</html>")


@pytest.mark.parametrize(("kind", "workers"), [("truncated", "0"), ("not-an-image", "1")])
def test_corrupt_image_stops_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             kind: str, workers: str) -> None:
    data = make_image_folder(tmp_path / "data", {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}})
    broken = data / "train" / "b" / "2.png"
    _damage(broken, kind)
    status = train.main([str(data), *TINY, "--epochs", "1", "-j", workers, "--output", str(tmp_path / "out"),
                         "--experiment", "run"])
    line = _one_error_line(status, 1, capsys)
    assert f"corrupt image {broken}:" in line and "--skip-corrupt" in line


@pytest.mark.slow
def test_skip_corrupt_counts_the_skipped_files(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               caplog: pytest.LogCaptureFixture) -> None:
    data = make_image_folder(tmp_path / "data", {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}})
    _damage(data / "train" / "a" / "1.png", "truncated")
    _damage(data / "val" / "b" / "0.png", "not-an-image")
    status = train.main([str(data), *TINY, "--epochs", "1", "-j", "1", "--skip-corrupt", "--output",
                         str(tmp_path / "out"), "--experiment", "run"])
    assert status == 0, capsys.readouterr().err
    assert "epoch 0: skipped 1 corrupt training and 1 corrupt validation image reads" in caplog.text
    assert _summary_epochs(tmp_path / "out" / "run") == ["0"]


@pytest.mark.parametrize(("val_classes", "expected"), [
    ({"a": 1, "b": 1, "c": 1}, "only in validation: c"),
    ({"a": 1}, "only in training: b"),
])
def test_differing_class_lists_fail_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    val_classes: dict[str, int], expected: str) -> None:
    data = make_image_folder(tmp_path / "data", {"train": {"a": 1, "b": 1}, "val": val_classes})
    status = train.main([str(data), *TINY, "--output", str(tmp_path / "out"), "--experiment", "run"])
    line = _one_error_line(status, 2, capsys)
    assert f"class lists differ between {data / 'train'} (2 classes) and {data / 'val'}" in line and expected in line
    assert not (tmp_path / "out").exists()  # nothing started


def test_missing_split_names_the_folder_and_the_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_image_folder(tmp_path / "data", {"train": {"a": 1}, "test": {"a": 1}})
    line = _one_error_line(train.main([str(data), *TINY]), 2, capsys)
    assert f"no 'val' split under {data}; it holds test, train: " in line
    assert f"looked for {data / 'val'}/, {data / 'validation'}/" in line
    assert f"expected layout: {data / 'val'}/<class>/<image>" in line
    flat = tmp_path / "flat"
    make_image_folder(flat, {"train": {"a": 1}})
    (flat / "train" / "a" / "0.png").rename(flat / "train" / "0.png")
    (flat / "train" / "a").rmdir()
    line = _one_error_line(train.main([str(flat), *TINY]), 2, capsys)
    assert f"images lie directly in {flat / 'train'}" in line and "<class>/<image>" in line


@pytest.mark.parametrize(("data_classes", "status"), [(2, 0), (4, 2), (5, 2)])
def test_evaluating_a_head_on_data_of_another_class_count_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                  caplog: pytest.LogCaptureFixture,
                                                                  data_classes: int, status: int) -> None:
    """A 3-class checkpoint on 2-class data is scored with a warning; on 4 or 5 classes it is refused."""
    data = make_image_folder(tmp_path / "data", {"val": {f"c{index}": 1 for index in range(data_classes)}}, size=8)
    path = tmp_path / "three.pth.tar"
    torch.save({"epoch": 0, "arch": "resnet10t", "state_dict": timm.create_model("resnet10t", num_classes=3
                                                                                 ).state_dict()}, path)
    argv = [str(data), "--evaluate", "--pretrain_path", str(path), "--img-size", "8", "-b", "2", "-j", "0"]
    found = train.main(argv)
    where = f"split 'val' of {data} holds {data_classes} classes"
    if status:
        line = _one_error_line(found, status, capsys)
        missing = "label 3 has" if data_classes == 4 else "labels 3 to 4 have"
        assert line == f"error: {path} has a 3-class head but {where}: {missing} no output", line
    else:
        assert found == 0
        warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
        assert warnings == [f"{path} has a 3-class head but {where}: its labels 0 to 1 are scored against all 3 "
                            "outputs; is this the data the checkpoint was trained on?"], warnings


@pytest.mark.parametrize("content", ["name,score\nx,1\n", "epoch,top1\nlast,1\n", "\x00\xff\xfe"])
def test_foreign_summary_in_the_run_folder_fails_before_training(tmp_path: Path, folder_data: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 content: str) -> None:
    folder = tmp_path / "out" / "run"
    folder.mkdir(parents=True)
    (folder / "summary.csv").write_bytes(content.encode("latin-1"))
    status = train.main([str(folder_data), *TINY, "--output", str(tmp_path / "out"), "--experiment", "run"])
    line = _one_error_line(status, 2, capsys)
    assert f"{folder / 'summary.csv'} is not a summary.csv of train.py" in line
    assert sorted(path.name for path in folder.iterdir()) == ["summary.csv"]  # nothing trained or written


# --- hostile checkpoints --------------------------------------------------------------------------------

class _RunsCode:
    """Unpickling this object calls ``exec``: the shape of a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _training_state(model_name: str, **extra: object) -> dict:
    model = timm.create_model(model_name, num_classes=2, **({"img_size": 32} if model_name.startswith("vig") else {}))
    return {"epoch": 0, "arch": model_name, "state_dict": model.state_dict(), "metric": 50.0, **extra}


@pytest.mark.parametrize(("kind", "expected"), [
    ("truncated", "not a readable PyTorch checkpoint, truncated or corrupt"),
    ("foreign", "not a PyTorch checkpoint that loads safely"),
    ("bare-state-dict", "is not a training checkpoint of train.py"),
    ("other-architecture", "was written for model resnet10t, not vig_ti_224_gelu"),
    ("other-weights", "state_dict does not fit"),
    ("runs-code", "refused to load: unpickling it would call"),
    ("runs-code-pickle", "refused to load: unpickling it would call"),
])
def test_bad_resume_checkpoint_is_one_line_naming_the_file(tmp_path: Path, folder_data: Path,
                                                           capsys: pytest.CaptureFixture[str], kind: str,
                                                           expected: str) -> None:
    path = tmp_path / f"{kind}.pth.tar"
    marker = tmp_path / "code-ran"
    if kind == "truncated":
        torch.save(_training_state("vig_ti_224_gelu"), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "foreign":
        path.write_text("model: vig_ti_224_gelu\nlr: 0.002\n")
    elif kind == "bare-state-dict":
        torch.save(_training_state("vig_ti_224_gelu")["state_dict"], path)
    elif kind == "other-architecture":
        torch.save(_training_state("resnet10t"), path)
    elif kind == "other-weights":
        torch.save({**_training_state("resnet10t"), "arch": "vig_ti_224_gelu"}, path)
    elif kind == "runs-code":
        torch.save(_training_state("vig_ti_224_gelu", args=_RunsCode(marker)), path)
    else:
        with open(path, "wb") as handle:
            pickle.dump({"epoch": 0, "args": _RunsCode(marker)}, handle, protocol=2)
    status = train.main([str(folder_data), *TINY, "-j", "0", "--output", str(tmp_path / "out"),
                         "--experiment", "run", "--resume", str(path)])
    line = _one_error_line(status, 2, capsys)
    assert line.startswith("error: --resume: ") and str(path) in line and expected in line, line
    assert not marker.exists()
