"""Reading and writing safetensors files with clear errors, plus the JTP-3 model file's metadata schema.

Model and extension files are user input: anything wrong with them (not safetensors, wrong architecture,
missing / extra / mis-shaped tensors, bad metadata) is a `CheckpointError` naming the file and the problem,
never a stack trace from deep inside torch.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

if TYPE_CHECKING:
    import torch

# torch is imported by the functions that move tensors: the family registry reads metadata with this module
# and stays torch-free.

BACKBONE = "naflexvit_so400m_patch16_siglip"  # timm's name; hydra/models/backbone.py builds it
ARCHITECTURE = BACKBONE + "+rr_hydra"   # `modelspec.architecture` of JTP-3 and its extensions
HYDRA35_ARCHITECTURE = BACKBONE + "+rr_hydra2"  # Hydra 3.5's, matched exactly as upstream does
KEY_ARCHITECTURE = "modelspec.architecture"
KEY_LABELS = "classifier.labels"        # tag names joined with "\n", model order
KEY_BACKBONE = "hydra.backbone"         # ours: JSON timm overrides for small test models


class CheckpointError(ValueError):
    """A model, extension or training checkpoint file is unusable; the message says which and why."""


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors `__metadata__` block (empty dict if none)."""
    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_tensors(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                 keep: Callable[[str], bool] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors with peak memory about the size of the result (no second copy of the weights).

    Tensors already in `dtype` come straight from a copy-on-write memory map of the file: no copy at all,
    pages are read on first use and shared with the OS file cache. Tensors that need a cast are read one
    at a time into their own buffer (`pread`) and cast as they arrive, so the file's bytes are never all
    resident next to the cast copy (fp32 from a bf16 file: peak ~ the fp32 weights, not 1.5x).

    Args:
        dtype: cast floating-point tensors to this dtype (None keeps the stored dtype).
        keep: optional filter on tensor names.

    Returns:
        (tensors, metadata)
    """
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            names = [k for k in f.keys() if keep is None or keep(k)]
            casts = dtype is not None and any(_needs_cast(f.get_slice(k).get_dtype(), dtype) for k in names)
        if not casts:
            _read_ahead(path)
        with _open_for_reading(path, pread=casts) as f:
            meta = dict(f.metadata() or {})
            tensors = {}
            for name in names:
                t = f.get_tensor(name)
                if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                    t = t.to(dtype)
                tensors[name] = t
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors, meta


_FLOAT_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _needs_cast(stored: str, dtype: torch.dtype) -> bool:
    return stored in _FLOAT_NAMES and f"torch.{_FLOAT_NAMES[stored]}" != str(dtype)


def _read_ahead(path: str | os.PathLike) -> None:
    """Ask the OS to start reading the whole file into its cache now, in the background (Linux): the mapped
    tensors are then in memory by the time the first forward touches them, instead of being read page by
    page on first use. A hint only; nothing happens where it is unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
    except OSError:
        pass


def _open_for_reading(path: str | os.PathLike, pread: bool):
    if pread:
        try:
            return safe_open(os.fspath(path), framework="pt", device="cpu", backend="pread")
        except TypeError:  # safetensors < 0.8 has no backends: a memory map it is
            pass
    return safe_open(os.fspath(path), framework="pt", device="cpu")


def check_state(path: str | os.PathLike, state: Mapping[str, torch.Tensor],
                expected: Mapping[str, tuple[int, ...]], what: str = "model") -> None:
    """Raise one CheckpointError listing missing, unexpected and mis-shaped tensors (if any)."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if extra:
        problems.append(f"unexpected {_few(extra)}")
    if shapes:
        problems.append("wrong shape " + ", ".join(
            f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})" for k in shapes[:3]))
    if problems:
        raise CheckpointError(f"{path}: not a valid {what} file: " + "; ".join(problems))


def _few(keys: list[str], n: int = 4) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def parse_backbone_overrides(path: str | os.PathLike, meta: Mapping[str, str]) -> dict:
    """The `hydra.backbone` JSON object (test models), or {} when absent."""
    raw = meta.get(KEY_BACKBONE)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata {KEY_BACKBONE} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: metadata {KEY_BACKBONE} must be a JSON object")
    return value


def check_architecture(path: str | os.PathLike, meta: Mapping[str, str]) -> str:
    arch = meta.get(KEY_ARCHITECTURE)
    if arch is None:
        raise CheckpointError(f"{path}: missing metadata {KEY_ARCHITECTURE!r} (is this a JTP-3 model file?)")
    if arch != ARCHITECTURE:
        raise CheckpointError(f"{path}: unsupported architecture {arch!r}; this tool runs {ARCHITECTURE!r}")
    return arch


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str]) -> None:
    """Write atomically: a hidden temporary file in the same folder, renamed over `path` when complete (a
    symlink is followed; a FIFO or device is written directly; a folder is refused, see
    `hydra.common.write_target`). The file gets the mode of the regular file it replaces, else what a new file
    gets under the umask (safetensors writes its own private temporary file and renames it, giving 0600)."""
    from safetensors.torch import save_file

    from hydra.common import target_mode, temp_beside, write_target

    path, direct = write_target(path)
    if direct:  # safetensors' save_file would replace the path; write the serialised bytes into it instead
        from safetensors.torch import save

        with open(path, "wb") as f:
            f.write(save({k: v.contiguous() for k, v in tensors.items()}, metadata=dict(metadata)))
        return
    mode = target_mode(path)
    fd, tmp = temp_beside(path)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=dict(metadata))
        with contextlib.suppress(OSError):  # a file system without Unix permissions
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
