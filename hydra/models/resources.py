"""Default file locations and the first-use download of the model and tag metadata.

Defaults are found relative to the project folder (where `inference.py` lives), so the scripts work from
any current directory; the original resolved them against the current directory. `calibration.csv` is
looked up in the current directory first, as the original does (so each dataset folder can have its own),
then in the project folder, where the calibration wizard writes it.
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
HYDRA35_MODEL = "models/hydra-3.5.safetensors"  # in RedRocket/Hydra and in the project folder
HYDRA35_SHA256 = "5e9337c21019c51f2bb5b33d053ea3e2c0412e5ca972b5ea3c4c21e6987452ca"
HYDRA35_SIZE = 1_064_526_448
# The tags CSV has been published with LF and with CRLF line endings; both are the same data (docs/formats.md).
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
    """The model file to load: `path` if it is a file, else a published model named by it, else the default.

    A published model (a family's `model_file`) is named by one of its short names (`-M hydra-3.5`) or by its
    project path (`-M models/hydra-3.5.safetensors`), and is downloaded and checked on first use; no `-M`
    means the JTP-3 model, the original toolkit's.

    Raises:
        FileNotFoundError: `path` is neither a file nor a published model's name.
        DownloadError: the published model is missing and could not be fetched.
    """
    if path and os.path.isfile(path):
        return path
    published = _published_models()
    wanted = published.get(DEFAULT_MODEL if not path else _model_key(path))
    if wanted is None:
        names = ", ".join(dict.fromkeys(f.path for f in published.values()))
        raise FileNotFoundError(f"model file '{path}' does not exist (published models, downloaded on first use: "
                                f"{', '.join(short_model_names())}, or their paths {names})")
    return ensure_default(wanted)


def _model_key(path: str) -> str:
    """A `-M` value as `_published_models` keys it: short names in lower case, paths project-relative."""
    if "/" not in path and "\\" not in path and not path.endswith(".safetensors"):
        return path.lower()
    full = Path(path) if os.path.isabs(path) else Path(os.path.abspath(path))
    try:
        return full.relative_to(ROOT).as_posix()
    except ValueError:
        return Path(path).as_posix()


def short_model_names() -> list[str]:
    """The first short name of each published model (`-M` help and errors)."""
    from hydra.models import families

    return [f.model_names[0] for f in families() if f.model_file is not None and f.model_names]


def _published_models() -> dict[str, DefaultFile]:
    """Every registered family's published model under its short names and its project path."""
    from hydra.models import families

    known: dict[str, DefaultFile] = {}
    for family in families():
        if family.model_file is not None:
            for name in (*family.model_names, family.model_file.path):
                known[name] = family.model_file
    return known


def find_calibration() -> str | None:
    """The default calibration CSV: `calibration.csv` in the current directory, else the project folder's
    (where `calibrate.sh`/`calibrate.bat` save it); None when neither exists."""
    for path in (DEFAULT_CALIBRATION, project_path(DEFAULT_CALIBRATION)):
        if os.path.isfile(path):
            return path
    return None


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
