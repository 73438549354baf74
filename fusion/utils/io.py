"""Atomic writes: every file and directory `fusion` writes appears whole or not at all.

A writer fills a temporary sibling with a name of its own (`<name>.<random>.tmp`, in the same
directory so the rename stays on one file system), flushes it to disk, then renames it over the
target with `os.replace`. Several processes may write the same path at once (every distributed
rank builds the same vocabulary map): each fills its own temporary, and the path ends up holding
one of the writes, whole. An exception mid-write removes the temporary and leaves the old target
as it was; a killed process can leave a stale `<name>.<random>.tmp`, which no reader takes for the
target. Checkpoints are written by Lightning, which does the same
(`lightning.fabric.utilities.cloud_io._atomic_save`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from typing import IO, Any


def _sibling(path: str, suffix: str) -> str:
    """A fresh name beside `path`: `<name>.<8 random hex digits><suffix>` (nothing is created)."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f"{name}.{secrets.token_hex(4)}{suffix}")


def _create_sibling_file(path: str) -> tuple[int, str]:
    """A new, empty temporary file beside `path`, opened for writing, and its name.

    Created with O_EXCL (never another writer's file) and mode 0o666 less the umask, so the file
    that replaces `path` has the permissions a plain `open(path, "w")` gives (mkstemp's are 0o600).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temporary = _sibling(path, ".tmp")
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:
            continue


def _sync_directory(directory: str) -> None:
    """Flush a directory's entries (the rename) to disk, where the platform allows it."""
    try:
        descriptor = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO]:
    """`open(path, mode)` for writing, but the file only replaces `path` once the block succeeds."""
    if "w" not in mode:
        raise ValueError(f"atomic_open writes a whole new file: mode must contain 'w', got {mode!r}")
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    descriptor, temporary = _create_sibling_file(path)
    try:
        with os.fdopen(descriptor, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    _sync_directory(directory)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def atomic_write_json(path: str, data: Any) -> None:
    with atomic_open(path) as f:
        json.dump(data, f, indent=2)
        f.write("\n")


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yields an empty temporary directory to fill; on success it becomes `path`.

    An old `path` is moved aside first (to `<name>.<random>.old`) and removed last, so at every
    moment the old or the new directory is whole, under `path` or beside it. When several
    processes write the same directory at once, each fills its own temporary and the last to
    finish wins.
    """
    path = os.path.normpath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    while True:
        temporary = _sibling(path, ".tmp")
        try:
            os.mkdir(temporary)  # 0o777 less the umask, like os.makedirs
            break
        except FileExistsError:
            continue
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    aside = []
    while True:  # another writer may put its directory in place between our two renames: retry
        old = _sibling(path, ".old")
        try:
            os.rename(path, old)
            aside.append(old)
        except FileNotFoundError:
            pass
        try:
            os.rename(temporary, path)
            break
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                if aside:  # put the old directory back under its name
                    with contextlib.suppress(OSError):
                        os.rename(aside.pop(), path)
                shutil.rmtree(temporary, ignore_errors=True)
                raise
    for old in aside:
        shutil.rmtree(old, ignore_errors=True)
    _sync_directory(parent)
