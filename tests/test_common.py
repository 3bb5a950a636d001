"""Atomic writes (all or nothing, no debris, normal permissions; symlinks followed, FIFOs and devices written
in place, a failed close commits nothing) and the device/dtype choice.

    venv/bin/python -m pytest tests/test_common.py -q
"""

from __future__ import annotations

import errno
import os
import stat
import threading

import pytest
import torch
from conftest import FullAtClose

from hydra import common
from hydra.common import atomic_write, choose_dtype
from hydra.models.checkpoint import save_safetensors


def test_atomic_write_is_all_or_nothing(tmp_path):
    target = tmp_path / "c.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write("half")
        raise RuntimeError("crash in the middle")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["c.txt"]
    with atomic_write(target) as f:
        f.write("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["c.txt"]


def test_atomic_write_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "new.txt") as f:
            f.write("x")
        assert stat.S_IMODE(os.stat(tmp_path / "new.txt").st_mode) == 0o644  # not mkstemp's 0600
        (tmp_path / "shared.txt").write_text("y")
        os.chmod(tmp_path / "shared.txt", 0o664)
        with atomic_write(tmp_path / "shared.txt") as f:
            f.write("z")
        assert stat.S_IMODE(os.stat(tmp_path / "shared.txt").st_mode) == 0o664  # the replaced file's mode
    finally:
        os.umask(umask)


def test_a_symlink_is_followed_not_replaced(tmp_path):
    real = tmp_path / "real" / "c.txt"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "c.txt"
    link.symlink_to(real)
    with atomic_write(link) as f:
        f.write("new")
    assert link.is_symlink() and real.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["c.txt", "real"] and os.listdir(real.parent) == ["c.txt"]
    dangling = tmp_path / "d.txt"
    dangling.symlink_to(tmp_path / "real" / "later.txt")
    with atomic_write(dangling) as f:
        f.write("created")
    assert dangling.is_symlink() and (real.parent / "later.txt").read_text() == "created"


def test_a_fifo_is_written_in_place(tmp_path):
    fifo = tmp_path / "out.csv"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    with atomic_write(fifo) as f:
        f.write("a,b\n")
    reader.join(10)
    assert got == ["a,b\n"] and stat.S_ISFIFO(os.stat(fifo).st_mode) and os.listdir(tmp_path) == ["out.csv"]


def test_save_safetensors_into_a_fifo(tmp_path):
    # a FIFO stands in for a device here: a regression must not replace a real /dev node on the test machine
    fifo = tmp_path / "ext.safetensors"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    save_safetensors(fifo, {"t": torch.arange(3.0)}, {"k": "v"})
    reader.join(10)
    from safetensors.torch import load

    assert torch.equal(load(got[0])["t"], torch.arange(3.0)) and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert os.listdir(tmp_path) == ["ext.safetensors"]


def test_a_write_error_at_close_commits_nothing(tmp_path, monkeypatch):
    target = tmp_path / "c.txt"
    target.write_text("old")
    fdopen = os.fdopen

    monkeypatch.setattr(common.os, "fdopen", lambda *a, **kw: FullAtClose(fdopen(*a, **kw)))
    with pytest.raises(OSError, match="No space"), atomic_write(target) as f:
        f.write("new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["c.txt"]


def test_dtype_choice_says_why():
    assert choose_dtype("cuda") == (torch.bfloat16, "bf16 (accelerator, as the original)")
    assert choose_dtype("cpu", "fp32") == (torch.float32, "fp32 (requested)")
    dtype, reason = choose_dtype("cpu")
    assert dtype in (torch.bfloat16, torch.float32) and reason.startswith(("bf16", "fp32"))
    with pytest.raises(ValueError, match="choose one of auto"):
        choose_dtype("cpu", "int8")


# ---- issue 15: every failure path removes its temporary file; a folder is refused before anything is made


def test_a_folder_at_the_target_is_refused_up_front(tmp_path):
    target = tmp_path / "a.txt"
    target.mkdir()
    (target / "inside").write_text("kept")
    with pytest.raises(IsADirectoryError) as e, atomic_write(target) as f:
        f.write("never")
    assert e.value.filename == str(target) and "Traceback" not in str(e.value)
    assert os.listdir(tmp_path) == ["a.txt"] and os.listdir(target) == ["inside"]  # no temporary made
    with pytest.raises(IsADirectoryError):
        save_safetensors(target, {"t": torch.zeros(2)}, {})
    assert os.listdir(tmp_path) == ["a.txt"]


def test_temp_beside_never_takes_a_folders_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        folder = tmp_path / "x.txt"
        folder.mkdir(mode=0o700)
        fd, tmp = common.temp_beside(folder)
        os.close(fd)
        assert stat.S_IMODE(os.stat(tmp).st_mode) == 0o644  # a new file's mode, not the folder's 0700
    finally:
        os.umask(umask)


def test_a_failed_rename_removes_the_temporary_and_names_the_target(tmp_path, monkeypatch):
    target = tmp_path / "c.txt"
    target.write_text("old")

    def fail(src, dst):
        raise OSError(errno.EIO, "Input/output error", src)  # names the temporary, as the OS does

    monkeypatch.setattr(common.os, "replace", fail)
    with pytest.raises(OSError) as e, atomic_write(target) as f:
        f.write("new")
    assert e.value.filename == str(target)  # the user's file, not `.c.txt.XXXX.tmp`
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["c.txt"]


def test_a_missing_folder_names_the_file_not_the_temporary(tmp_path):
    with pytest.raises(FileNotFoundError) as e, atomic_write(tmp_path / "no" / "c.txt") as f:
        f.write("x")
    assert e.value.filename == str(tmp_path / "no" / "c.txt")


def test_a_failure_to_open_the_temporary_removes_it(tmp_path):
    with pytest.raises(LookupError), atomic_write(tmp_path / "c.txt", encoding="no-such-codec") as f:
        f.write("x")
    assert os.listdir(tmp_path) == []


def test_safetensors_get_a_normal_files_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        save_safetensors(tmp_path / "new.safetensors", {"t": torch.zeros(2)}, {})
        assert stat.S_IMODE(os.stat(tmp_path / "new.safetensors").st_mode) == 0o644  # not safetensors' 0600
        shared = tmp_path / "shared.safetensors"
        save_safetensors(shared, {"t": torch.zeros(2)}, {})
        os.chmod(shared, 0o664)
        save_safetensors(shared, {"t": torch.ones(2)}, {})
        assert stat.S_IMODE(os.stat(shared).st_mode) == 0o664  # the replaced file's mode
    finally:
        os.umask(umask)


def test_a_failed_safetensors_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import safetensors.torch

    target = tmp_path / "ext.safetensors"
    save_safetensors(target, {"t": torch.zeros(2)}, {"v": "old"})
    before = target.read_bytes()

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match="No space"):
        save_safetensors(target, {"t": torch.ones(2)}, {"v": "new"})
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["ext.safetensors"]
