"""Atomic writes: every file and directory `fusion` writes appears whole or not at all.

A writer fills a temporary sibling (`<path>.tmp`, in the same directory so the rename stays on
one file system), then renames it over the target with `os.replace`. An exception mid-write
removes the temporary and leaves the old target as it was; a killed process leaves at most a
stale `.tmp`, which the next write of that path replaces. Checkpoints are written by Lightning,
which does the same (`lightning.fabric.utilities.cloud_io._atomic_save`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO]:
    """`open(path, mode)` for writing, but the file only replaces `path` once the block succeeds."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = path + ".tmp"
    try:
        with open(temporary, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


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

    An old `path` is moved aside first and removed last, so at every moment either the old or
    the new directory is whole (the old one under `<path>.old` during the swap).
    """
    path = os.path.normpath(path)
    temporary, old = path + ".tmp", path + ".old"
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(temporary, path)
    shutil.rmtree(old, ignore_errors=True)
