"""`Tagger`: load a model once, then tag PIL images or files. The CLI and the web UI both call this.

Two levels, as in SAM's predictor:
- friendly: `probabilities(image) -> {tag: p}` and `predict(image, topk=..., threshold=...) -> [(tag, p)]`;
- batch: `preprocess(image) -> sample` (picklable, also run by loader workers) and
  `predict_samples(samples) -> (B, T) float32 numpy probabilities` for bulk inference and calibration.

Labels are the model's own spelling (e621, underscores, before any `rewrite_tag`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .common import choose_dtype, default_device, log
from .extensions import Extension
from .image import DEFAULT_SEQLEN, JTP3Preprocess, collate
from .model import JTP3Model, load_jtp3
from .resources import DEFAULT_MODEL

ImageSource = str | os.PathLike | bytes | Image.Image


class Tagger:
    """A loaded tagging model with its preprocessing.

    Args:
        checkpoint_path: model file (default `models/jtp-3-hydra.safetensors`).
        device: torch device; default cuda when available, else cpu.
        dtype: "bf16", "fp32", or None / "auto" (see `hydra.common.choose_dtype`).
        seqlen: NaFlex sequence length for JTP-3 (64..2048).
        extensions: extensions to merge (already read, see `hydra.extensions.load_extensions`).
        max_pixels: refuse images above this many pixels before decoding (None: no limit).
    """

    family = "jtp3"

    def __init__(self, checkpoint_path: str | os.PathLike = DEFAULT_MODEL, *, device: str | None = None,
                 dtype: str | None = None, seqlen: int = DEFAULT_SEQLEN,
                 extensions: Sequence[Extension] | None = None, max_pixels: int | None = None):
        self.device = torch.device(device or default_device())
        self.dtype, self.dtype_reason = choose_dtype(self.device, dtype)
        self.model: JTP3Model = load_jtp3(checkpoint_path, self.device, self.dtype, list(extensions or []))
        self.labels: list[str] = self.model.labels
        self.max_pixels = max_pixels
        self.seqlen = seqlen

    @property
    def seqlen(self) -> int:
        return self._seqlen

    @seqlen.setter
    def seqlen(self, value: int) -> None:
        self._seqlen = int(value)
        self.preprocess: Callable[[ImageSource], dict[str, Any]] = JTP3Preprocess(self._seqlen, self.max_pixels)

    def collate(self, samples: Sequence[dict[str, torch.Tensor]], pad_to: int | None = None) -> dict:
        return collate(samples, pad_to)

    @torch.inference_mode()
    def predict_samples(self, samples: Sequence[dict[str, torch.Tensor]], tags: np.ndarray | None = None,
                        pad_to: int | None = None) -> np.ndarray:
        """Probabilities (B, T) float32 for preprocessed samples.

        Args:
            tags: optional (T,) bool mask of the tags worth computing; the others come back as NaN.
            pad_to: pad every image to this many tokens (the original's behaviour) instead of the longest.
        """
        batch = self.model.to_device_batch(self.collate(samples, pad_to), non_blocking=True)
        if tags is None or tags.all():
            return self.model.logits(batch).float().sigmoid().cpu().numpy()
        index = torch.from_numpy(np.flatnonzero(tags)).to(self.device)
        out = np.full((len(samples), len(self.labels)), np.nan, dtype=np.float32)
        out[:, tags] = self.model.logits(batch, index).float().sigmoid().cpu().numpy()
        return out

    def probabilities(self, image: ImageSource) -> dict[str, float]:
        """{tag: probability} for one image (a path, file bytes or a PIL image), model order."""
        probs = self.predict_samples([self.preprocess(image)])[0]
        return dict(zip(self.labels, probs.tolist()))

    def predict(self, image: ImageSource, topk: int | None = None,
                threshold: float | None = None) -> list[tuple[str, float]]:
        """Tags sorted by probability: the `topk` best, or all with p >= `threshold` (default top 30)."""
        probs = self.predict_samples([self.preprocess(image)])[0]
        order = np.argsort(-probs, kind="stable")
        if topk is None and threshold is None:
            topk = 30
        if topk is not None:
            order = order[:topk]
        else:
            order = order[probs[order] >= threshold]
        return [(self.labels[i], float(probs[i])) for i in order]

    def describe(self) -> str:
        return f"{len(self.labels)} tags on {self.device} ({self.dtype_reason})"


def load_tagger(checkpoint_path: str | os.PathLike = DEFAULT_MODEL, device: str | None = None,
                **kwargs: Any) -> Tagger:
    """Load a tagger once; see `Tagger` for the keyword arguments."""
    tagger = Tagger(checkpoint_path, device=device, **kwargs)
    log(f"Loaded '{checkpoint_path}': {tagger.describe()}")
    return tagger
