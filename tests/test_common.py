"""Atomic writes (all or nothing, no debris, normal permissions; symlinks followed, FIFOs and devices written
in place, a failed close commits nothing) and the device/dtype choice.

    venv/bin/python -m pytest tests/test_common.py -q
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import ROOT, FullAtClose

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


def _run_child(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_a_temp_file_stranded_by_an_interrupt_is_removed_at_exit(tmp_path):
    # the interrupt lands after the temporary file exists but before any caller could clean it up
    code = ("import sys; from hydra.common import temp_beside\n"
            "temp_beside(sys.argv[1] + '/a.txt')\n"
            "raise KeyboardInterrupt\n")
    done = _run_child(code, tmp_path)
    assert "KeyboardInterrupt" in done.stderr
    assert os.listdir(tmp_path) == []


def test_sigterm_during_many_atomic_writes_leaves_only_whole_files(tmp_path):
    code = ("import signal, sys\n"
            "from hydra.common import atomic_write\n"
            "def stop(*_): raise SystemExit(130)\n"  # as inference.py's SIGTERM handler
            "signal.signal(signal.SIGTERM, stop)\n"
            "print('ready', flush=True)\n"
            "i = 0\n"
            "while True:\n"
            "    with atomic_write(f'{sys.argv[1]}/{i % 50}.txt') as f:\n"
            "        f.write('x' * 1000)\n"
            "    i += 1\n")
    for _ in range(5):  # five interrupts at random points of the write cycle
        proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline() == "ready\n"
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
        proc.stdout.close()
        names = os.listdir(tmp_path)
        assert names and not [n for n in names if n.startswith(".")]
        assert all((tmp_path / n).read_text() == "x" * 1000 for n in names)


def test_a_forked_child_leaves_its_parents_temp_files_alone(tmp_path):
    code = ("import os, sys; from hydra.common import temp_beside\n"
            "fd, tmp = temp_beside(sys.argv[1] + '/a.txt')\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    sys.exit(0)\n"  # a normal exit runs atexit handlers in the child
            "os.waitpid(pid, 0)\n"
            "print(os.path.exists(tmp))\n")
    done = _run_child(code, tmp_path)
    assert done.stdout.strip() == "True", done.stderr
    assert os.listdir(tmp_path) == []  # and the parent's own exit removed it
