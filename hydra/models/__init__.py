"""Model families and the registry that recognises them from a file.

One module per family (`jtp3.py`, `dinov3.py`, ...) defines a `hydra.models.family.Family` and is registered
here; adding a family is that module plus one `register` line. Callers never compare family names: they ask
the family (`detect(path)`) or the `hydra.Tagger` that holds it.

Detection reads the file's metadata first (`modelspec.architecture` and friends), then, when no family claims
the metadata, the tensor names; a file no family claims is one clear error naming what was found.

Torch-free: family modules import their network code only when a model is loaded.
"""

from __future__ import annotations

import os

from hydra.models.checkpoint import KEY_ARCHITECTURE, CheckpointError, read_metadata
from hydra.models.family import Family, file_keys

_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add (or replace, by name) a family; the newest registration is asked first."""
    _FAMILIES.pop(family.name, None)
    _FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    _FAMILIES.pop(name, None)


def families() -> list[Family]:
    """The registered families, newest first (the order `detect` asks them in)."""
    return list(reversed(_FAMILIES.values()))


def get(name: str) -> Family:
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def detect(path: str | os.PathLike) -> Family:
    """The family of a model file.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: no family recognises it (the message says what the file holds).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file '{path}' does not exist")
    for family in families():
        if path.lower().endswith(family.suffixes or ("\0",)):
            return family
    metadata = read_metadata(path)
    for family in families():
        if family.recognises_metadata(metadata):
            return family
    keys = file_keys(path)
    for family in families():
        if family.recognises_keys(keys):
            return family
    known = "; ".join(f"{f.title} ({f.files})" for f in families())
    if KEY_ARCHITECTURE in metadata:
        found = f"unsupported architecture {metadata[KEY_ARCHITECTURE]!r}"
    elif keys:
        found = f"no model this toolkit knows (tensors such as {', '.join(repr(k) for k in keys[:3])})"
    else:
        found = "no tensors"
    raise CheckpointError(f"{path}: {found}; this toolkit runs {known}")


from hydra.models.dinov3 import DINOV3  # noqa: E402  (the families are registered below)
from hydra.models.hydra35 import HYDRA35  # noqa: E402
from hydra.models.jtp3 import JTP3  # noqa: E402

register(DINOV3)
register(HYDRA35)
register(JTP3)
