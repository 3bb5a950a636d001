"""Hydra 3.5 extensions (upstream's v2 format): files that add one tag to the model, or replace one.

A v2 file stores, under the base model's own parameter names, the slices of its per-class parameters with
a size-1 class dim: for Hydra 3.5 `attn_pool.q` (H, 1, E) and `head.weight` (1, A). Next to them a
required `validation` table (n, 4) of [tp, fp, tn, fn] counts at thresholds (i + 1) / (n + 1), and
metadata: `modelspec.implementation` = `redrocket.extension.label.v2`, `classifier.model` = the base
model's `modelspec.title` (checked strictly: an extension is trained against one model's frozen pool),
`classifier.label`, `classifier.label.category` (default general), and space-separated
`classifier.label.implies` / `classifier.label.impliedby`.

Unlike v1 (JTP-3) extensions, q is merged as stored: Hydra 3.5 uses its queries as stored in training and
at inference, so there is no scale to restore.

Shape legend: H = attention heads, E = head dim, A = H * E, n = validation thresholds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from hydra.models.checkpoint import KEY_ARCHITECTURE, check_weights, load_tensors, save_safetensors
from hydra.models.extensions import IMPLEMENTATION as IMPLEMENTATION_V1
from hydra.models.extensions import (
    KEY_CATEGORY,
    KEY_IMPLEMENTATION,
    KEY_IMPLIES,
    KEY_LABEL,
    Extension,
    ExtensionError,
    check_label,
    find_extensions,
)
from hydra.models.hydra35_net import ARCHITECTURE, KEY_TITLE, KEY_VALIDATION, Hydra35Model

IMPLEMENTATION = "redrocket.extension.label.v2"
KEY_MODEL = "classifier.model"             # the base model's modelspec.title
KEY_IMPLIEDBY = "classifier.label.impliedby"  # base labels that imply the new one
KEY_SAI = "modelspec.sai_model_spec"
SAI_MODEL_SPEC = "1.0.0"                   # the SAI model-spec version the metadata follows
# The per-class parameters and the dim that indexes classes (upstream marks these with `rr_clsdim`).
CLASS_DIMS = {"attn_pool.q": 1, "head.weight": 0}


@dataclass
class ExtensionV2:
    """One v2 extension file, validated on its own (shapes are checked against the model when merging)."""

    path: str
    label: str                        # e621 spelling, as stored
    category: str                     # category name (default "general")
    implies: tuple[str, ...]          # tags the label implies directly
    impliedby: tuple[str, ...]        # base labels that imply this one
    model: str                        # classifier.model: the base model's title
    params: dict[str, Tensor]         # full parameter name -> slice with a size-1 class dim
    validation: Tensor                # (n, 4) [tp, fp, tn, fn]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def q(self) -> Tensor:  # (H, 1, E)
        return self.params["attn_pool.q"]

    @property
    def head_weight(self) -> Tensor:  # (1, A)
        return self.params["head.weight"]


def read_extension_v2(path: str | os.PathLike) -> ExtensionV2:
    """Read and validate one v2 extension file.

    Raises:
        ExtensionError: not a v2 extension (a v1 / JTP-3 one included), missing metadata, or missing,
            unexpected or mis-shaped tensors.
    """
    tensors, meta = load_tensors(path)
    impl = meta.get(KEY_IMPLEMENTATION)
    if impl is None:
        raise ExtensionError(f"{path}: missing SAI modelspec metadata ({KEY_IMPLEMENTATION})")
    if impl == IMPLEMENTATION_V1:
        raise ExtensionError(f"{path}: a JTP-3 (v1) extension; Hydra 3.5 needs v2 ({IMPLEMENTATION!r})")
    if impl != IMPLEMENTATION:
        raise ExtensionError(f"{path}: unrecognized implementation {impl!r} (expected {IMPLEMENTATION!r})")
    label = check_label(path, meta)
    model = meta.get(KEY_MODEL)
    if not model:
        raise ExtensionError(f"{path}: missing metadata {KEY_MODEL!r} (the title of the model it extends)")
    if KEY_VALIDATION not in tensors:
        raise ExtensionError(f"{path}: missing tensor {KEY_VALIDATION!r} (required for v2 extensions)")
    raw = tensors.pop(KEY_VALIDATION)
    validation = raw[0] if raw.ndim == 3 and raw.shape[0] == 1 else raw  # (1, n, 4): the model's per-class layout
    if validation.ndim != 2 or validation.shape[1] != 4:
        raise ExtensionError(f"{path}: {KEY_VALIDATION} must have shape (n, 4) or (1, n, 4), got {tuple(raw.shape)}")
    missing, extra = sorted(set(CLASS_DIMS) - set(tensors)), sorted(set(tensors) - set(CLASS_DIMS))
    if missing or extra:
        raise ExtensionError(f"{path}: expected tensors {sorted(CLASS_DIMS)} and {KEY_VALIDATION!r}; "
                             + "; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                                         + ([f"unexpected {', '.join(extra)}"] if extra else [])))
    check_weights(path, tensors, floating=True)
    for name, dim in CLASS_DIMS.items():
        t = tensors[name]
        if t.ndim <= dim or t.shape[dim] != 1:
            raise ExtensionError(f"{path}: {name} has shape {tuple(t.shape)}; its class dim {dim} must have size 1")
    return ExtensionV2(
        path=os.fspath(path), label=label, category=meta.get(KEY_CATEGORY, "general"),
        implies=tuple(meta.get(KEY_IMPLIES, "").split()), impliedby=tuple(meta.get(KEY_IMPLIEDBY, "").split()),
        model=model, params=tensors, validation=validation, metadata=meta,
    )


def load_extensions_v2(paths: Sequence[str | os.PathLike] | None = None,
                       default_dir: str | os.PathLike | None = None) -> list[ExtensionV2]:
    """Expand paths (folders yield their `*.safetensors`, sorted) and read every file.

    Args:
        default_dir: a folder added first when it exists (upstream: `extensions/<model file stem>`).
    """
    return [read_extension_v2(p) for p in find_extensions(paths, default_dir is not None, default_dir)]


def merge_extensions_v2(model: Hydra35Model, exts: Iterable[ExtensionV2 | Extension]) -> None:
    """Merge extensions into `model` in place: replace tags that exist, append the others (in the given order).

    A replaced tag takes the extension's parameters and validation rows, and its category / implications
    where the extension states them. `impliedby` adds the extension's tag to those base labels' implies.

    Raises:
        ExtensionError: a v1 extension, a different base model, shapes that do not fit, a validation table
            of another length, or two extensions defining the same tag.
    """
    exts = list(exts)
    index = {t: i for i, t in enumerate(model.labels)}
    n_thresholds = model.validation.shape[1]
    expected = {}
    for name, dim in CLASS_DIMS.items():
        shape = list(model.net.get_parameter(name).shape)
        shape[dim] = 1
        expected[name] = tuple(shape)
    seen: dict[str, str] = {}
    new: list[ExtensionV2] = []
    for ext in exts:
        if isinstance(ext, Extension):
            raise ExtensionError(f"{ext.path}: a JTP-3 (v1) extension; Hydra 3.5 needs v2 ({IMPLEMENTATION!r})")
        if ext.model != model.title:
            raise ExtensionError(f"{ext.path}: {KEY_MODEL} is {ext.model!r}, but the model {model.path} is "
                                 f"{model.title!r}")
        if ext.label in seen:
            raise ExtensionError(f"extensions {seen[ext.label]!r} and {ext.path!r} both define tag {ext.label!r}")
        seen[ext.label] = ext.path
        wrong = {k: tuple(v.shape) for k, v in ext.params.items() if tuple(v.shape) != expected[k]}
        if wrong:
            raise ExtensionError(f"{ext.path}: shapes {wrong} do not fit this model (expected {expected})")
        if ext.validation.shape[0] != n_thresholds:
            raise ExtensionError(f"{ext.path}: {KEY_VALIDATION} has {ext.validation.shape[0]} thresholds, the "
                                 f"model's table {n_thresholds}")
        if ext.label in index:
            model.replace_tag(index[ext.label], ext.q, ext.head_weight, ext.validation.numpy(),
                              category=ext.category if KEY_CATEGORY in ext.metadata else None,
                              implies=ext.implies if KEY_IMPLIES in ext.metadata else None)
        else:
            new.append(ext)
    if new:
        model.append_tags([e.label for e in new], [e.category for e in new], [e.implies for e in new],
                          torch.cat([e.q for e in new], dim=1), torch.cat([e.head_weight for e in new], dim=0),
                          np.stack([e.validation.numpy() for e in new]))
    index = {t: i for i, t in enumerate(model.labels)}
    for ext in exts:
        for antecedent in ext.impliedby:  # a name that is not a model label has no row to extend
            i = index.get(antecedent)
            if i is not None and ext.label not in model.implies[i]:
                model.implies[i] += (ext.label,)
    model.extensions += exts


def save_extension_v2(path: str | os.PathLike, q: Tensor, head_weight: Tensor, metadata: Mapping[str, str],
                      validation: Tensor | np.ndarray) -> None:
    """Write a v2 extension file atomically, with the metadata an upstream loader needs.

    Args:
        q: (H, 1, E) the tag's queries, as the model will use them (no normalisation is applied).
        head_weight: (1, A) the tag's head row.
        metadata: at least `classifier.model` (the base model's title) and `classifier.label`; may set
            `classifier.label.category`, `.implies`, `.impliedby`, `modelspec.title` and anything else.
        validation: (n, 4) [tp, fp, tn, fn] counts; integers are written as int32, floats as float32.
    """
    for key in (KEY_MODEL, KEY_LABEL):
        if not metadata.get(key):
            raise ValueError(f"extension metadata needs {key!r}")
    if q.ndim != 3 or q.shape[1] != 1 or head_weight.ndim != 2 or head_weight.shape[0] != 1:
        raise ValueError(f"expected q (H, 1, E) and head_weight (1, A), got {tuple(q.shape)} and "
                         f"{tuple(head_weight.shape)}")
    validation = torch.as_tensor(validation)
    if validation.ndim != 2 or validation.shape[1] != 4:
        raise ValueError(f"validation must have shape (n, 4), got {tuple(validation.shape)}")
    validation = validation.to(torch.float32 if validation.is_floating_point() else torch.int32)
    meta = {
        KEY_SAI: SAI_MODEL_SPEC, KEY_IMPLEMENTATION: IMPLEMENTATION, KEY_ARCHITECTURE: ARCHITECTURE,
        KEY_TITLE: f"Hydra 3.5 extension: {metadata[KEY_LABEL]}", **metadata,
    }
    tensors = {"attn_pool.q": q.to(torch.bfloat16), "head.weight": head_weight.to(torch.bfloat16),
               KEY_VALIDATION: validation}
    save_safetensors(path, tensors, meta)
