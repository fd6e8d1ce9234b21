"""Run output folder: args.yaml, summary.csv and checkpoints with a best-k history.

Layout (timm's checkpoint saver): `last.pth.tar` every epoch, `model_best.pth.tar` for the best
metric, `checkpoint-<epoch>.pth.tar` for the best `max_history` epochs. Every file is written
atomically (temporary file in the same folder, flush + fsync, os.replace, fsync of the folder), so a
process killed at any instant leaves the previous complete file in place, and a full disk stops the
run with one line (`RunError`) instead of a truncated file. Weights that are not finite are never
written. Only the primary rank should call the writers.

An epoch is recorded in this order: last.pth.tar (which carries the epoch's summary row), the history
links (checkpoint-<epoch>, model_best), summary.csv, curves.png. A restarted run (`CheckpointSaver`)
repairs whatever a kill between those steps left: it relinks the history from last.pth.tar, prunes it
to `max_history`, and `repair_summary` puts back a missing row. A run stopped by a signal in mid-epoch
leaves interrupted.pth.tar next to them (see `vig.trainer.resume`).
"""
from __future__ import annotations

import csv
import errno
import io
import logging
import os
import re
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import torch
import yaml

from vig.errors import RunError, UsageError
from vig.trainer.faults import fault_point

_LOGGER = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)\.pth\.tar$")
LAST_NAME = "last.pth.tar"
BEST_NAME = "model_best.pth.tar"
SUMMARY_NAME = "summary.csv"
ARGS_NAME = "args.yaml"
CURVES_NAME = "curves.png"
INTERRUPTED_NAME = "interrupted.pth.tar"
# what an epoch of a run leaves in its folder (args.yaml alone is written before the first epoch)
RESULT_NAMES = (SUMMARY_NAME, LAST_NAME, BEST_NAME, CURVES_NAME)
# temporary files of atomic_write / atomic_duplicate that a killed process left behind
STALE_TEMPORARY_PATTERN = re.compile(
    r"^\.(last\.pth\.tar|model_best\.pth\.tar|checkpoint-\d+\.pth\.tar|interrupted\.pth\.tar|summary\.csv|"
    r"args\.yaml|curves\.png)\..+\.tmp$")


def _default_file_mode() -> int:
    """Permissions an ordinary new file gets under the current umask (temporary files start at 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _sync_folder(folder: Path) -> None:
    """fsync a folder so that a rename in it survives a power cut (not supported everywhere: then skipped)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError as err:
        _LOGGER.debug("fsync of folder %s not supported: %s", folder, err)
    finally:
        os.close(descriptor)


def _os_error_of(error: BaseException) -> OSError | None:
    """The OSError behind ``error``: itself, or one in its chain of causes / contexts. torch.save's zip writer
    answers a failed write (ENOSPC) with a RuntimeError ("unexpected pos ...") when it is closed, which hides
    the OSError in its ``__context__``."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` through `write(handle)` into a temporary sibling file, then rename it into place.

    Raises:
        RunError: the file system refused (full disk, quota, permissions) at any byte; `path` is unchanged
            (the message says whether there was a previous file) and no temporary file is left.
    """
    existed = path.exists()
    kept = f"the previous {path.name} is unchanged" if existed else f"no {path.name} was written"
    try:
        handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    except OSError as err:
        raise RunError(f"cannot write {path}: {err.strerror or err}; {kept}") from None
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, _default_file_mode())
        os.replace(handle.name, path)
    except BaseException as err:
        Path(handle.name).unlink(missing_ok=True)
        cause = _os_error_of(err) if isinstance(err, Exception) else None
        if cause is None:
            raise
        raise RunError(f"cannot write {path}: {cause.strerror or cause}; {kept}") from None
    _sync_folder(path.parent)


def atomic_duplicate(source: Path, target: Path) -> None:
    """Make `target` a hard link to `source` (a copy where links are not supported), atomically.

    Later epochs replace `source` by a new file, so the duplicate keeps this epoch's content.
    """
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        with open(source, "rb") as src:
            atomic_write(target, lambda dst: shutil.copyfileobj(src, dst))
        return
    os.replace(temporary, target)
    _sync_folder(target.parent)


def non_finite_entries(state_dict: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or infinity."""
    return [name for name, value in state_dict.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())]


def run_folder_name(model_name: str, img_size: int) -> str:
    """Dated run name as timm writes it: YYYYmmdd-HHMMSS-<model>-<img size>."""
    safe_model = re.sub(r"[^\w\-.]", "_", model_name)
    return f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{safe_model}-{img_size}"


def prepare_output_dir(output: str, experiment: str) -> Path:
    """Create output/experiment (reusing it if present) and check that files can be written there."""
    folder = Path(output or "output/train") / experiment
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe", delete=True)
        probe.close()
    except OSError as err:
        raise output_folder_error(folder, err) from None
    summary_rows(folder)
    return folder


def output_folder_error(folder: Path, err: OSError) -> UsageError | RunError:
    """The one-line error of an output folder that refused a file: RunError (exit status 1) for a full disk or
    quota, which is no mistake of the command line; UsageError (2) otherwise (permissions, not a folder)."""
    message = f"cannot write to output folder {folder}: {err.strerror or err}"
    return RunError(message) if err.errno in (errno.ENOSPC, errno.EDQUOT) else UsageError(message)


def run_files(folder: Path) -> list[str]:
    """Names of the files of a train.py run in ``folder``: results (see `RESULT_NAMES`), checkpoint-<epoch>
    files and args.yaml, sorted."""
    return sorted(entry.name for entry in folder.iterdir()
                  if entry.name in (*RESULT_NAMES, ARGS_NAME, INTERRUPTED_NAME) or CHECKPOINT_PATTERN.match(entry.name))


def require_fresh_or_resumable(folder: Path, resume: str) -> None:
    """Refuse to start a run in a folder that another run has written to, unless this run resumes.

    Without --resume, any file of a run (args.yaml, summary.csv, checkpoints, curves.png) stops the
    run before training: its model_best / checkpoint-<epoch> files would otherwise outlive the new
    run's. ``--resume auto`` without last.pth.tar (a run killed or stopped in its first epoch, before
    its first checkpoint was complete) starts afresh, and its epoch 0 replaces whatever row or curve
    the killed run had written; only a folder whose model_best / checkpoint-<epoch> files outlived a
    removed last.pth.tar is refused. An explicit ``--resume PATH`` continues
    that checkpoint's run here. Nothing is ever deleted here.

    Raises:
        UsageError: one line naming the folder, what it holds, and the two ways out.
    """
    found = run_files(folder)
    ways_out = (f"resume it (--resume auto, or --resume {folder / LAST_NAME}) or choose another --experiment "
                "(or --output)")
    if not resume and found:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise UsageError(f"run folder {folder} already holds another run ({shown}); {ways_out}")
    if resume == "auto" and not (folder / LAST_NAME).exists():
        linked = [name for name in found if name == BEST_NAME or CHECKPOINT_PATTERN.match(name)]
        if linked:  # only ever linked from a last.pth.tar, which someone has removed since
            raise UsageError(f"--resume auto: run folder {folder} holds results ({', '.join(linked[:4])}) but no "
                             f"{LAST_NAME} to resume from; resume one of them with --resume PATH or choose another "
                             "--experiment (or --output)")


class SummaryError(ValueError):
    """A summary.csv that cannot be read as one (the message is one line naming the file)."""


def read_summary_rows(path: Path, required: Sequence[str] = ("epoch",)) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of a summary.csv, the one reader of these files (the trainer and the curves use it).

    Header names and row keys are stripped of spaces; every ``epoch`` cell must be an integer.

    Raises:
        SummaryError: the file is missing, not UTF-8 CSV, lacks a ``required`` column, or has an epoch
            that is not an integer.
    """
    if not path.is_file():
        raise SummaryError(f"summary file not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in (reader.fieldnames or [])]
            rows = [{(key or "").strip(): value or "" for key, value in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SummaryError(f"{path}: not a readable CSV file ({type(err).__name__})") from None
    missing = [name for name in required if name not in header]
    if missing:
        raise SummaryError(f"{path}: missing required column(s) {', '.join(missing)} "
                           f"(has: {', '.join(header) or 'nothing'})")
    for line, row in enumerate(rows, start=2):
        try:
            int(row["epoch"])
        except (KeyError, ValueError):
            raise SummaryError(f"{path}:{line}: epoch {row.get('epoch')!r} is not an integer") from None
    return header, rows


def summary_rows(folder: Path) -> list[dict[str, str]]:
    """The rows of folder/summary.csv ([] when absent); UsageError when the file is not train.py's summary."""
    path = folder / SUMMARY_NAME
    if not path.exists():
        return []
    try:
        return read_summary_rows(path)[1]
    except SummaryError as err:
        raise UsageError(f"{path} is not a summary.csv of train.py ({err}); move it away or choose another "
                         "--experiment") from None


def repair_summary(folder: Path, last_epoch: int, row: dict[str, Any] | None) -> None:
    """Make summary.csv end at `last_epoch`, the epoch of last.pth.tar: drop later rows (a run killed before its
    first checkpoint, or one restarted from an older one) and put back the row of `last_epoch` from the
    checkpoint when a kill came between the checkpoint and the summary (``row``: None for checkpoints that
    do not carry it)."""
    rows = summary_rows(folder)
    kept = [old for old in rows if int(old["epoch"]) <= last_epoch]
    has_last = any(int(old["epoch"]) == last_epoch for old in kept)
    if len(kept) == len(rows) and (has_last or row is None):
        return
    if not has_last and row is not None:
        _LOGGER.warning("summary.csv lacks epoch %d of %s (the run was killed before writing it): row restored",
                        last_epoch, LAST_NAME)
        append_summary(folder, row)
        return
    _LOGGER.warning("summary.csv has rows after epoch %d of %s: dropped, they are trained again", last_epoch,
                    LAST_NAME)
    _write_rows(folder / SUMMARY_NAME, kept)


def write_args_yaml(folder: Path, args: dict[str, Any]) -> None:
    """args.yaml: every resolved flag (not -c itself, the launcher's --local-rank nor the one-off --break-lock),
    loadable with `-c`."""
    kept = {key: value for key, value in args.items() if key not in ("config", "local_rank", "break_lock")}
    text = yaml.safe_dump(kept, default_flow_style=False, sort_keys=True)
    atomic_write(folder / ARGS_NAME, lambda handle: handle.write(text.encode("utf-8")))


def append_summary(folder: Path, row: dict[str, Any]) -> None:
    """Add one epoch row to summary.csv (rewritten atomically; a resumed epoch replaces its old row)."""
    path = folder / SUMMARY_NAME
    rows: list[dict[str, Any]] = [old for old in summary_rows(folder) if int(old["epoch"]) < int(row["epoch"])]
    rows.append(row)
    _write_rows(path, rows)


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """summary.csv with these rows (the newest row's columns first), atomically; an empty list deletes it."""
    if not rows:
        path.unlink(missing_ok=True)
        return
    fieldnames = list(rows[-1])
    for old in rows:
        fieldnames += [key for key in old if key not in fieldnames]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue().encode("utf-8")))


class CheckpointSaver:
    """Saves last / best / best-k epoch checkpoints of one run folder (higher metric is better, lower with
    ``decreasing``, e.g. --eval-metric loss)."""

    def __init__(self, folder: Path, max_history: int, decreasing: bool = False) -> None:
        self.folder = folder
        self.max_history = max_history
        self.decreasing = decreasing
        self.history: list[tuple[int, float]] = []  # (epoch, metric), best first
        self.best: tuple[int, float] | None = None
        self._remove_stale_temporaries()
        self._restore()

    def _remove_stale_temporaries(self) -> None:
        """Delete half-written temporary files of a process that was killed while writing."""
        for path in self.folder.iterdir():
            if STALE_TEMPORARY_PATTERN.match(path.name):
                _LOGGER.warning("removing %s, left behind by an interrupted write", path)
                path.unlink(missing_ok=True)

    @staticmethod
    def _epoch_and_metric(path: Path) -> tuple[int, float] | None:
        """(epoch, metric) of a checkpoint in the folder; None (with a warning) when it cannot be read."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return int(state["epoch"]), float(state["metric"])
        except Exception as err:  # a foreign or damaged file in the run folder: leave it alone, do not count it
            _LOGGER.warning("ignoring %s in the checkpoint history: unreadable (%s)", path, type(err).__name__)
            return None

    def _restore(self) -> None:
        """Rebuild history and best from checkpoints already in the folder (resumed runs)."""
        for path in self.folder.iterdir():
            match = CHECKPOINT_PATTERN.match(path.name)
            if match:
                found = self._epoch_and_metric(path)
                if found is not None:
                    self.history.append((int(match.group(1)), found[1]))
        self.history.sort(key=lambda item: item[1], reverse=not self.decreasing)
        best_path = self.folder / BEST_NAME
        if best_path.exists():
            self.best = self._epoch_and_metric(best_path)
        last = self.folder / LAST_NAME
        found = self._epoch_and_metric(last) if last.exists() else None
        if found is not None:
            self._link_history(*found, repair=True)

    def _link_history(self, epoch: int, metric: float, repair: bool = False) -> None:
        """Link last.pth.tar (of `epoch`, `metric`) as checkpoint-<epoch> and model_best where it earns it, then
        prune the history to `max_history`. With `repair` (a restart) only what a kill left undone is done."""
        last = self.folder / LAST_NAME
        kept = [item for item in self.history if item[0] != epoch]
        linked = len(kept) < len(self.history)
        worst = kept[-1][1] if len(kept) >= self.max_history else None
        if (worst is None or self._better(metric, worst)) and not (repair and linked):
            if repair:
                _LOGGER.warning("linking %s as checkpoint-%d.pth.tar: the run was killed before it", last, epoch)
            atomic_duplicate(last, self.folder / f"checkpoint-{epoch}.pth.tar")
            kept.append((epoch, metric))
            kept.sort(key=lambda item: item[1], reverse=not self.decreasing)
            fault_point("after-checkpoint", epoch)
        elif linked:
            kept.append((epoch, metric))
            kept.sort(key=lambda item: item[1], reverse=not self.decreasing)
        for old_epoch, _ in kept[self.max_history:]:
            (self.folder / f"checkpoint-{old_epoch}.pth.tar").unlink(missing_ok=True)
        self.history = kept[: self.max_history]
        if self.best is None or self._better(metric, self.best[1]):
            if repair:
                _LOGGER.warning("%s was behind %s (epoch %d, metric %.4g): the run was killed before linking it; "
                                "relinked", self.folder / BEST_NAME, last, epoch, metric)
            atomic_duplicate(last, self.folder / BEST_NAME)
            self.best = (epoch, metric)
            fault_point("after-best", epoch)

    def _better(self, metric: float, other: float) -> bool:
        return metric < other if self.decreasing else metric > other

    def save(self, state: dict[str, Any], epoch: int, metric: float) -> tuple[int, float]:
        """Write last.pth.tar, and checkpoint-<epoch> / model_best when `metric` earns it; returns the best.

        The new file is complete (renamed into place) before any older history file is pruned.

        Raises:
            RunError: the weights (`state_dict` / `state_dict_ema`) are not finite (nothing is written),
                or the disk refused the write (the previous files are unchanged).
        """
        last = self.folder / LAST_NAME
        broken = [f"{key}.{name}" for key in ("state_dict", "state_dict_ema") if state.get(key) is not None
                  for name in non_finite_entries(state[key])]
        if broken:
            raise RunError(f"epoch {epoch}: weights are not finite ({', '.join(broken[:3])}"
                           f"{f' and {len(broken) - 3} more' if len(broken) > 3 else ''}); nothing written, "
                           f"{last} keeps the previous epoch")
        atomic_write(last, lambda handle: torch.save(state, handle))
        fault_point("after-last", epoch)
        self.history = [item for item in self.history if item[0] != epoch]
        self._link_history(epoch, metric)
        return self.best
