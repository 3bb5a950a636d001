"""`Tagger`: load a model once, then tag images. The CLI, the web UI and the Ray workers all call this.

Two model families sit behind the same API, recognised from the checkpoint:
- JTP-3 Hydra (`models/jtp-3-hydra.safetensors`, 7,504 e621 tags; NaFlex patches at a sequence length);
- the DINOv3 ViT-H/16+ booru tagger (`tagger_proto.safetensors` + `tagger_vocab.json`, 74,625 tags; whole
  images with the long edge capped at `max_size`).

Two levels, as in SAM's predictor:
- friendly: `probabilities(image) -> {tag: p}` and `predict(image, topk=..., threshold=...) -> [(tag, p)]`
  (images are paths, http(s) URLs, file bytes or PIL images);
- batch: `preprocess(image) -> sample` (picklable and torch-free, run by loader workers) and
  `predict_samples(samples) -> (B, T) float32 numpy probabilities` for bulk inference and calibration.

Labels are the model's own spelling (JTP-3: e621 with underscores, before any `rewrite_tag`; DINOv3: the
vocabulary's spelling with spaces).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hydra.common import choose_dtype, default_device, log
from hydra.images.naflex import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SIZE,
    DEFAULT_SEQLEN,
    DinoV3Preprocess,
    JTP3Preprocess,
    collate,
)
from hydra.models.checkpoint import KEY_ARCHITECTURE, CheckpointError, read_metadata
from hydra.models.extensions import Extension
from hydra.models.resources import DEFAULT_MODEL

ImageSource = str | os.PathLike | bytes | Image.Image
JTP3, DINOV3 = "jtp3", "dinov3"
VOCAB_NAMES = ("tagger_vocab_with_categories.json", "tagger_vocab.json")  # looked for beside a DINOv3 file


def detect_family(checkpoint_path: str | os.PathLike, vocab_path: str | os.PathLike | None = None) -> str:
    """`jtp3` or `dinov3`, from the file (metadata or key names), or `dinov3` when a vocabulary is given."""
    path = os.fspath(checkpoint_path)
    if vocab_path is not None or path.endswith((".pt", ".pth")):
        return DINOV3
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file '{path}' does not exist")
    if read_metadata(path).get(KEY_ARCHITECTURE, "").startswith("naflexvit"):
        return JTP3
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return DINOV3 if any(k.startswith("backbone.") for k in f.keys()) else JTP3


def find_vocab(checkpoint_path: str | os.PathLike) -> str:
    """The DINOv3 vocabulary beside a checkpoint (the with-categories variant preferred)."""
    folder = Path(checkpoint_path).parent
    for name in VOCAB_NAMES:
        if (folder / name).is_file():
            return str(folder / name)
    raise FileNotFoundError(f"'{checkpoint_path}' is a DINOv3 tagger checkpoint: give its vocabulary with "
                            f"--vocab (no {' or '.join(VOCAB_NAMES)} next to it)")


class Tagger:
    """A loaded tagging model with its preprocessing.

    Args:
        checkpoint_path: model file; the family is recognised from it (default: the JTP-3 model).
        vocab_path: DINOv3 vocabulary JSON (default: `tagger_vocab*.json` beside the checkpoint).
        device: torch device; default cuda when available, else cpu.
        dtype: "bf16", "fp32", or None / "auto" (see `hydra.common.choose_dtype`). DINOv3's head stays fp32.
        seqlen: JTP-3 NaFlex sequence length (64..2048).
        max_size: DINOv3 long-edge cap in pixels (the published default 1024).
        extensions: JTP-3 extensions to merge (see `hydra.models.extensions.load_extensions`).
        max_pixels: refuse images above this many pixels before decoding (default 256 Mpx; None: no limit).
        exif, white_background: DINOv3 preprocessing fixes, off by default for parity with its script.
    """

    def __init__(self, checkpoint_path: str | os.PathLike = DEFAULT_MODEL, vocab_path: str | os.PathLike | None = None,
                 *, device: str | None = None, dtype: str | None = None, seqlen: int = DEFAULT_SEQLEN,
                 max_size: int = DEFAULT_MAX_SIZE, extensions: Sequence[Extension] | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, exif: bool = False, white_background: bool = False):
        self.device = torch.device(device or default_device())
        self.dtype, self.dtype_reason = choose_dtype(self.device, dtype)
        self.family = detect_family(checkpoint_path, vocab_path)
        self.max_pixels = max_pixels
        self.categories: dict[str, int] | None = None  # from the DINOv3 vocabulary, when it has them
        if self.family == JTP3:
            from hydra.models.jtp3_net import load_jtp3

            self.model = load_jtp3(checkpoint_path, self.device, self.dtype, list(extensions or []))
            self.labels: list[str] = self.model.labels
            self.seqlen = seqlen
        else:
            if extensions:
                raise CheckpointError("extensions are JTP-3 files; the DINOv3 tagger cannot load them")
            from hydra.models.dinov3_net import load_dinov3

            vocab_path = vocab_path or find_vocab(checkpoint_path)
            self.model, self.vocab = load_dinov3(checkpoint_path, vocab_path, self.device, self.dtype)
            self.labels = self.vocab.tags
            self.categories = self.vocab.categories
            self._dino_options = {"exif": exif, "white_background": white_background}
            self.max_size = max_size

    # -- preprocessing settings (changing one rebuilds the picklable `preprocess`) ----------------------

    @property
    def seqlen(self) -> int:
        return self._seqlen

    @seqlen.setter
    def seqlen(self, value: int) -> None:
        self._seqlen = int(value)
        if self.family == JTP3:
            self.preprocess: Callable[[ImageSource], dict[str, Any]] = JTP3Preprocess(self._seqlen, self.max_pixels)

    @property
    def max_size(self) -> int:
        return self._max_size

    @max_size.setter
    def max_size(self, value: int) -> None:
        self._max_size = int(value)
        if self.family == DINOV3:
            self.preprocess = DinoV3Preprocess(self._max_size, max_pixels=self.max_pixels, **self._dino_options)

    # -- batch level ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def predict_samples(self, samples: Sequence[dict[str, np.ndarray]], tags: np.ndarray | None = None,
                        pad_to: int | None = None) -> np.ndarray:
        """Probabilities (B, T) float32 for preprocessed samples.

        Args:
            tags: optional (T,) bool mask of the tags worth computing; the others come back as NaN.
            pad_to: JTP-3 only: pad every image to this many tokens (the original's behaviour).
        """
        index = None
        if tags is not None and not tags.all():
            index = torch.from_numpy(np.flatnonzero(tags)).to(self.device)
        logits = self._logits(samples, index, pad_to).float().sigmoid().cpu().numpy()
        if index is None:
            return logits
        out = np.full((len(samples), len(self.labels)), np.nan, dtype=np.float32)
        out[:, tags] = logits
        return out

    def _logits(self, samples: Sequence[dict[str, np.ndarray]], index: torch.Tensor | None,
                pad_to: int | None) -> torch.Tensor:
        if self.family == JTP3:
            batch = self.model.to_device_batch(collate(samples, pad_to), non_blocking=True)
            return self.model.logits(batch, index)
        # Whole images: one forward per distinct size (the published script runs them one at a time).
        out = [None] * len(samples)
        by_shape: dict[tuple, list[int]] = {}
        for i, s in enumerate(samples):
            by_shape.setdefault(s["pixels"].shape, []).append(i)
        for rows in by_shape.values():
            pixels = torch.from_numpy(np.stack([samples[i]["pixels"] for i in rows])).to(self.device)
            feats = self.model.forward_features(pixels)  # (b, F) float32
            logits = _head_rows(self.model.head, feats, index)  # (b, T')
            for j, i in enumerate(rows):
                out[i] = logits[j]
        return torch.stack(out)

    # -- friendly level ---------------------------------------------------------------------------------

    def probabilities(self, image: ImageSource) -> dict[str, float]:
        """{tag: probability} for one image (a path, URL, file bytes or a PIL image), model order."""
        probs = self.predict_samples([self.preprocess(image)])[0]
        return dict(zip(self.labels, probs.tolist()))

    def predict(self, image: ImageSource, topk: int | None = None,
                threshold: float | None = None) -> list[tuple[str, float]]:
        """Tags sorted by probability: the `topk` best, or all with p >= `threshold` (default: top 30).

        As in the DINOv3 card's API, `topk` wins when both are given; `threshold` is a probability (0..1).
        """
        probs = self.predict_samples([self.preprocess(image)])[0]
        order = np.argsort(-probs, kind="stable")
        if topk is None and threshold is None:
            topk = 30
        order = order[:topk] if topk is not None else order[probs[order] >= threshold]
        return [(self.labels[i], float(probs[i])) for i in order]

    def describe(self) -> str:
        return f"{len(self.labels)} tags on {self.device} ({self.dtype_reason})"


def _head_rows(head: torch.nn.Module, feats: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """The DINOv3 head's logits, or only the rows in `index` (same numbers, less work)."""
    if index is None:
        return head(feats)
    if isinstance(head, torch.nn.Linear):
        return F.linear(feats, head.weight[index], None if head.bias is None else head.bias[index])
    up = head.proj_up  # low-rank pair: down-project once, then only the needed rows of the up matrix
    return F.linear(head.proj_down(feats), up.weight[index], None if up.bias is None else up.bias[index])


def load_tagger(checkpoint_path: str | os.PathLike = DEFAULT_MODEL, device: str | None = None,
                **kwargs: Any) -> Tagger:
    """Load a tagger once; see `Tagger` for the keyword arguments."""
    tagger = Tagger(checkpoint_path, device=device, **kwargs)
    log(f"Loaded '{checkpoint_path}': {tagger.describe()}")
    return tagger
