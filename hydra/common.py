"""Shared plumbing: logging to stderr, device and dtype choice (with the reason), atomic file writes.

Everything a user reads while a run is going goes to stderr; stdout is kept for machine-readable output
(CSV rows, JSON), so `inference.py -o - > probs.csv` stays clean.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import signal
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that need it: calibrate.py and loader workers import this module
# and should not pay seconds of start-up for a library they do not use.
DTYPE_NAMES = ("bf16", "fp32", "fp16")


def log(*parts: object, end: str = "\n") -> None:
    """Print a progress or status line to stderr."""
    print(*parts, file=sys.stderr, end=end, flush=True)


def exit_quietly_on_broken_pipe() -> NoReturn:
    """Stdout's reader has gone (`inference.py -o - | head -1`): stop without a traceback or more messages, with
    the status of a process that SIGPIPE ended (128 + 13), as a C tool would have. Stdout is pointed at the null
    device first, so Python's own flush at exit cannot fail again."""
    with contextlib.suppress(OSError, ValueError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
    sys.exit(128 + getattr(signal, "SIGPIPE", 13))


def default_device() -> str:
    """`cuda` when a CUDA device is usable, else `cpu` (the original's `-d` default)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    import torch

    cpu = getattr(torch, "cpu", None)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in probes)


def choose_dtype(device: str | torch.device, requested: str | None = None) -> tuple[torch.dtype, str]:
    """Pick the run dtype and say why.

    The original runs bf16 everywhere. On CUDA we do the same. On a CPU, bf16 is only fast with native
    bf16 instructions (AVX512-BF16 or AMX). Measured on a 2-core Zen 4 EPYC with AVX512-BF16 (no AMX):
    bf16 matmuls run at ~185 GFLOP/s per core against ~70 in fp32 (2.7x), and a whole 256-token image
    takes 3.9 s of CPU time in bf16 against 10.1 s in fp32 (2.6x; attention gains less than the matmuls).
    Without native bf16, PyTorch emulates it and fp32 is several times faster. fp32 stays within the
    original's numbers (it is the more precise of the two), so on such CPUs we use it.

    Args:
        device: the torch device the model will run on.
        requested: "bf16", "fp32", "fp16", or None / "auto" to decide here.

    Returns:
        (dtype, reason) where reason is a short human-readable explanation.
    """
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
    if requested not in (None, "auto"):
        if requested not in dtypes:
            raise ValueError(f"unknown dtype {requested!r}; choose one of auto, {', '.join(DTYPE_NAMES)}")
        return dtypes[requested], f"{requested} (requested)"
    if torch.device(device).type != "cpu":
        return torch.bfloat16, "bf16 (accelerator, as the original)"
    if cpu_has_fast_bf16():
        return torch.bfloat16, "bf16 (CPU has native bf16 instructions)"
    return torch.float32, "fp32 (CPU lacks native bf16; fp32 is faster there)"


def new_file_mode() -> int:
    """What a newly created file gets: 0666 minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def target_mode(path: str | os.PathLike) -> int:
    """The permissions a file written at `path` should end with: those of the regular file it replaces, else
    what any new file gets (never a folder's or a device's mode)."""
    try:
        st = os.stat(path)
    except OSError:
        return new_file_mode()
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else new_file_mode()


# Temporary files that exist now (`temp_beside`), so that one an interrupt strands between two bytecodes (after
# mkstemp, before the caller's `try`, or between a commit's close and rename) is still removed at exit.
_LIVE_TEMPS: set[str] = set()
_DEFERRED_SIGNALS = {getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)}


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back for the block (their Python handlers run right after it); no-op where
    the platform cannot (Windows)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def forget_temp(tmp: str) -> None:
    """`tmp` (from `temp_beside`) has been renamed into place or removed: no longer ours to clean up."""
    _LIVE_TEMPS.discard(tmp)


if hasattr(os, "register_at_fork"):  # a forked child must never remove its parent's files
    os.register_at_fork(after_in_child=_LIVE_TEMPS.clear)


@atexit.register
def _remove_stranded_temps() -> None:
    for tmp in list(_LIVE_TEMPS):
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    _LIVE_TEMPS.clear()


def temp_beside(path: str | os.PathLike) -> tuple[int, str]:
    """A new hidden temporary file in `path`'s folder, with the permissions `path` will need.

    `mkstemp` creates files readable by their owner only; a caption or model file should get what any new
    file gets (0666 minus the umask), or keep the mode of the regular file it replaces. The file is
    remembered from the moment it exists until `forget_temp`, and removed at exit if still there.
    """
    path = Path(path)
    mode = target_mode(path)
    try:
        with _signals_deferred():  # created and remembered with no interrupt in between
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            _LIVE_TEMPS.add(tmp)
    except OSError as e:  # a missing or read-only folder: say which file could not be written
        raise _naming(e, path) from None
    try:
        os.chmod(tmp, mode)
    except OSError:  # e.g. a file system without Unix permissions: keep what mkstemp gave
        pass
    return fd, tmp


def write_target(path: str | os.PathLike) -> tuple[Path, bool]:
    """Where writing `path` goes, and whether it must be written in place rather than renamed into place.

    A symlink is followed (the link stays, its target gets the new content). Only a regular file, or a file
    that does not exist yet, is replaced by a rename: renaming over a FIFO or a device (`/dev/stdout`) would
    replace it with a regular file, so those are written directly. A folder is refused (IsADirectoryError
    naming it) before anything is created.
    """
    target = Path(os.path.realpath(path))
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return target, False
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", os.fspath(path))
    return target, not stat.S_ISREG(st.st_mode)


def _naming(e: OSError, path: str | os.PathLike) -> OSError:
    """`e` about `path` rather than about our hidden temporary file (whose name means nothing to a user)."""
    if e.errno is None:
        return e
    return type(e)(e.errno, e.strerror, os.fspath(path))


class AtomicFile:
    """A hidden temporary file beside `path` that becomes `path` on `commit()`, or vanishes on `discard()`.

    The temporary name starts with a dot, so folder scans skip it even while it exists. A FIFO or device is
    written directly instead, a folder is refused (`write_target`). Every failure (of the write, of the close
    that flushes it, e.g. a full disk, or of the rename) removes the temporary file and leaves `path` as it
    was; errors name `path`, not the temporary file.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8",
                 newline: str | None = None, errors: str | None = None):
        self.path, direct = write_target(path)
        binary = "b" in mode
        text = {} if binary else {"encoding": encoding, "newline": newline, "errors": errors}
        self.tmp: str | None = None
        if direct:
            self.file = open(self.path, mode, **text)
            return
        fd, self.tmp = temp_beside(self.path)
        try:
            self.file = os.fdopen(fd, mode, **text)
        except BaseException:
            with contextlib.suppress(OSError):  # io.open may have closed it already
                os.close(fd)
            os.unlink(self.tmp)
            forget_temp(self.tmp)
            raise

    def commit(self) -> None:
        try:
            self.file.close()  # flushes: a short write raises here, before anything is renamed
            if self.tmp is not None:
                os.replace(self.tmp, self.path)
                forget_temp(self.tmp)
        except OSError as e:
            self.discard()
            raise _naming(e, self.path) from None
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        if self.tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)
            forget_temp(self.tmp)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8",
                 newline: str | None = None) -> Iterator:
    """Write `path` all or nothing: a crash, Ctrl-C or exception in the block leaves the old file (if
    any) untouched and no temporary file behind."""
    f = AtomicFile(path, mode, encoding, newline)
    try:
        yield f.file
    except BaseException:
        f.discard()
        raise
    f.commit()
