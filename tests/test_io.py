"""Atomic writes: an exception mid-write leaves the old file or directory whole and no temporary behind."""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
import re

import pytest

from fusion.utils.io import atomic_directory, atomic_write_json, atomic_write_text

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "fusion")


def test_failed_file_write_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "metrics.json")
    atomic_write_json(path, {"acc_mean": 0.5})
    # json.dump has written '{"acc_mean": 0.9, "bad": ' when it meets the object it cannot encode.
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic_write_json(path, {"acc_mean": 0.9, "bad": object()})
    assert json.loads(open(path).read()) == {"acc_mean": 0.5}
    assert os.listdir(tmp_path) == ["metrics.json"]
    atomic_write_text(path, "replaced\n")
    assert open(path).read() == "replaced\n" and os.listdir(tmp_path) == ["metrics.json"]


def test_failed_directory_write_keeps_the_old_directory(tmp_path):
    target = str(tmp_path / "export")
    with atomic_directory(target) as temporary:
        open(os.path.join(temporary, "model.safetensors"), "wb").write(b"old weights")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(target) as temporary:
            open(os.path.join(temporary, "model.safetensors"), "wb").write(b"half")
            raise RuntimeError("disk full")
    assert open(os.path.join(target, "model.safetensors"), "rb").read() == b"old weights"
    assert sorted(os.listdir(tmp_path)) == ["export"]
    # A successful write replaces the whole directory: nothing of the old one survives.
    with atomic_directory(target) as temporary:
        open(os.path.join(temporary, "config.json"), "w").write("{}")
    assert os.listdir(target) == ["config.json"] and sorted(os.listdir(tmp_path)) == ["export"]


WRITERS, WRITES = 4, 40


def _write_many(path: str, writer: int) -> None:
    """One process of the race: WRITES whole JSON documents (and as many directories) to one path each."""
    for n in range(WRITES):
        atomic_write_json(path, {"writer": writer, "write": n, "payload": [writer] * 2000})
        with atomic_directory(path + ".dir") as temporary:
            with open(os.path.join(temporary, "which.json"), "w") as f:
                json.dump({"writer": writer, "write": n}, f)


def test_concurrent_writers_of_one_path_never_collide(tmp_path):
    """4 processes write the same file and the same directory 40 times each, at once (as every
    distributed rank writes the same vocabulary map): no write fails, the file is one whole
    write, the directory holds one writer's file, and no temporary is left behind."""
    path = str(tmp_path / "vocab_map.json")
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_write_many, args=(path, writer)) for writer in range(WRITERS)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0] * WRITERS
    final = json.loads(open(path).read())
    assert final["write"] == WRITES - 1 and final["writer"] in range(WRITERS)  # each writer's last write is its 40th
    assert final == {"writer": final["writer"], "write": WRITES - 1, "payload": [final["writer"]] * 2000}
    assert os.listdir(path + ".dir") == ["which.json"]
    which = json.loads(open(os.path.join(path + ".dir", "which.json")).read())
    assert which["write"] == WRITES - 1 and which["writer"] in range(WRITERS)
    assert sorted(os.listdir(tmp_path)) == ["vocab_map.json", "vocab_map.json.dir"]


def test_written_files_get_the_usual_permissions(tmp_path):
    """The temporary is created like a plain open() would create the file (0o666 less the umask)."""
    umask = os.umask(0o022)
    try:
        atomic_write_text(str(tmp_path / "a.txt"), "x")
        with atomic_directory(str(tmp_path / "d")):
            pass
    finally:
        os.umask(umask)
    assert oct(os.stat(tmp_path / "a.txt").st_mode & 0o777) == oct(0o644)
    assert oct(os.stat(tmp_path / "d").st_mode & 0o777) == oct(0o755)


# A write that bypasses fusion.utils.io: open(..., "w"/"a"/"x"), Path.write_*, json.dump, torch.save, a hand-made rename.
PLAIN_WRITE = re.compile(r"""\bopen\(.*,\s*(mode=)?["'][wax]|\.write_(text|bytes)\(|json\.dump\(|torch\.save\(|os\.(replace|rename)\(""")


def test_every_write_in_the_package_is_atomic():
    """Audit: files are written only through fusion.utils.io (models via save_pretrained inside atomic_directory)."""
    offenders = []
    for path in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True):
        if os.path.basename(path) == "io.py":
            continue
        for number, line in enumerate(open(path), 1):
            if PLAIN_WRITE.search(line):
                offenders.append(f"{os.path.relpath(path, PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "write through fusion.utils.io (atomic_open, atomic_write_json, atomic_directory):\n" + "\n".join(offenders)
    assert len(glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)) > 10  # the audit read the package
