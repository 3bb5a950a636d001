"""Default file locations and the first-use download of the model and tag metadata.

Defaults are found relative to the project folder (where `inference.py` lives), so the scripts work from
any current directory; the original resolved them against the current directory. `calibration.csv` is the
exception: like the original, it is looked up in the current directory, so each dataset folder can have
its own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.common import log
from hydra.hub import DownloadError, ensure_file

if TYPE_CHECKING:
    from hydra.models.family import DefaultFile

ROOT = Path(__file__).resolve().parents[2]  # the project folder (hydra/models/ is two below)
DEFAULT_MODEL = "models/jtp-3-hydra.safetensors"
DEFAULT_METADATA = "data/jtp-3-hydra-tags.csv"
DEFAULT_EXTENSIONS = "extensions/jtp-3-hydra"
DEFAULT_CALIBRATION = "calibration.csv"
DEFAULT_VALIDATION = "data/jtp-3-hydra-val.csv"

MODEL_SHA256 = "1b91691be739ba07d5d7cfb74296ab19ab016d7eabad03542a0a34c90a3d9969"
MODEL_SIZE = 1_002_587_984
# The tags CSV has been published with LF and with CRLF line endings; both are the same data (spec §4.1).
METADATA_SHA256 = ("0ed081ac3d27c4ab7e63b2c1e8e8542c1f0cf3936a71d4463bd7a321f1b07641",
                   "aa0964419b9d29a5574f594aa6d693bbc3065c1c503a385b69baff90cc75a936")
METADATA_SIZE = (188_822, 196_327)
VALIDATION_SHA256 = "c7e9901ae3dec04942ed5ecb7dda0fbbf01afc4d27b1b5f80d509b664952ff77"
VALIDATION_SIZE = 42_149_079


def project_path(relative: str) -> str:
    """A default path under the project folder, shown relative to the current directory when inside it."""
    path = ROOT / relative
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)


def resolve_model(path: str | None) -> str:
    """The model file to load: `path` if given (it must exist), else the default, downloaded on first use.

    Raises:
        FileNotFoundError: a given path does not exist.
        DownloadError: the default is missing and could not be fetched.
    """
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model file '{path}' does not exist")
        return path
    default = project_path(DEFAULT_MODEL)
    ensure_file(default, DEFAULT_MODEL, sha256=MODEL_SHA256, size=MODEL_SIZE, what="JTP-3 model")
    return default


def resolve_metadata(path: str | None, default: DefaultFile | None) -> str | None:
    """The tag metadata CSV: `path` if given ('' = none), else the family's default file (fetched if missing).

    Without the default file and without a way to fetch it, the run goes on without metadata (no
    implications or category exclusion), as the original does when the file is absent.
    """
    if path == "":
        return None
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"metadata file '{path}' does not exist")
        return path
    if default is None:
        return None
    try:
        return ensure_default(default)
    except DownloadError as e:
        log(f"warning: {e} Continuing without tag metadata (no implications or category exclusion).")
        return None


def ensure_default(default: DefaultFile) -> str:
    """The project's copy of a default file, downloaded and checked on first use.

    Raises:
        DownloadError: it is missing and could not be fetched.
    """
    path = project_path(default.path)
    ensure_file(path, default.repo_file, sha256=default.sha256, size=default.size, what=default.what,
                repo_id=default.repo_id)
    return path
