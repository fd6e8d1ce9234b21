"""One owner per run folder: an advisory lock file that the primary rank holds for the life of a run.

The lock is the file ``.run.lock`` in the run folder, created atomically with ``O_CREAT | O_EXCL`` (which
holds on NFS v3 and later and on other shared file systems where ``flock`` may not) before the run writes
anything there. It holds one JSON object: host, pid, the pid's start time (from /proc, where present, so
that a recycled pid is not taken for the owner), the wall-clock start time and torchrun's run id
(``TORCHELASTIC_RUN_ID``; None outside torchrun).

A second run that finds the lock is refused (`UsageError`, one line naming the owner), with three
exceptions:

- the lock carries this process's torchrun run id (not torchrun's default ``none``): a restart of the
  same job, whose rank 0 may have been killed; it takes the lock over with an info line;
- the owner ran on this host and its process is gone: the lock is stale and taken over with one warning;
- the lock file is still empty after a moment: its creator was killed between creating and writing it (a live
  creator writes at once); taken over with one warning;
- ``break_lock`` (train.py --break-lock): the lock is broken whoever holds it, with a warning naming the
  owner. A lock written on another host is never broken otherwise, since its pid cannot be checked here.

`take_run_lock` takes the lock and remembers it; `release_run_lock` removes it (train.py calls it when a run
ends, cleanly, with an error or on a stop signal). While the lock is held, SIGTERM and SIGUSR1 whose action
is the default end the process through `SystemExit` (status 128 + signal), so that the lock is removed
on them too; the training loop's own graceful-stop handlers (`vig.trainer.signals`) take over inside it.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vig.errors import UsageError
from vig.trainer.saver import output_folder_error

_LOGGER = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
RUN_ID_ENV = "TORCHELASTIC_RUN_ID"
# torchrun's run id when none is given: shared by unrelated jobs, so it proves nothing
_ANONYMOUS_RUN_IDS = (None, "", "none")
# a takeover in progress is guarded by this second file, which names its process like the lock: one whose process
# is gone (this host), that stayed empty (see below) or older than this (another host) is left from a killed process
_TAKEOVER_SUFFIX = ".takeover"
_TAKEOVER_STALE_S = 30.0
# a lock file that is still empty (its creator has not yet written it) is re-read for this long
_EMPTY_WAIT_S = 2.0


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (/proc/PID/stat field 22); None without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` of this host exists and, when its recorded start time is known, is that process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now_start = _process_start(pid)
    return start is None or now_start is None or now_start == start


@dataclass
class _Owner:
    """What a lock file says about the run that holds it."""

    host: str
    pid: int
    start: str | None
    started: str
    run_id: str | None

    def describe(self) -> str:
        run_id = f", torchrun run id {self.run_id}" if self.run_id else ""
        return f"pid {self.pid} on host {self.host} (started {self.started}{run_id})"

    @classmethod
    def of_this_process(cls) -> _Owner:
        return cls(host=socket.gethostname(), pid=os.getpid(), start=_process_start(os.getpid()),
                   started=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                   run_id=os.environ.get(RUN_ID_ENV))

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, text: bytes) -> _Owner | None:
        try:
            data: Any = json.loads(text.decode("utf-8"))
            return cls(host=str(data["host"]), pid=int(data["pid"]), start=data.get("start"),
                       started=str(data.get("started", "?")), run_id=data.get("run_id"))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


@dataclass
class _Held:
    path: Path
    content: bytes
    handlers: dict[int, Any]


_held: _Held | None = None


def _create(path: Path, owner: _Owner) -> bytes | None:
    """Create the lock file holding ``owner``; its content, or None when the file exists already.

    Raises:
        OSError: the folder refused the file (permissions, full disk); nothing is left behind.
    """
    content = owner.to_json()
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    try:
        os.write(descriptor, content)
        os.fsync(descriptor)
    except OSError:
        os.close(descriptor)
        path.unlink(missing_ok=True)
        raise
    os.close(descriptor)
    return content


def _read(path: Path) -> bytes | None:
    """The lock file's content (waiting a moment while it is empty: just created); None once it is gone."""
    deadline = time.monotonic() + _EMPTY_WAIT_S
    while True:
        try:
            content = path.read_bytes()
        except FileNotFoundError:
            return None
        if content or time.monotonic() > deadline:
            return content
        time.sleep(0.05)


def _left_by_a_killed_process(guard: Path, me: _Owner) -> bool:
    """Whether the takeover guard ``guard`` was left by a process killed during its takeover: the process it names
    ran on this host and is gone, or it stayed empty for `_EMPTY_WAIT_S`, or it is older than `_TAKEOVER_STALE_S`."""
    try:
        content = guard.read_bytes()
        age = time.time() - guard.stat().st_mtime
    except FileNotFoundError:
        return False
    owner = _Owner.from_json(content) if content else None
    if owner is not None and owner.host == me.host:
        return not _alive(owner.pid, owner.start)
    return age > (_EMPTY_WAIT_S if not content else _TAKEOVER_STALE_S)


def _take_over(path: Path, stale: bytes, owner: _Owner) -> bytes | None:
    """Replace the lock file, if it still holds ``stale``, by one holding ``owner``; None when another process
    changed it meanwhile. One takeover at a time: a second file, created exclusively and naming ``owner``,
    guards it; one left by a killed process is removed (the caller tries again)."""
    guard = path.with_name(path.name + _TAKEOVER_SUFFIX)
    if _create(guard, owner) is None:
        if _left_by_a_killed_process(guard, owner):
            guard.unlink(missing_ok=True)
        return None
    try:
        if _read(path) != stale:
            return None
        path.unlink(missing_ok=True)
        return _create(path, owner)
    finally:
        guard.unlink(missing_ok=True)


def _end_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def take_run_lock(folder: Path, break_lock: bool = False) -> None:
    """Make this process the owner of run folder ``folder`` until `release_run_lock` (see the module docstring).

    Raises:
        UsageError: another live run holds the folder (one line naming it and the ways out), or the folder
            refused the lock file (RunError for a full disk, see `vig.trainer.saver.output_folder_error`).
    """
    global _held
    path = folder / LOCK_NAME
    me = _Owner.of_this_process()
    for _ in range(50):
        try:
            content = _create(path, me)
        except OSError as err:
            raise output_folder_error(folder, err) from None
        if content is not None:
            break
        found = _read(path)
        if found is None:  # released meanwhile: try again
            continue
        other = _Owner.from_json(found)
        if other is not None and other.host == me.host and other.pid == me.pid:
            content = found  # this process holds it already
            break
        if other is not None and other.run_id not in _ANONYMOUS_RUN_IDS and other.run_id == me.run_id:
            reason = None
            _LOGGER.info("run folder %s: taking over the lock of %s, an earlier start of this torchrun job", folder,
                         other.describe())
        elif other is not None and other.host == me.host and not _alive(other.pid, other.start):
            reason = f"its owner, {other.describe()}, is gone"
        elif not found:  # still empty after _read's wait: its creator was killed before writing it
            reason = "it is empty, left by a process killed while creating it"
        elif break_lock:
            reason = f"--break-lock ({other.describe() if other else 'unreadable lock file'})"
        else:
            owner = other.describe() if other is not None else "an unreadable lock file"
            hint = ("if that run is gone, --break-lock takes the folder over" if other is None or other.host != me.host
                    else "wait for it to end or choose another --experiment (or --output)")
            raise UsageError(f"run folder {folder} is in use by another run: {owner} holds {path}; {hint}")
        content = _take_over(path, found, me)
        if content is not None:
            if reason is not None:
                _LOGGER.warning("run folder %s: lock taken over, %s", folder, reason)
            break
        time.sleep(0.1)  # another process is taking over, or a killed one's guard was just removed
    else:
        raise UsageError(f"run folder {folder}: could not take {path}, other processes keep changing it")
    handlers = {}
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        try:
            if signal.getsignal(signum) is signal.SIG_DFL:
                handlers[signum] = signal.signal(signum, _end_on_signal)
        except ValueError:  # not the main thread
            break
    _held = _Held(path, content, handlers)


def release_run_lock() -> None:
    """Remove the lock this process holds (if it still holds it; a takeover by another run is left alone)."""
    global _held
    held, _held = _held, None
    if held is None:
        return
    for signum, handler in held.handlers.items():
        try:
            signal.signal(signum, handler)
        except ValueError:
            pass
    try:
        if held.path.read_bytes() == held.content:
            held.path.unlink()
    except OSError as err:
        _LOGGER.warning("could not remove the run folder lock %s: %s", held.path, err.strerror or err)
