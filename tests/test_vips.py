"""The Hydra 3.5 libvips pipeline (`hydra/images/vips.py`): the linear-light tables, target sizes, EXIF
orientation applied after the resize, transparency flattened onto the background colour, colour management
(16-bit, grey, CMYK, embedded profiles), the two resize kernels, pickling, and one-line errors on bad input.

Every image is generated here (Pillow or numpy); nothing is downloaded. libvips is a hard requirement of
this pipeline, so a missing pyvips fails the module instead of skipping it. A few seconds on CPU:

    venv/bin/python -m pytest tests/test_vips.py -q
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

try:
    import pyvips
except (ImportError, OSError) as e:  # OSError: pyvips installed, but libvips itself not found
    raise ImportError(f"Hydra 3.5 preprocessing needs libvips: pip install pyvips pyvips-binary ({e})") from e

from hydra.images.decode import ImageTooLarge
from hydra.images.naflex import JTP3Preprocess
from hydra.images.vips import (
    LINEAR16_TO_SRGB,
    SRGB_TO_LINEAR16,
    Hydra35Preprocess,
    UnreadableImage,
    open_vips,
    pil_to_vips,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Pillow's transpose for each EXIF orientation: an independent statement of what the tag means
PIL_ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def noise(width: int, height: int, seed: int = 0, bands: int = 3) -> np.ndarray:
    """Smooth-ish random pixels (H, W, bands) uint8: blocks of 8 px, so resizes differ by kernel."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, ((height + 7) // 8, (width + 7) // 8, bands), dtype=np.uint8)
    return np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)[:height, :width]


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def one_line(e: BaseException) -> str:
    text = str(e)
    assert text and "\n" not in text and len(text) < 160, repr(text)
    return text


# ------------------------------------------------------------------------------------------------- tables

def test_to_linear_table_matches_listed_values():
    assert SRGB_TO_LINEAR16.shape == (256,) and SRGB_TO_LINEAR16.dtype == np.uint16
    listed = {0: 0, 1: 20, 10: 199, 11: 219, 50: 2090, 128: 14146, 200: 37852, 254: 64952, 255: 65535}
    assert {c: int(SRGB_TO_LINEAR16[c]) for c in listed} == listed
    assert (np.diff(SRGB_TO_LINEAR16.astype(int)) > 0).all()


def test_back_table_round_trips_every_code():
    assert LINEAR16_TO_SRGB.shape == (65536,) and LINEAR16_TO_SRGB.dtype == np.uint8
    assert LINEAR16_TO_SRGB[SRGB_TO_LINEAR16].tolist() == list(range(256))
    assert (np.diff(LINEAR16_TO_SRGB.astype(int)) >= 0).all()
    assert LINEAR16_TO_SRGB[205] == 10 and LINEAR16_TO_SRGB[0] == 0 and LINEAR16_TO_SRGB[65535] == 255


# ------------------------------------------------------------------------------------------------- sizes

# (W, H, seqlen) -> (W', H'): the size vectors, the same as JTP-3's
SIZES = [
    (4000, 3000, 1024, 576, 432), (3000, 4000, 1024, 432, 576), (1920, 1080, 1024, 672, 384),
    (512, 512, 1024, 512, 512), (1000, 1000, 1024, 512, 512), (800, 600, 1024, 576, 432),
    (10, 10, 1024, 16, 16), (1, 1, 1024, 16, 16), (40, 15, 1024, 32, 16), (5000, 200, 1024, 2400, 96),
    (1023, 767, 1024, 592, 432), (480, 360, 1024, 480, 352), (320, 240, 1024, 320, 240),
    (16, 4000, 1024, 16, 4000), (4000, 3000, 64, 144, 112), (4000, 3000, 256, 288, 224),
    (640, 480, 256, 288, 224), (300, 1200, 256, 128, 512), (400, 400, 256, 256, 256),
    (4000, 3000, 2048, 832, 624), (1000, 1000, 2048, 720, 720),
]


@pytest.mark.parametrize("w,h,seqlen,ew,eh", SIZES)
def test_target_sizes_through_the_preprocessor(w, h, seqlen, ew, eh):
    img = Image.new("RGB", (w, h), (90, 140, 200))
    out = Hydra35Preprocess(seqlen, resize="mks2013-linear")(img)
    gh, gw = eh // 16, ew // 16
    assert out["patches"].shape == (gh * gw, 768) and out["patches"].dtype == np.uint8
    assert out["patch_coord"].shape == (gh * gw, 2) and out["patch_coord"].dtype == np.int16
    assert out["patch_coord"][-1].tolist() == [gh - 1, gw - 1]  # row-major, (y, x)
    assert (out["patches"].reshape(-1, 3) == (90, 140, 200)).all()  # flat stays flat, in either kernel


def test_output_contract_matches_jtp3(tmp_path):
    img = Image.fromarray(noise(300, 200, 1))
    ours, theirs = Hydra35Preprocess(256)(img), JTP3Preprocess(256)(img)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].shape == theirs[key].shape and ours[key].dtype == theirs[key].dtype, key
    assert (ours["patch_coord"] == theirs["patch_coord"]).all()


def test_patches_are_the_pixels_cut_row_major():
    pre = Hydra35Preprocess(64)
    img = Image.fromarray(noise(200, 120, 2))
    pixels, out = pre.pixels(img), pre(img)
    assert pixels.shape == (96, 160, 3)  # 12 x 7 patches would be 84 > 64: 10 x 6
    # patch (y=1, x=2): rows 16..31, cols 32..47, flattened (row, col, channel)
    assert (out["patches"][1 * 10 + 2] == pixels[16:32, 32:48].reshape(-1)).all()


# ------------------------------------------------------------------------------------------------- orientation

@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("size,seqlen", [((200, 120), 64), ((64, 32), 1024)], ids=["resized", "not-resized"])
def test_orientation_applied_after_resize(orientation, size, seqlen):
    stored = Image.fromarray(noise(*size, seed=orientation))
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged = encode(stored, "JPEG", quality=95, exif=exif)
    plain = encode(stored, "JPEG", quality=95)  # the same pixels, no orientation
    pre = Hydra35Preprocess(seqlen)
    out = pre.pixels(tagged)
    expected = pre.pixels(plain)  # the stored pixels resized (the size rule is symmetric in w and h) ...
    if orientation != 1:
        expected = np.asarray(Image.fromarray(expected).transpose(PIL_ORIENT[orientation]))  # ... then turned
    assert out.shape == expected.shape and (out == expected).all()
    sample = pre(tagged)
    h, w = out.shape[:2]
    assert (h > w) == (orientation >= 5) and sample["patch_coord"][-1].tolist() == [h // 16 - 1, w // 16 - 1]


def test_pil_orientation_is_kept():
    stored = Image.fromarray(noise(200, 120, 3))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, "PNG", exif=exif)
    pre = Hydra35Preprocess(64)
    assert pre.pixels(data).shape == (160, 96, 3)  # displayed 120 x 200
    assert (pre.pixels(Image.open(io.BytesIO(data))) == pre.pixels(data)).all()


# ------------------------------------------------------------------------------------------------- transparency

@pytest.mark.parametrize("background,value", [("black", 0), ("grey", 127), ("white", 255)])
def test_transparency_flattened_onto_background(background, value):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, :16] = (200, 100, 50, 255)
    rgba[:, 16:] = (10, 250, 30, 0)  # fully transparent: its stored colour must not show
    pre = Hydra35Preprocess(1024, background=background)
    out = pre.pixels(encode(Image.fromarray(rgba)))
    assert (out[:, :16] == (200, 100, 50)).all() and (out[:, 16:] == value).all()
    half = pre.pixels(Image.new("RGBA", (16, 16), (200, 100, 50, 128)))[0, 0]
    expected = [round((c * 128 + value * 127) / 255) for c in (200, 100, 50)]  # straight alpha, not premultiplied
    assert np.abs(half.astype(int) - expected).max() <= 1, (half, expected)


@pytest.mark.parametrize("resize", ["lanczos", "mks2013-linear"])
def test_transparency_flattened_before_resize(resize):
    rgba = np.zeros((512, 512, 4), np.uint8)
    rgba[..., :3] = noise(512, 512, 4)  # garbage colour under alpha 0
    rgba[:, :256, 3] = 255
    out = Hydra35Preprocess(256, background="white", resize=resize).pixels(Image.fromarray(rgba))
    assert out.shape == (256, 256, 3) and (out[:, 140:] == 255).all()  # far from the edge: pure background


@pytest.mark.parametrize("background,value", [("black", 0), ("white", 255)])
def test_grey_alpha_and_palette_transparency(background, value):
    pre = Hydra35Preprocess(64, background=background)
    assert (pre.pixels(encode(Image.new("LA", (16, 16), (200, 0)))) == value).all()
    p = Image.new("P", (16, 16), 0)
    p.putpalette([255, 255, 255, 10, 20, 30] + [0] * 762)
    p.paste(1, (0, 0, 8, 16))
    data = encode(p, transparency=0)  # palette entry 0 transparent (a tRNS chunk)
    for source in (data, Image.open(io.BytesIO(data))):
        out = pre.pixels(source)
        assert (out[:, :8] == (10, 20, 30)).all() and (out[:, 8:] == value).all()


# ------------------------------------------------------------------------------------------------- colour

def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    arr = np.arange(1024, dtype=np.uint16).reshape(32, 32)
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)  # mode I;16: a 16-bit grey PNG
    pre = Hydra35Preprocess(1024)
    out = pre.pixels(path)
    assert out.shape == (32, 32, 3) and out.max() <= 4  # 1023 / 65535 of full scale: nearly black
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert (pre.pixels(Image.open(path)) == out).all()  # the PIL route keeps 16 bits too


def test_8_bit_grey_becomes_equal_channels():
    grey = noise(48, 32, 5, bands=1)[..., 0]
    out = Hydra35Preprocess(1024).pixels(encode(Image.fromarray(grey)))
    assert out.shape == (32, 48, 3)
    assert (out == grey[..., None]).all()  # grey without a profile maps to the same sRGB code


def test_cmyk_jpeg_is_converted():
    data = encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=100)  # cyan 0, magenta+yellow full
    for source in (data, Image.open(io.BytesIO(data))):
        r, g, b = Hydra35Preprocess(1024).pixels(source)[0, 0].tolist()
        assert r > 200 and g < 60 and b < 60, (r, g, b)  # red, through libvips' CMYK profile


def p3_profile() -> bytes:
    """Display P3's ICC profile, as libvips embeds it when converting to its built-in "p3"."""
    return pyvips.Image.black(1, 1, bands=3).copy(interpretation="srgb").icc_transform("p3").get("icc-profile-data")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_embedded_profile_converts_to_srgb(fmt):
    srgb = np.full((16, 16, 3), (200, 60, 40), np.uint8)
    as_p3 = pyvips.Image.new_from_array(srgb, interpretation="srgb").icc_transform("p3").numpy()  # (16, 16, 3)
    assert np.abs(as_p3.astype(int) - srgb).max() > 8  # P3 codes of the same colour differ
    pre = Hydra35Preprocess(1024)
    options = {"quality": 100} if fmt == "JPEG" else {}
    tagged = encode(Image.fromarray(as_p3), fmt, icc_profile=p3_profile(), **options)
    plain = encode(Image.fromarray(as_p3), fmt, **options)
    back, untouched = pre.pixels(tagged)[0, 0].astype(int), pre.pixels(plain)[0, 0].astype(int)
    assert np.abs(back - srgb[0, 0]).max() <= 3, back  # the profile was used: back to the sRGB colour
    assert np.abs(untouched - as_p3[0, 0]).max() <= 2, untouched  # no profile: taken as sRGB
    assert (pre.pixels(Image.open(io.BytesIO(tagged))) == pre.pixels(tagged)).all()  # PIL keeps the profile


def test_unusable_profile_is_ignored():
    data = encode(Image.new("RGB", (16, 16), (10, 200, 30)), icc_profile=b"not a profile" * 20)
    assert Hydra35Preprocess(64).pixels(data)[0, 0].tolist() == [10, 200, 30]


# ------------------------------------------------------------------------------------------------- kernels

def test_mks2013_linear_differs_from_lanczos_on_downscale():
    img = Image.fromarray(noise(1000, 700, 6))
    lanczos = Hydra35Preprocess(256).pixels(img)
    mks = Hydra35Preprocess(256, resize="mks2013-linear").pixels(img)
    assert lanczos.shape == mks.shape == (208, 304, 3)
    assert (lanczos != mks).mean() > 0.5


@pytest.mark.parametrize("resize", ["lanczos", "mks2013-linear"])
def test_flat_colour_stays_exactly_flat(resize):
    out = Hydra35Preprocess(256, resize=resize).pixels(Image.new("RGB", (1000, 700), (123, 45, 250)))
    assert (out == (123, 45, 250)).all()


def test_mks2013_linear_averages_light_not_codes():
    checker = ((np.indices((512, 512)).sum(0) % 2) * 255).astype(np.uint8)  # 1-px black/white checkerboard
    img = Image.fromarray(checker)
    srgb_mean = Hydra35Preprocess(256).pixels(img)[32:-32, 32:-32].mean()
    linear_mean = Hydra35Preprocess(256, resize="mks2013-linear").pixels(img)[32:-32, 32:-32].mean()
    assert abs(srgb_mean - 127.5) < 3, srgb_mean
    assert abs(linear_mean - 188) < 3, linear_mean  # half the light is sRGB code 188


# ------------------------------------------------------------------------------------------------- inputs

def test_sources_agree(tmp_path, monkeypatch):
    import hydra.fetch

    img = Image.fromarray(noise(300, 200, 7))
    data = encode(img)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    monkeypatch.setattr(hydra.fetch, "fetch_url", lambda url, **kwargs: data if url == "https://e.x/a.png" else b"")
    pre = Hydra35Preprocess(256)
    ref = pre.pixels(img)
    for source in (str(path), path, data, "https://e.x/a.png", Image.open(path)):
        assert (pre.pixels(source) == ref).all(), source


def test_first_frame_only():
    frames = [Image.new("RGB", (32, 32), c) for c in ((250, 0, 0), (0, 0, 250))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    gif = Image.open(io.BytesIO(data))
    gif.seek(1)
    for source in (data, gif):
        r, g, b = Hydra35Preprocess(1024).pixels(source)[0, 0].tolist()
        assert r > 200 and b < 50, (r, g, b)


def test_pil_modes_convert():
    assert pil_to_vips(Image.new("1", (8, 8), 1)).interpretation == "b-w"
    assert pil_to_vips(Image.new("I;16", (8, 8), 300)).format == "ushort"
    rgb = Image.new("RGB", (16, 16), (1, 2, 3))
    rgb.info["transparency"] = (1, 2, 3)  # a colour key becomes alpha
    assert pil_to_vips(rgb).bands == 4 and Hydra35Preprocess(64, background="white").pixels(rgb).min() == 255
    assert Hydra35Preprocess(64).pixels(Image.new("YCbCr", (16, 16), (128, 128, 128))).shape == (16, 16, 3)


def test_picklable_and_equal():
    pre = Hydra35Preprocess(256, background="white", resize="mks2013-linear", max_pixels=10**8)
    copy = pickle.loads(pickle.dumps(pre))
    assert copy == pre and hash(copy) == hash(pre)
    img = Image.fromarray(noise(300, 200, 8, bands=4))
    a, b = pre(img), copy(img)
    assert all((a[k] == b[k]).all() for k in a)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="black, grey, white"):
        Hydra35Preprocess(background="gray")
    with pytest.raises(ValueError, match="lanczos, mks2013-linear"):
        Hydra35Preprocess(resize="bicubic")
    pre = Hydra35Preprocess.from_metadata({"classifier.background": "white", "classifier.resize": "mks2013-linear"},
                                          seqlen=512)
    assert pre == Hydra35Preprocess(512, "white", "mks2013-linear")
    assert Hydra35Preprocess.from_metadata({}) == Hydra35Preprocess()
    with pytest.raises(ValueError, match="background"):
        Hydra35Preprocess.from_metadata({"classifier.background": "pink"})


# ------------------------------------------------------------------------------------------------- bad inputs

def test_bad_files_raise_one_line(tmp_path):
    good_png = encode(Image.fromarray(noise(300, 200, 9)))
    good_jpg = encode(Image.fromarray(noise(300, 200, 9)), "JPEG", quality=90)
    cases = {
        "empty.png": (b"", "not an image libvips can read"),
        "notes.txt": (b"just some text, not an image\n" * 4, "not an image libvips can read"),
        "cut.png": (good_png[: len(good_png) // 2], "truncated"),
        "cut.jpg": (good_jpg[: len(good_jpg) // 2], "the image file is truncated"),
        "header.png": (good_png[:40], "not an image libvips can read"),
        "art.svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="20" height="10"/>', "svgload is refused"),
    }
    pre = Hydra35Preprocess(256)
    for name, (data, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        for source in (path, data):
            with pytest.raises(UnreadableImage) as info:
                pre(source)
            assert words in one_line(info.value), (name, str(info.value))
            assert isinstance(info.value, OSError)


def test_directory_and_fifo_are_refused(tmp_path):
    pre = Hydra35Preprocess()
    with pytest.raises(OSError, match="not a regular file"):
        pre(tmp_path)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):  # refused from stat, without blocking on open
        pre(str(fifo))
    with pytest.raises(FileNotFoundError):
        pre(tmp_path / "missing.png")


def test_max_pixels_checked_from_header_before_decoding():
    data = encode(Image.new("RGB", (2000, 1000)))
    cut = data[: len(data) // 2]  # a decode would fail on this; the size check must come first
    with pytest.raises(ImageTooLarge) as info:
        Hydra35Preprocess(max_pixels=1_000_000)(cut)
    assert "2000x1000" in one_line(info.value) and "over the limit" in str(info.value)
    assert open_vips(data, max_pixels=2_000_000).width == 2000


def test_libvips_is_recent_enough_and_import_is_torch_free():
    assert (pyvips.version(0), pyvips.version(1)) >= (8, 13)  # MKS2013 and fail_on arrived in 8.13
    code = "import sys, hydra.images.vips; assert 'torch' not in sys.modules and 'timm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
