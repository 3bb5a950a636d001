"""Reading and writing safetensors files with clear errors, plus the JTP-3 model file's metadata schema.

Model and extension files are user input: anything wrong with them (not safetensors, wrong architecture,
missing / extra / mis-shaped tensors, bad metadata) is a `CheckpointError` naming the file and the problem,
never a stack trace from deep inside torch.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
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
                 keep: Callable[[str], bool] | None = None,
                 validate: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors with peak memory about the size of the result (no second copy of the weights).

    Tensors already in `dtype` come straight from a copy-on-write memory map of the file: no copy at all,
    pages are read on first use and shared with the OS file cache. Tensors that need a cast are read one
    at a time into their own buffer (`pread`) and cast as they arrive, so the file's bytes are never all
    resident next to the cast copy (fp32 from a bf16 file: peak ~ the fp32 weights, not 1.5x).

    Args:
        dtype: cast floating-point tensors to this dtype (None keeps the stored dtype). Given, every tensor
            must be floating point (model weights): an integer or boolean one is refused, not cast.
        keep: optional filter on tensor names.
        validate: refuse a floating-point tensor with a NaN or an infinity (after the cast, so an overflow of
            the cast counts too; `check_weights`) and bad `hydra.backbone` metadata (`parse_backbone_overrides`),
            before the caller builds anything from them.

    Returns:
        (tensors, metadata)

    Raises:
        CheckpointError: not a safetensors file, a non-float tensor where `dtype` asks for weights, a
            non-finite value or bad backbone metadata; the message names the file and the tensor or key.
    """
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            names = [k for k in f.keys() if keep is None or keep(k)]
            casts = dtype is not None and any(_needs_cast(f.get_slice(k).get_dtype(), dtype) for k in names)
        if not casts:
            _read_ahead(path)
        with _open_for_reading(path, pread=casts) as f:
            meta = dict(f.metadata() or {})
            if validate:
                parse_backbone_overrides(path, meta, allowed=None)
            tensors = {}
            for name in names:
                t = f.get_tensor(name)
                if dtype is not None and not t.is_floating_point():
                    raise CheckpointError(f"{path}: tensor {name!r} is {_dtype_name(t)}; model weights are "
                                          "floating point")
                if dtype is not None and t.dtype != dtype:
                    t = t.to(dtype)
                tensors[name] = t
    except (FileNotFoundError, CheckpointError):
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if validate:
        check_weights(path, tensors)
    return tensors, meta


def check_weights(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], floating: bool = False) -> None:
    """Raise a CheckpointError naming the first tensor that is unusable as weights.

    A floating-point tensor with a NaN or an infinity loads silently and turns every probability into 0.5 or
    NaN; with `floating`, an integer, boolean or complex tensor is refused too (it would be cast silently, or
    fail deep inside torch). One `sum()` pass per tensor: ~0.8 s for the 501M-parameter JTP-3 file on 2 busy
    CPU cores (`isfinite().all()` took ~4.7 s).
    """
    import torch

    for name, t in tensors.items():
        if not t.is_floating_point():
            if floating:
                raise CheckpointError(f"{path}: tensor {name!r} is {_dtype_name(t)}; model weights are "
                                      "floating point")
            continue
        # a NaN or an infinity makes the sum non-finite (5x cheaper than isfinite); a sum that merely overflows
        # is told apart by the exact check
        if t.numel() and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{path}: tensor {name!r} has {bad} NaN or infinite value(s) of {t.numel()}; "
                                  "the file is damaged (or was saved from a diverged training run)")


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


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


# The `hydra.backbone` keys a NaFlex model file (JTP-3, Hydra 3.5) may set, with their type and range. The
# ranges only keep a hostile file from building something absurd (the real backbone: 1152 wide, 27 deep, 16
# heads, MLP ratio ~3.74); the tensors' shapes are then checked against the built network.
BACKBONE_LIMITS: dict[str, tuple[type, float, float]] = {
    "embed_dim": (int, 1, 16384),
    "depth": (int, 1, 256),
    "num_heads": (int, 1, 1024),
    "mlp_ratio": (float, 1e-3, 64.0),
}


def parse_backbone_overrides(path: str | os.PathLike, meta: Mapping[str, str],
                             allowed: Sequence[str] | None = tuple(BACKBONE_LIMITS)) -> dict:
    """The `hydra.backbone` JSON object (test models), or {} when absent, checked before anything is built.

    Args:
        allowed: the keys this family's builder takes (None: any key; the builder refuses what it does not
            know). Keys of `BACKBONE_LIMITS` are always checked for type and range.

    Raises:
        CheckpointError: not JSON, not an object, an unknown key, a value of the wrong type or out of range,
            or `embed_dim` not divisible by `num_heads`; the message names the file and the key.
    """
    raw = meta.get(KEY_BACKBONE)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        reason = e if isinstance(e, json.JSONDecodeError) else "nested too deeply"
        raise CheckpointError(f"{path}: metadata {KEY_BACKBONE} is not valid JSON ({reason})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: metadata {KEY_BACKBONE} must be a JSON object")
    where = f"{path}: metadata {KEY_BACKBONE}"
    if allowed is not None:
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise CheckpointError(f"{where}: unsupported key(s) {', '.join(map(repr, unknown))}; allowed: "
                                  f"{', '.join(allowed)}")
    for key, (kind, low, high) in BACKBONE_LIMITS.items():
        if key not in value:
            continue
        v = value[key]
        ok_type = isinstance(v, int | float) if kind is float else isinstance(v, int)
        if isinstance(v, bool) or not ok_type:
            raise CheckpointError(f"{where}: {key!r} must be {'a number' if kind is float else 'an integer'}, "
                                  f"got {v!r}")
        if not low <= v <= high:  # NaN fails this too
            raise CheckpointError(f"{where}: {key!r} = {v!r} is out of range ({low:g} to {high:g})")
    if "embed_dim" in value and "num_heads" in value and value["embed_dim"] % value["num_heads"]:
        raise CheckpointError(f"{where}: 'embed_dim' {value['embed_dim']} is not divisible by 'num_heads' "
                              f"{value['num_heads']}")
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

    from hydra.common import forget_temp, target_mode, temp_beside, write_target

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
        forget_temp(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        forget_temp(tmp)
        raise
