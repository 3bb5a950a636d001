"""Atomic writes (all or nothing, no debris, normal permissions) and the device/dtype choice.

    venv/bin/python -m pytest tests/test_common.py -q
"""

from __future__ import annotations

import os
import stat

import pytest
import torch

from hydra.common import atomic_write, choose_dtype


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


def test_dtype_choice_says_why():
    assert choose_dtype("cuda") == (torch.bfloat16, "bf16 (accelerator, as the original)")
    assert choose_dtype("cpu", "fp32") == (torch.float32, "fp32 (requested)")
    dtype, reason = choose_dtype("cpu")
    assert dtype in (torch.bfloat16, torch.float32) and reason.startswith(("bf16", "fp32"))
    with pytest.raises(ValueError, match="choose one of auto"):
        choose_dtype("cpu", "int8")
