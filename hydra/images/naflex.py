"""Image pipelines: decoding, and the two model families' preprocessing.

JTP-3 (spec §2): decode, colour-manage to sRGB, black background, NaFlex resize, patchify.
DINOv3 tagger (spec dinov3 §4): long edge capped, sides floored to multiples of 16, LANCZOS, ImageNet norm.

Output names follow timm's NaFlex convention from pixels to model (`patches`, `patch_coord`,
`patch_valid`). A single image is kept *unpadded* as numpy arrays: `patches` (N, 768) uint8 and
`patch_coord` (N, 2) int16 with N = gh * gw valid patches. `collate` pads a batch to its longest member
(or to a fixed length), adds `patch_valid` and returns torch tensors.

Decoding runs in loader worker processes, so this module does not import torch at import time: a worker
starts in a fraction of a second instead of several.

Shapes: N = valid patches of one image, S = padded sequence length, B = images, P = 16 * 16 * 3 = 768.
"""

from __future__ import annotations

import io
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageCms, ImageOps

PATCH_SIZE = 16
MIN_SEQLEN, MAX_SEQLEN, DEFAULT_SEQLEN = 64, 2048, 1024
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_SIZE = 1024  # DINOv3 tagger: long-edge cap of the published script
# Pillow's decompression-bomb guard (~179 Mpx) would refuse legitimate huge art (e621 has images above 100 Mpx);
# the original switched it off entirely. We switch Pillow's off and apply our own limit from the header, before
# decoding: 256 Mpx is 1 GiB as RGBA, so one decode (and a worker per core) stays comfortably in memory.
DEFAULT_MAX_PIXELS = 256 * 1024 * 1024
Image.MAX_IMAGE_PIXELS = None

if TYPE_CHECKING:
    import torch

_SRGB = None


def _srgb_profile() -> ImageCms.ImageCmsProfile:
    global _SRGB
    if _SRGB is None:
        _SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    return _SRGB


class ImageTooLarge(ValueError):
    """The image has more pixels than the configured limit (checked before decoding)."""


def is_url(source: object) -> bool:
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


def open_image(source: str | os.PathLike | bytes | Image.Image, max_pixels: int | None = None,
               exif: bool = True) -> Image.Image:
    """Open and fully decode an image; for animations and multi-page files, the first frame.

    Args:
        source: a path, an http(s) URL (fetched with a timeout and a size cap), raw file bytes, or an
            already opened PIL image.
        max_pixels: refuse images with more pixels than this, from the header, before decoding.
        exif: apply the EXIF orientation (JTP-3 does; the DINOv3 tagger's published script does not).
    """
    if is_url(source):
        from hydra.fetch import fetch_url

        source = fetch_url(source)
    if isinstance(source, Image.Image):
        img = source
    else:
        if not isinstance(source, bytes) and not stat.S_ISREG(os.stat(source).st_mode):
            raise OSError("not a regular file")  # a FIFO or device would block or never end
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb", buffering=1 << 20)
        try:
            img = Image.open(fp)
            if max_pixels and img.width * img.height > max_pixels:
                raise ImageTooLarge(f"image is {img.width}x{img.height} ({img.width * img.height / 1e6:,.0f} "
                                    f"megapixels), over the limit of {max_pixels / 1e6:,.0f} (--max-pixels)")
            img.load()
        except BaseException:
            fp.close()
            raise
        if not isinstance(source, bytes):
            fp.close()
    if exif:
        try:
            ImageOps.exif_transpose(img, in_place=True)
        except Exception:  # corrupt EXIF: the original ignores it, so do we
            pass
    return img


def to_srgb(img: Image.Image) -> Image.Image:
    """Convert an embedded ICC profile to sRGB, as the original's `process_srgb` does (spec §2.1 step 4).

    Any failure leaves the image as it is (images without a profile are assumed to be sRGB already).
    """
    icc = img.info.get("icc_profile")
    if not icc:
        return img
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        alpha = img.has_transparency_data
        mode = img.mode
        if mode.startswith(("RGB", "BGR", "P")):
            work = "RGBA" if alpha else "RGB"
        elif mode.startswith(("L", "I", "F")) or mode == "1":
            work = "LA" if alpha else "L"
        else:
            work = mode  # CMYK and friends convert directly
        if work != mode:
            img = img.convert(work)
        out_mode = "RGBA" if alpha else "RGB"
        intent = ImageCms.getDefaultIntent(profile)
        if ImageCms.isIntentSupported(profile, ImageCms.Intent.RELATIVE_COLORIMETRIC, ImageCms.Direction.INPUT):
            intent = ImageCms.Intent.RELATIVE_COLORIMETRIC
        flags = {
            ImageCms.Intent.RELATIVE_COLORIMETRIC:
                ImageCms.Flags.HIGHRESPRECALC | ImageCms.Flags.BLACKPOINTCOMPENSATION,
            ImageCms.Intent.PERCEPTUAL: ImageCms.Flags.HIGHRESPRECALC,
            ImageCms.Intent.ABSOLUTE_COLORIMETRIC: ImageCms.Flags.HIGHRESPRECALC,
        }[intent]  # SATURATION is unsupported upstream: KeyError -> left as is
        converted = ImageCms.profileToProfile(img, profile, _srgb_profile(), renderingIntent=intent,
                                              outputMode=out_mode, flags=flags)
        return converted if converted is not None else img
    except Exception:
        return img


def to_black_background(img: Image.Image) -> Image.Image:
    """RGB, or premultiplied `RGBa` when there is transparency (so transparent areas become black)."""
    if img.has_transparency_data:
        try:
            return img.convert("RGBa")
        except ValueError:
            return img.convert("RGBA").convert("RGBa")
    return img if img.mode == "RGB" else img.convert("RGB")


def size_for_seqlen(height: int, width: int, seqlen: int, patch: int = PATCH_SIZE) -> tuple[int, int]:
    """Largest (height, width), multiples of `patch`, whose patch count fits `seqlen` (spec §2.2).

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


def prepare_image(img: Image.Image, seqlen: int) -> np.ndarray:
    """Decoded image -> (H, W, 3) uint8 sRGB on black, resized for `seqlen` (spec §2.1 steps 4-7)."""
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


# ---------------------------------------------------------------------------------------------------------
# DINOv3 tagger


def _floor16(x: int) -> int:
    return x // PATCH_SIZE * PATCH_SIZE


def snap_size(width: int, height: int, max_size: int = DEFAULT_MAX_SIZE) -> tuple[int, int]:
    """Input size the published DINOv3 script feeds for a `width` x `height` image (spec dinov3 §4).

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
    """Image -> `{"pixels": (3, H, W) float32}` numpy, as the published DINOv3 script (spec dinov3 §4).

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
