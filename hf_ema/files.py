"""Durable writes: every file and folder hf-ema writes goes through here.

A file is written under a temporary name in its folder, flushed to disk (fsync), renamed into place and its folder
fsynced; a folder is filled under a temporary name, every file in it fsynced, then renamed into place. A crash at any
point leaves the previous file or folder (or none), never a half-written one under the final name. Readers never look
at the temporary names (`.<name>.*.tmp`, `.<name>.tmp`).

Test-only fault injection (the crash tests): `HF_EMA_CRASH_AT="<what>:<stage>[:<n>]"` in the environment kills the
process with SIGKILL at the n-th (default: first) write of `what` (`sidecar`, `sharded`, `snapshot`, `export`,
`pretrained`, `average`) when it reaches `stage`: `before` (nothing written yet), `inside` (the temporary file or
folder complete and fsynced, not yet renamed) or `after` (renamed and durable). Unset, a write pays one comparison.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections import Counter
from collections.abc import Iterator

CRASH_ENV = "HF_EMA_CRASH_AT"
STAGES = ("before", "inside", "after")

_reached: Counter[tuple[str, str]] = Counter()


def crash_point(what: str, stage: str) -> None:
    """Kills this process (SIGKILL, no cleanup) when `HF_EMA_CRASH_AT` names this write and stage (test-only)."""
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    name, _, rest = wanted.partition(":")
    at, _, count = rest.partition(":")
    if (name, at) != (what, stage):
        return
    _reached[(what, stage)] += 1
    if _reached[(what, stage)] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(directory: str) -> None:
    """Makes a rename in `directory` durable (a no-op where the filesystem cannot fsync a folder)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _fsync_file(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, what: str) -> Iterator[str]:
    """Context manager: yields a temporary path beside `path` to write; on leaving, fsyncs it, renames it to `path`
    and fsyncs the folder. An exception removes the temporary file and leaves `path` as it was."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    crash_point(what, "before")
    os.makedirs(directory, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield temp
        _fsync_file(temp)
        crash_point(what, "inside")
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
    fsync_dir(directory)
    crash_point(what, "after")


def temporary_folder_path(path: str | os.PathLike) -> str:
    """The name of the temporary folder `finish_folder` renames to `path` (`.<name>.tmp` beside it)."""
    path = os.path.abspath(os.fspath(path))
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")


def temporary_folder(path: str | os.PathLike) -> str:
    """Creates (empty) and returns `temporary_folder_path(path)`; one left by a crash is removed first."""
    temp = temporary_folder_path(path)
    shutil.rmtree(temp, ignore_errors=True)
    os.makedirs(temp)
    return temp


def finish_folder(temp: str, path: str | os.PathLike, what: str) -> None:
    """fsyncs every file and folder under `temp`, then renames it to `path`, replacing a folder there (set aside as
    `.<name>.old` for the moment between the two renames, then removed)."""
    path = os.path.abspath(os.fspath(path))
    for root, _, names in os.walk(temp):
        for name in names:
            _fsync_file(os.path.join(root, name))
        fsync_dir(root)
    crash_point(what, "inside")
    parent = os.path.dirname(path)
    if os.path.exists(path):
        old = os.path.join(parent, f".{os.path.basename(path)}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(temp, path)
        shutil.rmtree(old)
    else:
        os.replace(temp, path)
    fsync_dir(parent)
    crash_point(what, "after")


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, what: str) -> Iterator[str]:
    """Context manager: yields a temporary folder beside `path` to fill; on leaving, makes it durable and renames it
    to `path` (`finish_folder`). An exception removes the temporary folder and leaves `path` as it was."""
    crash_point(what, "before")
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    temp = temporary_folder(path)
    try:
        yield temp
        finish_folder(temp, path, what)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
