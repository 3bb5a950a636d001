"""The Hydra 3.5 image pipeline, done with libvips (pyvips) as the original does, not with Pillow.

Hydra 3.5 keeps JTP-3's patch budget and patch layout (`size_for_seqlen`, `patchify` in `naflex.py`) but
prepares pixels differently, and a model trained on one set of pixels should be fed the same. The steps and
the facts they rely on:

1. Decode with libvips, first page or frame only, sniffing the format from the data (not the file name).
   libvips' operation cache is switched off for the whole process (the original does the same): with one
   image after another, a cache only holds memory.
2. The *displayed* size decides the target: EXIF orientations 5-8 are a quarter turn, so width and height
   swap before `size_for_seqlen`, and the resize below uses the swapped target.
3. Colour: `icc_transform` to sRGB with the embedded profile, or without one libvips' default profile for
   the image's interpretation (sRGB passes through unchanged, CMYK goes through libvips' built-in CMYK
   profile, grey through a grey profile); relative intent, black point compensation, 8-bit output. A
   16-bit image is scaled to 8 bits, not clipped: 16-bit grey with values 0..1023 becomes 0..4, nearly
   black (JTP-3's Pillow path clips the same image to white). An unusable embedded profile is ignored
   by libvips in favour of the default.
4. Transparency (RGBA, grey + alpha, palette with a transparent entry) is flattened onto a solid colour,
   black 0, grey 127 or white 255 (the model file's `classifier.background`; Hydra 3.5 itself uses
   white), *before* the resize.
5. Resize only when the size changes, with libvips' `resize` and a reduction gap of 3 (an integer
   pre-shrink while the image is over 3x the target, then the kernel). The kernel is the model file's
   `classifier.resize`: `lanczos` is LANCZOS3 on the sRGB values; `mks2013-linear` (Hydra 3.5's) is
   Magic Kernel Sharp 2013 in linear light: the 8-bit codes go through a 256-entry table to 16-bit linear
   values, the resize runs in 16 bits, and a 65,536-entry table brings the result back to 8-bit sRGB.
6. The EXIF orientation (`autorot`, mirrored orientations included) is applied last, on the small image.
7. The result is 3-band 8-bit RGB (grey repeated), cut into patches exactly as for JTP-3, so `collate`
   and the model code take it unchanged.

The sRGB curve in 8-bit units used by the tables: code c is linear c / 12.92 up to c = 10, and
((c + 14.025) / 269.025) ** 2.4 above, with 269.025 = 1.055 * 255 and 14.025 = 0.055 * 255; the way back
is linear up to the 16-bit value 205. Both tables round to the nearest integer, and the back table returns
every one of the 256 codes exactly.

Where we go beyond the original, for safety: only regular files are opened; the pixel count is checked
from the header before any decoding (libvips loads lazily); truncated or damaged data raises instead of
decoding to grey (`fail_on="error"`); only raster photo/art formats are accepted (no SVG rendering, no
matrix/CSV text files as images); every failure raises with a one-line message. The image is streamed
(`access="sequential"`), so a huge file is never held whole in memory; the small resized image is copied
to memory before the rotation, which needs random access.

This module does not import torch: loader worker processes import it.

Shapes: H, W = image height and width after resizing, N = patches of one image, P = 16 * 16 * 3 = 768.
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyvips
from PIL import Image

from hydra.images.decode import ImageTooLarge, UnreadableImage, is_url
from hydra.images.naflex import DEFAULT_SEQLEN, patchify, size_for_seqlen

# One image after another never reuses an operation, so libvips' cache would only hold memory
# (and open files) until it filled up.
pyvips.cache_set_max(0)

BACKGROUNDS = {"black": 0, "grey": 127, "white": 255}  # `classifier.background` -> flatten colour
KERNELS = {"lanczos": "lanczos3", "mks2013-linear": "mks2013"}  # `classifier.resize` -> libvips kernel
LINEAR_RESIZES = frozenset({"mks2013-linear"})  # resized in 16-bit linear light through the tables
GAP = 3.0  # libvips' reduction gap, as the original
# libvips loaders we accept (the `vips-loader` field, minus "_source"/"_buffer"); JPEG XL needs a libvips
# built with libjxl (the pyvips-binary wheel has none). SVG/PDF rendering, ImageMagick and the text/raw
# formats are refused: this is a tagger for raster art, and it reads untrusted uploads.
LOADERS = ("jpegload", "pngload", "webpload", "gifload", "tiffload", "heifload", "jxlload")
_TRUNCATED = ("premature end", "truncated", "unexpected end", "end of file", "not enough data", "short read")


def _srgb_to_linear16() -> np.ndarray:
    c = np.arange(256, dtype=np.float64)
    linear = np.where(c <= 10, c * 257 / 12.92, ((c + 14.025) / 269.025) ** 2.4 * 65535)
    return np.rint(linear).astype(np.uint16)  # (256,)


def _linear16_to_srgb() -> np.ndarray:
    v = np.arange(65536, dtype=np.float64)
    code = np.where(v <= 205, v * 12.92 / 257, (v / 65535) ** (1 / 2.4) * 269.025 - 14.025)
    return np.rint(code).clip(0, 255).astype(np.uint8)  # (65536,)


SRGB_TO_LINEAR16 = _srgb_to_linear16()  # (256,) uint16: 8-bit sRGB code -> 16-bit linear light
LINEAR16_TO_SRGB = _linear16_to_srgb()  # (65536,) uint8: 16-bit linear light -> 8-bit sRGB code


@functools.cache
def _lut_images() -> tuple[pyvips.Image, pyvips.Image]:
    """The two tables as 1-row libvips images, for `maplut` (built once per process)."""
    return (pyvips.Image.new_from_array(SRGB_TO_LINEAR16.reshape(1, -1)),
            pyvips.Image.new_from_array(LINEAR16_TO_SRGB.reshape(1, -1)))


def _reason(e: pyvips.Error, default: str) -> str:
    """The first line of libvips' error detail without the operation name in front, else `default`."""
    lines = [line.strip() for line in str(e.detail or "").splitlines() if line.strip()]
    if not lines:
        return default  # e.g. "unable to call VipsForeignLoadPngSource" alone says nothing to a user
    head, sep, rest = lines[0].partition(": ")
    text = rest if sep and rest and " " not in head else lines[0]  # "VipsJpeg: premature end" -> "premature end"
    return text if len(text) <= 100 else text[:97] + "..."


def _decode_error(e: pyvips.Error) -> UnreadableImage:
    reason = _reason(e, "unknown error")
    if any(word in reason.lower() for word in _TRUNCATED):
        return UnreadableImage("the image file is truncated")
    return UnreadableImage(f"the image data is damaged or truncated ({reason})")


def _orientation(image: pyvips.Image) -> int:
    return image.get("orientation") if image.get_typeof("orientation") else 1


def pil_to_vips(img: Image.Image) -> pyvips.Image:
    """A PIL image as a libvips image, without loss, keeping its ICC profile and EXIF orientation.

    Animations give their first frame (the image is seeked to it). Palette images become RGB(A), 1-bit
    becomes grey, 16-bit grey (`I;16*`, or `I` as older Pillow opens 16-bit PNGs, clipped to 0..65535)
    stays 16-bit. Modes libvips has no match for (float, YCbCr, LAB, HSV, premultiplied) go through
    Pillow's conversion to RGB(A).
    """
    if getattr(img, "is_animated", False) and img.tell() != 0:
        img.seek(0)
    try:
        orientation = int(img.getexif().get(0x0112, 1))
    except Exception:  # corrupt EXIF: no orientation, as libvips treats it
        orientation = 1
    icc = img.info.get("icc_profile")
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img)
        arr = arr.clip(0, 65535).astype(np.uint16) if mode == "I" else arr.astype(np.uint16)  # (H, W)
        interpretation = "grey16"
    else:
        if mode == "1":
            img = img.convert("L")
        elif mode in ("L", "RGB") and img.has_transparency_data:  # a tRNS colour key
            img = img.convert("LA" if mode == "L" else "RGBA")
        elif mode not in ("L", "LA", "RGB", "RGBA", "CMYK"):
            img = img.convert("RGBA" if img.has_transparency_data else "RGB")
        arr = np.asarray(img)  # (H, W) or (H, W, bands)
        interpretation = {"L": "b-w", "LA": "b-w", "CMYK": "cmyk"}.get(img.mode, "srgb")
    image = pyvips.Image.new_from_array(np.ascontiguousarray(arr), interpretation=interpretation).copy()
    if icc:
        image.set_type(pyvips.GValue.blob_type, "icc-profile-data", icc)
    if orientation != 1:
        image.set_type(pyvips.GValue.gint_type, "orientation", orientation)
    return image


def open_vips(source: str | os.PathLike | bytes | Image.Image, max_pixels: int | None = None) -> pyvips.Image:
    """Open an image lazily with libvips (header read, pixels not yet decoded).

    Args:
        source: a path, an http(s) URL (fetched with a timeout and a size cap), raw file bytes, or a PIL
            image (converted without loss by `pil_to_vips`).
        max_pixels: refuse files with more pixels than this, from the header, before decoding (a PIL image
            is already decoded and is not checked).

    Returns:
        The first page or frame, for sequential reading.

    Raises:
        OSError: not a regular file (a FIFO or device would block); FileNotFoundError if missing.
        UnreadableImage: not a format we read, or a damaged header.
        ImageTooLarge: over `max_pixels`.
    """
    if is_url(source):
        from hydra.fetch import fetch_url

        source = fetch_url(source, allow_private=True)  # a local user's own URL (the server fetches itself)
    if isinstance(source, Image.Image):
        return pil_to_vips(source)
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            stream = pyvips.Source.new_from_memory(bytes(source))
        else:
            if not stat.S_ISREG(os.stat(source).st_mode):
                raise OSError("not a regular file")  # a FIFO or device would block or never end
            stream = pyvips.Source.new_from_file(os.fspath(source))
        # Loaders read the first page/frame by default. fail_on="error": a truncated or broken file raises
        # (by default libvips would fill the missing part with grey and carry on).
        image = pyvips.Image.new_from_source(stream, "", access="sequential", fail_on="error")
    except pyvips.Error as e:
        reason = _reason(e, "damaged or unsupported header")
        raise UnreadableImage(f"not an image libvips can read ({reason})") from None
    loader = image.get("vips-loader") if image.get_typeof("vips-loader") else "unknown"
    if not loader.startswith(LOADERS):
        raise UnreadableImage(f"not an image libvips can read ({loader.removesuffix('_source')} is refused)")
    if max_pixels and image.width * image.height > max_pixels:
        raise ImageTooLarge(f"image is {image.width}x{image.height} ({image.width * image.height / 1e6:,.0f} "
                            f"megapixels), over the limit of {max_pixels / 1e6:,.0f} (--max-pixels)")
    return image


def _to_rgb8(image: pyvips.Image) -> pyvips.Image:
    if image.bands in (1, 2):  # grey (+ a stray alpha) -> RGB
        grey = image.extract_band(0)
        image = grey.bandjoin([grey, grey])
    elif image.bands > 3:
        image = image.extract_band(0, n=3)
    return image if image.format == "uchar" else image.cast("uchar")


@dataclass(frozen=True)
class Hydra35Preprocess:
    """Picklable image -> sample function for Hydra 3.5 (used in-process and by loader workers).

    Attributes:
        seqlen: patch budget per image (16 px patches), as for JTP-3.
        background: colour transparency is flattened onto: "black", "grey" or "white" (`classifier.background`).
        resize: "lanczos" (LANCZOS3 in sRGB) or "mks2013-linear" (Magic Kernel Sharp 2013 in linear light)
            (`classifier.resize`).
        max_pixels: refuse files with more pixels than this, checked before decoding (None: no limit).
    """

    seqlen: int = DEFAULT_SEQLEN
    background: str = "black"
    resize: str = "lanczos"
    max_pixels: int | None = None

    def __post_init__(self):
        if not isinstance(self.seqlen, int) or self.seqlen < 1:
            raise ValueError(f"seqlen must be a positive integer, got {self.seqlen!r}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}, got {self.background!r}")
        if self.resize not in KERNELS:
            raise ValueError(f"resize must be one of {', '.join(KERNELS)}, got {self.resize!r}")

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], **kwargs: Any) -> Hydra35Preprocess:
        """The preprocessing a model file asks for: `classifier.background` (default black) and
        `classifier.resize` (default lanczos); `kwargs` set the other fields."""
        return cls(background=metadata.get("classifier.background", "black"),
                   resize=metadata.get("classifier.resize", "lanczos"), **kwargs)

    def __call__(self, source: str | os.PathLike | bytes | Image.Image) -> dict[str, np.ndarray]:
        """Returns {"patches": (N, 768) uint8, "patch_coord": (N, 2) int16} numpy arrays, unpadded, row-major."""
        return patchify(self.pixels(source))

    @staticmethod
    def tokens(sample: dict[str, np.ndarray]) -> int:
        """Tokens the model runs for this sample (its valid patches)."""
        return len(sample["patches"])

    def pixels(self, source: str | os.PathLike | bytes | Image.Image) -> np.ndarray:
        """The model's view of an image: (H, W, 3) uint8 sRGB, H and W multiples of 16 (see `open_vips`)."""
        image = open_vips(source, self.max_pixels)
        try:
            image = self._prepare(image)
        except pyvips.Error as e:  # building the pipeline reads no pixels: the image has an odd layout
            reason = _reason(e, "unknown error")
            raise UnreadableImage(f"libvips cannot convert this image to sRGB ({reason})") from None
        try:
            return image.numpy()  # (H, W, 3); decoding happens here
        except pyvips.Error as e:
            raise _decode_error(e) from None

    def _prepare(self, image: pyvips.Image) -> pyvips.Image:
        orientation = _orientation(image)
        turned = orientation in (5, 6, 7, 8)  # a quarter turn on display: the displayed size is (h, w)
        h, w = (image.width, image.height) if turned else (image.height, image.width)
        th, tw = size_for_seqlen(h, w, self.seqlen)
        if turned:
            th, tw = tw, th  # resize the stored pixels to the turned target, rotate at the end
        image = image.icc_transform("srgb", embedded=True, intent="relative", black_point_compensation=True,
                                    depth=8)
        if image.hasalpha():
            image = image.flatten(background=[BACKGROUNDS[self.background]] * (image.bands - 1))
        if (tw, th) != (image.width, image.height):
            linear = self.resize in LINEAR_RESIZES
            if linear:
                image = image.maplut(_lut_images()[0])  # 16-bit linear light
            image = image.resize(tw / image.width, vscale=th / image.height, kernel=KERNELS[self.resize], gap=GAP)
            if linear:
                image = image.maplut(_lut_images()[1])  # back to 8-bit sRGB
        if orientation != 1:
            # rotating needs random access, the streamed decode gives lines in order: copy the small image
            image = image.copy_memory().autorot()
        image = _to_rgb8(image)
        expected = (th, tw) if turned else (tw, th)
        assert (image.width, image.height) == expected, (image.width, image.height, expected)
        return image
