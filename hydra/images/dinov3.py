"""The DINOv3 tagger's preprocessing, as its published script does it (Pillow, torch-free).

The long edge is capped at `max_size` (never upscaled) and floored to a multiple of 16; the other side is
scaled by the same factor, rounded half-to-even, floored to a multiple of 16 (at least 16); LANCZOS; RGB with
alpha dropped; ImageNet mean/std in float32, in torchvision's operation order. No EXIF orientation. `exif` and
`white_background` fix the script's two sharp edges, off by default for parity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from hydra.images.decode import open_image
from hydra.images.naflex import PATCH_SIZE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_SIZE = 1024  # long-edge cap of the published script


def _floor16(x: int) -> int:
    return x // PATCH_SIZE * PATCH_SIZE


def snap_size(width: int, height: int, max_size: int = DEFAULT_MAX_SIZE) -> tuple[int, int]:
    """Input size the published DINOv3 script feeds for a `width` x `height` image (docs/preprocessing.md).

    The long edge is capped at `max_size` (never upscaled) and floored to a multiple of 16; the other side
    is scaled by the same factor, rounded, then floored to a multiple of 16 independently (min 16).

    Returns:
        (new_width, new_height), both multiples of 16.
    """
    long_edge = max(width, height)
    scale = _floor16(min(long_edge, max_size)) / long_edge
    # Python's round() (half to even) is what the published script uses
    return _floor16(max(PATCH_SIZE, round(width * scale))), _floor16(max(PATCH_SIZE, round(height * scale)))


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


@dataclass(frozen=True)
class DinoV3Preprocess:
    """Image -> `{"pixels": (3, H, W) float32}` numpy, as the published DINOv3 script.

    Picklable and torch-free (it runs in loader workers). Animated images use their first frame.

    Attributes:
        max_size: cap on the long edge in pixels (the published default 1024; the card trained at 512).
        exif: apply the EXIF orientation first (off in the published script, which ignores it).
        white_background: composite transparency onto white instead of dropping alpha (the published
            script's `.convert("RGB")` keeps whatever colour transparent pixels store, often black).
        max_pixels: refuse images with more pixels than this before decoding (None: no limit).
    """

    max_size: int = DEFAULT_MAX_SIZE
    exif: bool = False
    white_background: bool = False
    max_pixels: int | None = None

    def __post_init__(self):
        if not isinstance(self.max_size, int) or self.max_size < PATCH_SIZE:
            raise ValueError(f"max_size must be an integer >= {PATCH_SIZE}, got {self.max_size!r}")

    def __call__(self, source: str | os.PathLike | bytes | Image.Image) -> dict[str, np.ndarray]:
        if isinstance(source, Image.Image):
            image = source
            if getattr(image, "is_animated", False) and image.tell() != 0:
                image.seek(0)  # first frame of animations, like Image.open() + convert() upstream
            if self.exif:
                image = ImageOps.exif_transpose(image)
        else:
            image = open_image(source, self.max_pixels, exif=self.exif)
        if self.white_background and _has_alpha(image):
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        image = image.convert("RGB")
        # The published script resizes with torchvision's v2 Resize, which on a PIL image is exactly
        # Image.resize((w, h), LANCZOS) (tested in tests/test_dinov3.py).
        image = image.resize(snap_size(*image.size, self.max_size), Image.Resampling.LANCZOS)
        # float32 throughout, in torchvision's op order (x * (1/255), - mean, / std): the same bits
        pixels = np.asarray(image, dtype=np.float32) * np.float32(1.0 / 255)  # (H, W, 3)
        pixels = (pixels - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
        return {"pixels": np.ascontiguousarray(pixels.transpose(2, 0, 1))}  # (3, H, W)

    @staticmethod
    def tokens(sample: dict[str, np.ndarray]) -> int:
        """Tokens the model runs for this sample: its 16 px patches."""
        h, w = sample["pixels"].shape[-2:]
        return (h // PATCH_SIZE) * (w // PATCH_SIZE)
