"""Decoding user images with Pillow: any path, URL, file bytes or PIL image, with a pixel limit checked first.

Shared by the Pillow pipelines (JTP-3 in `naflex.py`, DINOv3 in `dinov3.py`) and the web UI's display images.
Torch-free: it runs in loader worker processes.
"""

from __future__ import annotations

import io
import os
import stat

from PIL import Image, ImageCms, ImageOps

# Pillow's decompression-bomb guard (~179 Mpx) would refuse legitimate huge art (e621 has images above 100 Mpx);
# the original switched it off entirely. We switch Pillow's off and apply our own limit from the header, before
# decoding: 256 Mpx is 1 GiB as RGBA, so one decode (and a worker per core) stays comfortably in memory.
DEFAULT_MAX_PIXELS = 256 * 1024 * 1024
Image.MAX_IMAGE_PIXELS = None

_SRGB = None


def _srgb_profile() -> ImageCms.ImageCmsProfile:
    global _SRGB
    if _SRGB is None:
        _SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    return _SRGB


class UnreadableImage(OSError):
    """A decoder (libvips) could not read or decode the image; str(e) is one short line, fit to show the user."""


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

        source = fetch_url(source, allow_private=True)  # a local user's own URL (the server fetches itself)
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
    """Convert an embedded ICC profile to sRGB, as the original's `process_srgb` does.

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
