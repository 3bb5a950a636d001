"""Loading JTP-3 (backbone + Hydra head) from its safetensors file, and running it on patch batches.

The real `models/jtp-3-hydra.safetensors` (bf16, 336 tensors) loads with a strict key and shape match.
The model is built on the meta device (no random init, which costs seconds; see backbone.py) and the file's
tensors are assigned into it: in the stored dtype they are copy-on-write memory maps of the file, so loading takes
~0.3 s and no second copy of the weights ever exists (the original's way peaks at ~2x the weights); the
pages are read on first use and shared with the OS file cache. A cast (fp32 on CPUs without native bf16)
reads tensor by tensor, so the peak stays ~ the cast weights (hydra/models/checkpoint.py::load_tensors).
The head's folded weights (ff_out x out_proj, hydra/models/head.py) are built once, after the extensions are
merged and the model is on its device: ~0.5 s and 184 MB on a 2-core CPU (`HYDRA_NO_FOLD=1`: none).

Shape legend: B = images, S = tokens (padded), D = backbone width, T = tags, P = 768 patch values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from hydra.models.backbone import create_backbone
from hydra.models.checkpoint import (
    KEY_LABELS,
    CheckpointError,
    check_architecture,
    check_state,
    load_tensors,
    parse_backbone_overrides,
)
from hydra.models.extensions import Extension, merge_extensions
from hydra.models.head import HydraCfg, HydraPool, fold_enabled
from hydra.models.naflex import NaFlexTagModel
from hydra.models.resources import DEFAULT_MODEL


@dataclass
class JTP3Model(NaFlexTagModel):
    """A loaded JTP-3 network: the backbone whose `attn_pool` is the Hydra head, and its labels."""

    tag_metadata: None = None  # categories and implications come from the tags CSV, not from the file

    @property
    def head(self) -> HydraPool:
        return self.net.attn_pool

    def head_logits(self, x: Tensor, patch_valid: Tensor | None, tags: Tensor | None = None) -> Tensor:
        return self.head(x, patch_valid, tags)


def load_jtp3(path: str | os.PathLike = DEFAULT_MODEL, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.bfloat16, extensions: list[Extension] | None = None) -> JTP3Model:
    """Load a JTP-3 model file strictly, merge extensions, and move it to `device` in eval mode.

    Raises:
        CheckpointError: wrong architecture, missing labels, or missing / extra / mis-shaped tensors.
    """
    tensors, meta = load_tensors(path, dtype=dtype)
    check_architecture(path, meta)
    if "attn_pool.q" not in tensors:
        raise CheckpointError(f"{path}: missing tensor 'attn_pool.q' (not a JTP-3 Hydra model?)")
    try:
        head_cfg = HydraCfg.from_state(tensors)
    except (KeyError, ValueError, AssertionError) as e:
        raise CheckpointError(f"{path}: Hydra head tensors are incomplete or inconsistent ({e})") from None
    labels = meta.get(KEY_LABELS, "").split("\n") if meta.get(KEY_LABELS) else []
    if len(labels) != head_cfg.n_tags:
        raise CheckpointError(f"{path}: metadata {KEY_LABELS} lists {len(labels)} tags but the head has "
                              f"{head_cfg.n_tags}")
    if len(set(labels)) != len(labels) or not all(labels):
        dupes = sorted({t for t in labels if labels.count(t) > 1}) if len(set(labels)) != len(labels) else []
        raise CheckpointError(f"{path}: metadata {KEY_LABELS} has empty or repeated tags {dupes[:5]}")

    try:
        net = create_backbone(parse_backbone_overrides(path, meta), device="meta", dtype=dtype)
    except (TypeError, ValueError, AssertionError) as e:
        raise CheckpointError(f"{path}: bad backbone settings in metadata ({e})") from None
    net.attn_pool = HydraPool(head_cfg, device="meta", dtype=dtype)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    check_state(path, tensors, expected)
    net.load_state_dict(tensors, strict=True, assign=True)
    del tensors
    net.requires_grad_(False).eval()

    if extensions:
        labels = merge_extensions(net.attn_pool, labels, extensions, meta.get("modelspec.architecture", ""))
    net.to(device)
    net.attn_pool.fold = fold_enabled()  # derived weights, once, on the device (hydra/models/head.py)
    net.attn_pool.folded_weights()
    return JTP3Model(net=net, labels=labels, path=os.fspath(path), metadata=meta, extensions=list(extensions or []))
