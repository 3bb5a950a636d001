"""What the NaFlex models (JTP-3, Hydra 3.5) share at run time: device batches, backbone features, logits.

Both run timm's SigLIP2 So400m/16 NaFlex backbone on unpadded samples of 16 x 16 patches (see
`hydra/images/naflex.py`), padded per batch to its longest member, then a per-tag pool and head
(`attn_pool`). A subclass provides `head_logits`, the part after the backbone; the CAM uses it too.

Shape legend: B = images, S = tokens (padded), D = backbone width, T = tags, P = 768 patch values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from timm.models.naflexvit import NaFlexVit
from torch import Tensor

from hydra.images.naflex import collate


@dataclass
class NaFlexTagModel:
    """A loaded NaFlex tagger: the timm backbone (with its pool and head attached) and its labels."""

    net: NaFlexVit                   # timm backbone; `attn_pool` (and for some families `head`) are ours
    labels: list[str]                # model order, the file's spelling
    path: str
    metadata: dict[str, str]
    extensions: list[Any] = field(default_factory=list)

    info = ()  # the model file says it all

    @property
    def title(self) -> str | None:
        return self.metadata.get("modelspec.title")

    @property
    def device(self) -> torch.device:
        return self.net.embeds.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.embeds.proj.weight.dtype

    @property
    def depth(self) -> int:
        return len(self.net.blocks)

    @property
    def cam_depth(self) -> int:
        return self.depth

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
        # Both releases compute (x / 127.5) - 1 in the activation dtype, in place: the same two roundings.
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

    def head_logits(self, x: Tensor, patch_valid: Tensor | None, tags: Tensor | None = None) -> Tensor:
        """Logits (B, T) (or (B, len(tags))) from backbone token features x (B, S, D)."""
        raise NotImplementedError

    def logits(self, batch: dict[str, Tensor], tags: Tensor | None = None) -> Tensor:
        """Logits (B, T) (or (B, len(tags))) in the run dtype for a device batch."""
        return self.head_logits(self.features(batch), batch["patch_valid"], tags)

    def sample_logits(self, samples: Sequence[dict[str, np.ndarray]], tags: Tensor | None = None,
                      pad_to: int | None = None) -> Tensor:
        """Logits for unpadded samples, batched to the longest one (or to `pad_to` tokens)."""
        return self.logits(self.to_device_batch(collate(samples, pad_to), non_blocking=True), tags)
