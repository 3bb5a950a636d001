"""Extensions: small safetensors files that add a tag to JTP-3, or replace one (docs/formats.md).

An extension holds one tag's query `q` (H, 1, E) and output matrix `out_proj.weight` (1, A, 2), an
optional `validation` table (T_v, 4) of [tp, fp, tn, fn] counts, and metadata naming the tag.

The q scale (a deliberate decision, see README): the base model stores its q rows RMS-normalised (L2 norm
sqrt(E) = 8), and training sees RMSNorm(q) too, but the upstream builder writes unit-L2 q, which would run
a tag 8x less sharp than it was validated. So every extension's q is RMS-normalised when merged. That is
idempotent for files we build (already RMS-normalised) and restores the trained behaviour for files built
upstream, so an extension behaves at inference as in the validation that chose its threshold.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hydra.models.checkpoint import (
    ARCHITECTURE,
    KEY_ARCHITECTURE,
    CheckpointError,
    check_weights,
    load_tensors,
    save_safetensors,
)
from hydra.tags.names import check_tag_name
from hydra.tags.rules import rewrite_tag

if TYPE_CHECKING:
    import torch

    from hydra.models.head import HydraPool

# torch is imported by the functions that merge and write tensors: finding and listing extension files (the
# CLI, calibrate.py) stays torch-free.
IMPLEMENTATION = "redrocket.extension.label.v1"
KEY_IMPLEMENTATION = "modelspec.implementation"
KEY_LABEL = "classifier.label"
KEY_CATEGORY = "classifier.label.category"
KEY_IMPLIES = "classifier.label.implies"
# Upstream's builder also saves frozen copies of the shared head; they are ignored when reading.
FROZEN_COPIES = ("kv.weight", "ff_norm.weight", "ff_norm.bias", "ff_in.weight", "ff_out.weight")


class ExtensionError(CheckpointError):
    """An extension file is unusable or conflicts with another; the message names the file."""


@dataclass
class Extension:
    path: str
    label: str                        # e621 spelling, as stored
    category: str                     # category name (default "general")
    implies: list[str]
    architecture: str
    q: torch.Tensor                   # (H, 1, E)
    out_proj: torch.Tensor            # (1, A, 2)
    validation: torch.Tensor | None   # (T_v, 4) [tp, fp, tn, fn], or None
    metadata: dict[str, str] = field(default_factory=dict)


def find_extensions(paths: Sequence[str | os.PathLike] | None = None, use_default: bool = True,
                    default_dir: str | os.PathLike = "") -> list[str]:
    """Expand `-e` arguments: a directory yields its non-dot `*.safetensors` files (sorted, not recursive).

    The model family's default folder (`default_dir`, e.g. `extensions/jtp-3-hydra` in the project folder) is
    added when it exists and `use_default` is True (`-E` turns it off). The original lists folders in
    file-system order; we sort so that appended tags get a stable order.
    """
    roots = [os.fspath(p) for p in (paths or [])]
    if use_default and default_dir and os.path.isdir(default_dir) and os.fspath(default_dir) not in roots:
        roots.insert(0, os.fspath(default_dir))
    found: list[str] = []
    for root in roots:
        if os.path.isdir(root):
            found += sorted(e.path for e in os.scandir(root)
                            if e.name.endswith(".safetensors") and not e.name.startswith(".") and e.is_file())
        elif os.path.exists(root):
            found.append(root)
        else:
            raise FileNotFoundError(f"extension {root!r} does not exist")
    return list(dict.fromkeys(found))


def check_label(path: str | os.PathLike, meta: dict[str, str]) -> str:
    """The file's `classifier.label`, if it is a valid tag name (hydra/tags/names.py; v1 and v2 files)."""
    try:
        return check_tag_name(meta.get(KEY_LABEL, ""), f"metadata {KEY_LABEL}")
    except ValueError as e:
        raise ExtensionError(f"{path}: {e}") from None


def read_extension(path: str | os.PathLike) -> Extension:
    """Read and validate one extension file (shapes are checked against the model when merging)."""
    tensors, meta = load_tensors(path)
    impl = meta.get(KEY_IMPLEMENTATION)
    if impl is None:
        raise ExtensionError(f"{path}: missing SAI modelspec metadata ({KEY_IMPLEMENTATION})")
    if impl != IMPLEMENTATION:
        raise ExtensionError(f"{path}: unrecognized implementation {impl!r} (expected {IMPLEMENTATION!r})")
    label = check_label(path, meta)
    for name in ("q", "out_proj.weight"):
        if name not in tensors:
            raise ExtensionError(f"{path}: missing tensor {name!r}")
    extra = sorted(set(tensors) - {"q", "out_proj.weight", "validation", *FROZEN_COPIES})
    if extra:
        raise ExtensionError(f"{path}: unexpected tensor(s) {', '.join(extra)}")
    check_weights(path, {k: tensors[k] for k in ("q", "out_proj.weight")}, floating=True)
    q, out = tensors["q"], tensors["out_proj.weight"]
    if q.ndim != 3 or q.shape[1] != 1 or out.ndim != 3 or out.shape[0] != 1 or out.shape[2] != 2:
        raise ExtensionError(f"{path}: expected q (H, 1, E) and out_proj.weight (1, A, 2), got "
                             f"{tuple(q.shape)} and {tuple(out.shape)}")
    validation = tensors.get("validation")
    if validation is not None and (validation.ndim != 2 or validation.shape[1] != 4):
        raise ExtensionError(f"{path}: validation must have shape (thresholds, 4), got {tuple(validation.shape)}")
    return Extension(
        path=os.fspath(path), label=label, category=meta.get(KEY_CATEGORY, "general"),
        implies=meta.get(KEY_IMPLIES, "").split(), architecture=meta.get(KEY_ARCHITECTURE, ""),
        q=q, out_proj=out, validation=validation, metadata=meta,
    )


def caption_name_conflict(label: str, others: Iterable[str], rename: Callable[[str], str] = rewrite_tag) -> str | None:
    """The first of `others` that is another tag but gets `label`'s name after the caption rename, or None.

    JTP-3 writes labels renamed (`vulva` -> `pussy`) in captions, CSV columns and calibrations, so a new tag
    `big_vulva` beside the model's `big_pussy` would give two columns and caption tags of one name.
    """
    name = rename(label)
    return next((other for other in others if other != label and rename(other) == name), None)


def renamed_conflict_message(path: str | os.PathLike, label: str, other: str, whose: str) -> str:
    """One line naming both tags and the file: `label` (of `path`) clashes with `other` (`whose`: 'the model's tag',
    "extension 'x.safetensors''s tag", ...)."""
    return (f"{path}: tag {label!r} is written {rewrite_tag(label)!r} in captions and CSV columns (the vulva -> "
            f"pussy rename), as is {whose} {other!r}; name it {rewrite_tag(label)!r} to replace that tag, or choose "
            "another name")


def load_extensions(paths: Sequence[str | os.PathLike]) -> list[Extension]:
    """Read extension files and folders (see `find_extensions`); two files with the same label, or with labels
    that the caption rename makes equal (`big_vulva`, `big_pussy`), are a conflict."""
    exts = [read_extension(p) for p in find_extensions(paths, use_default=False)]
    seen: dict[str, Extension] = {}  # renamed label -> the first extension with it
    for ext in exts:
        first = seen.setdefault(rewrite_tag(ext.label), ext)
        if first is ext:
            continue
        if first.label == ext.label:
            raise ExtensionError(f"extensions {first.path!r} and {ext.path!r} both define tag {ext.label!r}")
        raise ExtensionError(renamed_conflict_message(ext.path, ext.label, first.label,
                                                      f"the tag of extension {first.path!r}"))
    return exts


def merge_extensions(pool: HydraPool, labels: list[str], exts: Iterable[Extension],
                     architecture: str = ARCHITECTURE) -> list[str]:
    """Merge extensions into `pool`: replace tags that exist, append the others (in the given order).

    Returns:
        The new label list (model order).
    """
    labels = list(labels)
    index = {t: i for i, t in enumerate(labels)}
    renamed: dict[str, tuple[str, str]] = {}  # caption name -> (first label with it, whose it is)
    for label in labels:
        renamed.setdefault(rewrite_tag(label), (label, "the model's tag"))
    h, e, a = pool.cfg.n_heads, pool.cfg.head_dim, pool.cfg.attn_dim
    new_q, new_out = [], []
    for ext in exts:
        if ext.architecture != architecture:
            raise ExtensionError(f"{ext.path}: architecture {ext.architecture!r} does not match the model's "
                                 f"{architecture!r}")
        if tuple(ext.q.shape) != (h, 1, e) or tuple(ext.out_proj.shape) != (1, a, 2):
            raise ExtensionError(f"{ext.path}: shapes q {tuple(ext.q.shape)}, out_proj.weight "
                                 f"{tuple(ext.out_proj.shape)} do not fit this model (expected ({h}, 1, {e}) "
                                 f"and (1, {a}, 2))")
        other, whose = renamed.setdefault(rewrite_tag(ext.label), (ext.label, f"the tag of extension {ext.path!r}"))
        if other != ext.label and ext.label not in index:
            raise ExtensionError(renamed_conflict_message(ext.path, ext.label, other, whose))
        q = rms_normalize(ext.q)
        if ext.label in index:
            # Upstream copies q into the out_proj slot here (a bug); we replace both, as intended.
            pool.replace_tag(index[ext.label], q, ext.out_proj)
        else:
            index[ext.label] = len(labels)
            labels.append(ext.label)
            new_q.append(q)
            new_out.append(ext.out_proj)
    if new_q:
        import torch

        pool.append_tags(torch.cat(new_q, dim=1), torch.cat(new_out, dim=0))
    return labels


def rms_normalize(q: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the head dim (no weight), computed in float32: rows get L2 norm sqrt(E)."""
    import torch.nn.functional as F

    from hydra.models.head import RMS_EPS

    return F.rms_norm(q.float(), (q.shape[-1],), eps=RMS_EPS).to(q.dtype)


def save_extension(path: str | os.PathLike, q: torch.Tensor, out_proj: torch.Tensor,
                   metadata: dict[str, str], validation: torch.Tensor | None = None) -> None:
    """Write an extension file with only its own tensors (q RMS-normalised, as the base model stores q)."""
    import torch

    tensors = {"q": rms_normalize(q).to(torch.bfloat16), "out_proj.weight": out_proj.to(torch.bfloat16)}
    if validation is not None:
        tensors["validation"] = validation.to(torch.int32)
    meta = {KEY_IMPLEMENTATION: IMPLEMENTATION, KEY_ARCHITECTURE: ARCHITECTURE, **metadata}
    save_safetensors(path, tensors, meta)
