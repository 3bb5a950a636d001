"""The NaFlex pipeline of JTP-3 (Pillow): colour-manage to sRGB, black background, resize to a patch budget,
patchify; and the batching every NaFlex model shares (`collate`).

JTP-3's steps: decode (EXIF orientation applied), convert an embedded ICC profile to sRGB, premultiply
transparency onto black, resize with LANCZOS (reducing gap 3) to the largest size whose 16 px patch grid fits
the sequence length (`size_for_seqlen`, never upscaling), cut into patches.

Output names follow timm's NaFlex convention from pixels to model (`patches`, `patch_coord`,
`patch_valid`). A single image is kept *unpadded* as numpy arrays: `patches` (N, 768) uint8 and
`patch_coord` (N, 2) int16 with N = gh * gw valid patches. `collate` pads a batch to its longest member
(or to a fixed length), adds `patch_valid` and returns torch tensors.

Decoding runs in loader worker processes, so this module does not import torch at import time: a worker
starts in a fraction of a second instead of several.

Shapes: N = valid patches of one image, S = padded sequence length, B = images, P = 16 * 16 * 3 = 768.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from hydra.images.decode import open_image, to_srgb

PATCH_SIZE = 16        # pixels per patch side, for every model family here
DEFAULT_SEQLEN = 1024  # tokens per image JTP-3 and Hydra 3.5 were trained with

if TYPE_CHECKING:
    import torch


def to_black_background(img: Image.Image) -> Image.Image:
    """RGB, or premultiplied `RGBa` when there is transparency (so transparent areas become black)."""
    if img.has_transparency_data:
        try:
            return img.convert("RGBa")
        except ValueError:
            return img.convert("RGBA").convert("RGBa")
    return img if img.mode == "RGB" else img.convert("RGB")


def size_for_seqlen(height: int, width: int, seqlen: int, patch: int = PATCH_SIZE) -> tuple[int, int]:
    """Largest (height, width), multiples of `patch`, whose patch count fits `seqlen` (docs/preprocessing.md).

    Never upscales (except sides under one patch become one patch); the aspect ratio is kept approximately
    by a binary search over the scale factor, exactly as the original's `get_image_size_for_seq`.
    """
    eps = 1e-5
    max_py, max_px = max(height // patch, 1), max(width // patch, 1)
    if max_py * max_px <= seqlen:
        return max_py * patch, max_px * patch

    def patchify(r: float) -> tuple[int, int]:
        return min(math.ceil(height * r / patch), max_py), min(math.ceil(width * r / patch), max_px)

    py, px = patchify(eps)
    if py * px > seqlen:
        raise ValueError(f"Image of size {width}x{height} is too large.")
    lo, hi = eps, 1.0
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        my, mx = patchify(mid)
        if my * mx > seqlen:
            hi = mid
        else:
            lo, py, px = mid, my, mx
            if my * mx == seqlen:
                break
    return py * patch, px * patch


@dataclass(frozen=True)
class JTP3Preprocess:
    """Picklable image -> sample function for JTP-3 (used in-process and by loader workers).

    Returns {"patches": (N, 768) uint8, "patch_coord": (N, 2) int16} numpy arrays, unpadded.
    """

    seqlen: int = DEFAULT_SEQLEN
    max_pixels: int | None = None

    def __call__(self, source: str | os.PathLike | bytes | Image.Image) -> dict[str, np.ndarray]:
        img = open_image(source, self.max_pixels)
        return patchify(prepare_image(img, self.seqlen))

    @staticmethod
    def tokens(sample: dict[str, np.ndarray]) -> int:
        """Tokens the model runs for this sample (its valid patches)."""
        return len(sample["patches"])


def prepare_image(img: Image.Image, seqlen: int) -> np.ndarray:
    """Decoded image -> (H, W, 3) uint8 sRGB on black, resized for `seqlen` (ICC, alpha, resize, RGB)."""
    img = to_black_background(to_srgb(img))
    h, w = size_for_seqlen(img.height, img.width, seqlen)
    if (w, h) != img.size:
        img = img.resize((w, h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    arr = np.asarray(img)
    return arr[:, :, :3] if arr.shape[2] > 3 else arr  # RGBa: the premultiplied colour channels


def patchify(arr: np.ndarray, patch: int = PATCH_SIZE) -> dict[str, np.ndarray]:
    """(H, W, 3) uint8 -> row-major 16x16 patches flattened (row, col, channel), with (y, x) coords."""
    h, w, c = arr.shape
    gh, gw = h // patch, w // patch
    tiles = arr.reshape(gh, patch, gw, patch, c).transpose(0, 2, 1, 3, 4)  # (gh, gw, p, p, 3)
    patches = np.ascontiguousarray(tiles).reshape(gh * gw, patch * patch * c)  # (N, 768)
    ys, xs = np.meshgrid(np.arange(gh, dtype=np.int16), np.arange(gw, dtype=np.int16), indexing="ij")
    coord = np.stack([ys.reshape(-1), xs.reshape(-1)], axis=1)  # (N, 2)
    return {"patches": patches, "patch_coord": coord}


def collate(samples: Sequence[dict[str, np.ndarray]], pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Stack unpadded samples into a batch padded to the longest member (or to `pad_to`).

    Returns:
        patches (B, S, 768) uint8 (zero padding), patch_coord (B, S, 2) int16 (zero padding),
        patch_valid (B, S) bool.
    """
    import torch

    lengths = [s["patches"].shape[0] for s in samples]
    seq = max(lengths) if pad_to is None else pad_to
    assert seq >= max(lengths), (seq, lengths)
    b, p = len(samples), samples[0]["patches"].shape[1]
    patches = torch.zeros(b, seq, p, dtype=torch.uint8)  # (B, S, 768)
    coord = torch.zeros(b, seq, 2, dtype=torch.int16)  # (B, S, 2)
    valid = torch.zeros(b, seq, dtype=torch.bool)  # (B, S)
    for i, (s, n) in enumerate(zip(samples, lengths)):
        patches[i, :n].numpy()[...] = s["patches"]  # copy through numpy: inputs may be read-only views
        coord[i, :n].numpy()[...] = s["patch_coord"]
        valid[i, :n] = True
    return {"patches": patches, "patch_coord": coord, "patch_valid": valid}


def unpatchify(values: torch.Tensor, coord: torch.Tensor) -> torch.Tensor:
    """Scatter per-patch values (N,) back onto their (gh, gw) grid (used for CAM overlays)."""
    gh, gw = int(coord[:, 0].max()) + 1, int(coord[:, 1].max()) + 1
    grid = values.new_zeros(gh, gw)
    grid[coord[:, 0].long(), coord[:, 1].long()] = values
    return grid
