"""Shared fixtures: the real tag list, tiny random JTP-3 models in the real file format, test images.

Nothing here touches the network: HF_HUB_OFFLINE is set for the whole session, so a missing default
file raises a DownloadError instead of fetching.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parent.parent
TAGS_CSV = ROOT / "data" / "jtp-3-hydra-tags.csv"
sys.path.insert(0, str(ROOT))


def real_tags() -> list[str]:
    """The 7,504 real JTP-3 tags in model order (the CSV is sorted like the model's labels)."""
    lines = TAGS_CSV.read_text(encoding="utf-8").splitlines()[1:]
    return [line.split(",", 1)[0] for line in lines]


@pytest.fixture(scope="session")
def tags() -> list[str]:
    return real_tags()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tags) -> str:
    """A tiny random model over all 7,504 real tags (~1 MB backbone, fast on CPU)."""
    from hydra.testing.jtp3 import write_model

    return write_model(tmp_path_factory.mktemp("model") / "tiny.safetensors", tags)


@pytest.fixture(scope="session")
def full_size_model(tmp_path_factory, tags) -> str:
    """A random model with every key, shape, dtype and metadata field of the real file (~1 GB)."""
    from hydra.testing.jtp3 import write_model

    return write_model(tmp_path_factory.mktemp("full") / "jtp-3-hydra.safetensors", tags, full_size=True)


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> tuple[str, list[str]]:
    """A tiny model over 12 made-up tags, for tests that look at individual tags."""
    from hydra.testing.jtp3 import write_model

    names = [f"tag_{i:02d}" for i in range(12)]
    return write_model(tmp_path_factory.mktemp("small") / "small.safetensors", names, seed=3), names


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB"):
    """A deterministic random-pixel PIL image (smooth enough to survive resizing differently per image)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    return img.convert(mode) if mode != "RGB" else img


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Three images of different sizes, one in a sub-folder, plus files that must be skipped."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    noise_image(300, 200, 1).save(folder / "a.png")
    noise_image(64, 640, 2).save(folder / "b.jpg", quality=95)
    noise_image(120, 90, 3).save(folder / "sub" / "c.webp")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"")
    return folder


class FullAtClose:
    """A file whose buffered data only reaches the disk at close, which then fails (a full disk)."""

    def __init__(self, f):
        self.f = f

    def write(self, text):
        return self.f.write(text)

    def close(self):
        import errno

        self.f.close()
        raise OSError(errno.ENOSPC, "No space left on device")


class Terminal:
    """A program run on a pseudo-terminal, as a user runs it: what it prints (with the terminal's echo of what
    is typed) is read back, and lines are typed only after the prompt they answer has appeared."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]):
        master, slave = os.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                                     start_new_session=True)
        os.close(slave)
        self.fd, self.seen, self.pos = master, "", 0

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        try:
            data = os.read(self.fd, 4096) if ready else b""
        except OSError:  # EIO: the script has ended
            data = b""
        self.seen += data.decode(errors="replace").replace("\r\n", "\n")
        return bool(data)

    def expect(self, text: str, timeout: float = 30) -> str:
        """Wait for `text` after what was already expected; returns the output up to and including it."""
        deadline = time.monotonic() + timeout
        while text not in self.seen[self.pos:]:
            if not self._read(max(0.0, deadline - time.monotonic())) and time.monotonic() >= deadline:
                raise AssertionError(f"waited for {text!r}; the terminal shows:\n{self.seen}")
        end = self.seen.index(text, self.pos) + len(text)
        out, self.pos = self.seen[self.pos:end], end
        return out

    def type(self, text: str, end: str = "\n") -> None:
        """Type `text` and `end` (keys such as TAB "\\t" or the up arrow "\\x1b[A" included)."""
        os.write(self.fd, (text + end).encode())

    def finish(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        while self._read(0.1):
            pass
        os.close(self.fd)
        self.fd = -1
        return self.proc.wait(timeout=5)

    def kill(self) -> None:
        """End the program if a failed test left it running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
