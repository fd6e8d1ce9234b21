"""A full disk at any byte of the save sequence is one line and changes no file that was there.

A real small file system (a tmpfs mount, which needs root; skipped with the reason elsewhere) filled to a
range of free-space levels, and ENOSPC injected into the writer at a range of byte counts."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

import train
import vig.trainer.saver as saver
from tests.train_helpers import make_image_folder
from vig.errors import RunError
from vig.trainer.resume import write_interrupted
from vig.trainer.saver import CheckpointSaver, append_summary, write_args_yaml

TINY = ["--model", "test_resnet", "--img-size", "32", "--warmup-epochs", "0", "--lr", "1e-3", "-b", "8", "-j", "0"]
MOUNT_SIZE = 24 * 2 ** 20

pytestmark = pytest.mark.usefixtures("fast_in_process_runs")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), {"train": {"a": 8, "b": 8}, "val": {"a": 2, "b": 2}})


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tmpfs of MOUNT_SIZE bytes; skipped where mounting is not permitted."""
    mount_point = tmp_path_factory.mktemp("tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={MOUNT_SIZE}", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}); the injected-ENOSPC "
                    "tests cover the writer")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def _fill_to(mount_point: Path, free: int) -> None:
    """Write a ballast file so that about ``free`` bytes stay available (page-granular on tmpfs)."""
    stats = os.statvfs(mount_point)
    available = stats.f_bavail * stats.f_frsize
    with open(mount_point / "ballast", "wb") as handle:
        handle.truncate(0)
        remaining = max(available - free, 0)
        block = b"\0" * 2 ** 20
        while remaining > 0:
            try:
                remaining -= handle.write(block[:remaining])
            except OSError:
                break
        handle.flush()


def _snapshot(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def _complete(path: Path) -> bool:
    """Whether a file of a run folder is a whole file of its kind."""
    if path.name.endswith(".pth.tar"):
        try:
            torch.load(path, weights_only=True, map_location="cpu")
            return True
        except Exception:
            return False
    if path.suffix == ".png":
        return path.read_bytes().endswith(b"IEND\xaeB`\x82")
    return path.read_text().endswith("\n")


def _one_disk_full_line(status: int, err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert status == 1 and len(lines) == 1 and lines[0].startswith("error: cannot write "), err
    assert "No space left on device" in lines[0] and "Traceback" not in err, err
    return lines[0]


# free bytes when the second epoch starts: nothing, a few pages, the level that used to be a traceback
# (torch.save's zip writer), part of a checkpoint; then a checkpoint's pages (the old one stays, linked
# as checkpoint-0 and model_best) plus a few pages more, which run out at the lock, args.yaml, summary.csv or
# curves.png, and plenty
PAGE = 4096
FREE_LEVELS = [(0, 0), (0, PAGE), (0, 8 * 2 ** 10), (0, 250 * 2 ** 10), (0, 2 * 2 ** 20), (1, 0), (1, PAGE), (1, 2 * PAGE),
               (1, 3 * PAGE), (1, 6 * PAGE), (1, 2 ** 20)]


@pytest.mark.parametrize("free", FREE_LEVELS,
                         ids=[f"{'checkpoint+' if checkpoints else ''}{extra // 1024}KB" for checkpoints, extra in FREE_LEVELS])
def test_a_full_disk_while_saving_an_epoch_is_one_line_and_keeps_every_file(
        small_disk: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture, free: tuple[int, int]) -> None:
    for entry in small_disk.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    argv = [str(data), *TINY, "--output", str(small_disk), "--experiment", "run"]
    assert train.main([*argv, "--epochs", "1"]) == 0
    folder = small_disk / "run"
    before = _snapshot(folder)
    checkpoint_size = (folder / "last.pth.tar").stat().st_size
    assert checkpoint_size > 2 * 2 ** 20  # the levels above cut into its write
    capsys.readouterr()
    free_bytes = free[0] * -(-checkpoint_size // PAGE) * PAGE + free[1]
    _fill_to(small_disk, free_bytes)
    status = train.main([*argv, "--epochs", "2", "--resume", "auto"])
    err = capsys.readouterr().err
    (small_disk / "ballast").unlink()
    after = _snapshot(folder)
    assert not [name for name in after if name.endswith(".tmp")], after
    for name, digest in before.items():
        assert name in after, name
        assert after[name] == digest or _complete(folder / name), name
    if status == 0:  # a picture that does not fit is a warning: the run goes on without it
        warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
        assert all(message.startswith(f"could not draw {folder / 'curves.png'}") and "\n" not in message
                   and "No space left on device" in message for message in warnings), warnings
        print(f"{free_bytes} bytes free: trained; {warnings or 'no warning'}")
        assert torch.load(folder / "last.pth.tar", weights_only=True)["epoch"] == 1
        return
    line = _one_disk_full_line(status, err)
    print(f"{free_bytes} bytes free: {line}")
    if line.startswith(f"error: cannot write to output folder {folder}: "):  # the lock file: nothing written
        assert after == before
        return
    written = Path(line.removeprefix("error: cannot write ").split(":")[0]).name
    assert f"the previous {written} is unchanged" in line, line
    assert after[written] == before[written]


@pytest.mark.parametrize("free", [4 * 2 ** 10, 250 * 2 ** 10])
def test_a_full_disk_in_the_first_epoch_does_not_claim_a_previous_file(
        small_disk: Path, data: Path, capsys: pytest.CaptureFixture[str], free: int) -> None:
    for entry in small_disk.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    _fill_to(small_disk, free)
    status = train.main([str(data), *TINY, "--epochs", "1", "--output", str(small_disk), "--experiment", "fresh"])
    line = _one_disk_full_line(status, capsys.readouterr().err)
    (small_disk / "ballast").unlink()
    assert "previous" not in line and ("no last.pth.tar was written" in line or "no args.yaml was written" in line)
    assert not [path.name for path in (small_disk / "fresh").iterdir() if path.name.endswith(".tmp")]


# --- ENOSPC injected into the writer ---------------------------------------------------------------------

class _FillsAfter:
    """A temporary file whose writes fail with ENOSPC once ``limit`` bytes are written, as a full disk does."""

    def __init__(self, handle: Any, limit: int) -> None:
        self._handle = handle
        self._left = limit

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        if len(view) > self._left:
            self._handle.write(view[: self._left])
            self._left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= len(view)
        return self._handle.write(view)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> _FillsAfter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()


def _state(epoch: int) -> dict[str, Any]:
    return {"epoch": epoch, "state_dict": {"w": torch.full((64, 1024), float(epoch))}, "metric": float(epoch),
            "optimizer": {"state": {}, "param_groups": []}}


WRITES = {
    "args.yaml": lambda folder, epoch: write_args_yaml(folder, {"epoch": epoch, "model": "m" * 300_000}),
    "summary.csv": lambda folder, epoch: append_summary(folder, {"epoch": epoch, **{f"c{i}": "x" * 100_000 for i in range(3)}}),
    "last.pth.tar": lambda folder, epoch: CheckpointSaver(folder, 2).save(_state(epoch), epoch, float(epoch)),
    "interrupted.pth.tar": lambda folder, epoch: write_interrupted(folder, _state(epoch)),
}


@pytest.mark.parametrize("limit", [0, 1, 64, 4096, 200_000])
@pytest.mark.parametrize("target", list(WRITES))
@pytest.mark.parametrize("previous", [True, False], ids=["over-a-file", "first-file"])
def test_enospc_at_any_byte_of_a_write_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str,
                                                   limit: int, previous: bool) -> None:
    if previous:
        WRITES[target](tmp_path, 0)
    before = _snapshot(tmp_path)
    real = tempfile.NamedTemporaryFile

    def filling(*args: Any, **kwargs: Any) -> _FillsAfter:
        return _FillsAfter(real(*args, **kwargs), limit)

    monkeypatch.setattr(saver.tempfile, "NamedTemporaryFile", filling)
    with pytest.raises(RunError) as caught:
        WRITES[target](tmp_path, 1)
    message = str(caught.value)
    assert "\n" not in message and f"cannot write {tmp_path / target}: No space left on device" in message
    if previous:
        assert message.endswith(f"the previous {target} is unchanged"), message
    else:
        assert message.endswith(f"no {target} was written"), message
    assert _snapshot(tmp_path) == before
