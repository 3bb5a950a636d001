"""Loading JTP-3 (backbone + Hydra head) from its safetensors file, and running it on patch batches.

The real `models/jtp-3-hydra.safetensors` (bf16, 336 tensors) loads with a strict key and shape match.
The model is built on the meta device (no random init, spec §1.5, §15.3) and the file's tensors are
assigned into it: in the stored dtype they are copy-on-write memory maps of the file, so loading takes
~0.3 s and no second copy of the weights ever exists (the original's way peaks at ~2x the weights); the
pages are read on first use and shared with the OS file cache. A cast (fp32 on CPUs without native bf16)
reads tensor by tensor, so the peak stays ~ the cast weights (hydra/checkpoint.py::load_tensors).

Shape legend: B = images, S = tokens (padded), D = backbone width, T = tags, P = 768 patch values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from timm.models.naflexvit import NaFlexVit
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
from hydra.models.head import HydraCfg, HydraPool
from hydra.models.resources import DEFAULT_MODEL


@dataclass
class JTP3Model:
    """A loaded JTP-3 network with its labels (model order, e621 spelling)."""

    net: NaFlexVit                   # timm backbone whose `attn_pool` is the HydraPool
    labels: list[str]
    path: str
    metadata: dict[str, str]
    extensions: list[Extension] = field(default_factory=list)

    @property
    def head(self) -> HydraPool:
        return self.net.attn_pool

    @property
    def device(self) -> torch.device:
        return self.net.embeds.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.embeds.proj.weight.dtype

    @property
    def depth(self) -> int:
        return len(self.net.blocks)

    def to_device_batch(self, batch: dict[str, Tensor], non_blocking: bool = False) -> dict[str, Tensor]:
        """Move a collated uint8 batch to the device and normalise pixels to [-1, 1] in the run dtype.

        On CUDA the host tensors are pinned first, so `non_blocking` copies really overlap with the GPU's
        work (from pageable memory they are synchronous). Pixels travel as uint8 (4x less than fp32).
        """
        dev = self.device
        padded = not bool(batch["patch_valid"].all())  # decided on the host: no device sync
        if dev.type == "cuda":
            batch = {k: v.pin_memory() for k, v in batch.items()}
        patches = batch["patches"].to(dev, non_blocking=non_blocking)
        # The release computes (x / 127.5) - 1 in the activation dtype; same ops, same rounding.
        patches = patches.to(self.dtype).div_(127.5).sub_(1.0)  # (B, S, P)
        return {
            "patches": patches,
            "patch_coord": batch["patch_coord"].to(dev, non_blocking=non_blocking).int(),  # (B, S, 2)
            # No padding anywhere: pass no mask at all (faster attention, identical numbers).
            "patch_valid": batch["patch_valid"].to(dev, non_blocking=non_blocking) if padded else None,
        }

    def features(self, batch: dict[str, Tensor]) -> Tensor:
        """Final-LayerNorm token features (B, S, D) for a device batch from `to_device_batch`."""
        out = self.net.forward_features(batch["patches"], patch_coord=batch["patch_coord"],
                                        patch_valid=batch["patch_valid"])
        return out["patches"]

    def logits(self, batch: dict[str, Tensor], tags: Tensor | None = None) -> Tensor:
        """Logits (B, T) (or (B, len(tags))) in the run dtype."""
        return self.head(self.features(batch), batch["patch_valid"], tags)


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
    return JTP3Model(net=net, labels=labels, path=os.fspath(path), metadata=meta, extensions=list(extensions or []))
