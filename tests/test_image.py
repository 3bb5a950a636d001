"""The JTP-3 image pipeline (docs/preprocessing.md): target sizes (its test vectors), patch order, EXIF, ICC to
sRGB, transparency on black, 16-bit handling, collation.

    venv/bin/python -m pytest tests/test_image.py -q
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from hydra.images.decode import open_image
from hydra.images.naflex import (
    JTP3Preprocess,
    collate,
    patchify,
    prepare_image,
    size_for_seqlen,
    unpatchify,
)

# (W, H, seqlen) -> (W', H'), the vectors in docs/preprocessing.md
VECTORS = [
    (512, 512, 1024, 512, 512), (1000, 1000, 1024, 512, 512), (1024, 1024, 1024, 512, 512),
    (2048, 2048, 1024, 512, 512), (4000, 3000, 1024, 576, 432), (3000, 4000, 1024, 432, 576),
    (1920, 1080, 1024, 672, 384), (800, 600, 1024, 576, 432), (10, 10, 1024, 16, 16), (100, 50, 1024, 96, 48),
    (5000, 200, 1024, 2400, 96), (20000, 100, 1024, 6400, 32), (33000, 10, 1024, 16384, 16),
    (4000, 3000, 64, 144, 112), (4000, 3000, 256, 288, 224), (4000, 3000, 2048, 832, 624),
    (1000, 1000, 2048, 720, 720),
]


@pytest.mark.parametrize("w,h,seqlen,ew,eh", VECTORS)
def test_spec_size_vectors(w, h, seqlen, ew, eh):
    assert size_for_seqlen(h, w, seqlen) == (eh, ew)


@given(st.integers(1, 20000), st.integers(1, 20000), st.integers(64, 2048))
def test_size_properties(h, w, seqlen):
    try:
        th, tw = size_for_seqlen(h, w, seqlen)
    except ValueError as e:  # only absurd aspect ratios: even 1 patch high is too many patches wide
        assert "too large" in str(e) and max(h, w) // 16 > seqlen
        return
    assert th % 16 == 0 and tw % 16 == 0 and th >= 16 and tw >= 16
    assert (th // 16) * (tw // 16) <= seqlen
    assert th <= max(h // 16, 1) * 16 and tw <= max(w // 16, 1) * 16  # never upscaled


def test_patch_order_and_coords():
    arr = np.arange(32 * 48 * 3, dtype=np.uint32).reshape(32, 48, 3).astype(np.uint8)
    out = patchify(arr)
    assert out["patches"].shape == (6, 768) and out["patch_coord"].tolist() == [
        [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    # patch (y=1, x=2): rows 16..31, cols 32..47, flattened (row, col, channel)
    np.testing.assert_array_equal(out["patches"][5], arr[16:32, 32:48].reshape(-1))
    np.testing.assert_array_equal(out["patches"][1][:3], arr[0, 16])


def test_collate_pads_to_longest_or_fixed():
    a = patchify(np.zeros((32, 32, 3), np.uint8))
    b = patchify(np.full((16, 48, 3), 7, np.uint8))
    batch = collate([a, b])
    assert batch["patches"].shape == (2, 4, 768)
    assert batch["patch_valid"].tolist() == [[True] * 4, [True, True, True, False]]
    assert batch["patch_coord"][1].tolist() == [[0, 0], [0, 1], [0, 2], [0, 0]]
    assert int(batch["patches"][1, 3].sum()) == 0
    assert collate([a], pad_to=10)["patches"].shape == (1, 10, 768)


def test_unpatchify_inverts_coords():
    import torch

    coord = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1]])
    grid = unpatchify(torch.arange(6.0), coord)
    assert grid.tolist() == [[0, 1], [2, 3], [4, 5]]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 16, 32))  # blue stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = tmp_path / "r.jpg"
    img.save(path, exif=exif, quality=100)
    out = open_image(path)
    assert out.size == (32, 64)
    assert out.getpixel((16, 4))[2] > 200  # the stripe is now at the top


def test_transparency_becomes_black():
    img = Image.new("RGBA", (32, 32), (255, 255, 255, 0))
    img.paste((200, 100, 50, 255), (0, 0, 16, 32))
    arr = prepare_image(img, 1024)
    assert arr.shape == (32, 32, 3)
    assert arr[:, 16:].max() == 0 and tuple(arr[0, 0]) == (200, 100, 50)
    half = prepare_image(Image.new("RGBA", (16, 16), (200, 100, 50, 128)), 1024)
    assert tuple(half[0, 0]) == (100, 50, 25)  # premultiplied


def test_palette_transparency_and_la():
    p = Image.new("P", (16, 16), 0)
    p.putpalette([255, 255, 255, 10, 20, 30] + [0] * 762)
    p.info["transparency"] = 0
    assert prepare_image(p, 64).max() == 0
    la = Image.new("LA", (16, 16), (200, 0))
    assert prepare_image(la, 64).max() == 0


def test_16_bit_clips_like_pillow():
    arr = np.full((16, 16), 1000, dtype=np.uint16)
    arr[:, 8:] = 100
    img = Image.fromarray(arr)  # mode I;16
    out = prepare_image(img, 64)
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 15].tolist() == [100, 100, 100]


def linear_rgb_profile() -> bytes:
    """A minimal ICC v2 display profile: sRGB primaries (D50-adapted) with linear (gamma 1.0) curves."""
    def s15(x):
        return struct.pack(">i", round(x * 65536))

    def xyz(v):
        return b"XYZ " + b"\0" * 4 + b"".join(s15(c) for c in v)

    curve = b"curv" + b"\0" * 4 + struct.pack(">IH", 1, 0x0100) + b"\0\0"
    tags = [(b"wtpt", xyz((0.9642, 1.0, 0.8249))), (b"rXYZ", xyz((0.4361, 0.2225, 0.0139))),
            (b"gXYZ", xyz((0.3851, 0.7169, 0.0971))), (b"bXYZ", xyz((0.1431, 0.0606, 0.7141))),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body + b"\0" * (-len(body) % 4)
    header = (struct.pack(">I", offset + len(data)) + b"\0" * 4 + struct.pack(">I", 0x02100000)
              + b"mntrRGB XYZ " + b"\0" * 12 + b"acsp" + b"\0" * 28 + s15(0.9642) + s15(1.0) + s15(0.8249)
              + b"\0" * 48)
    return header + struct.pack(">I", len(tags)) + table + data


def test_icc_profile_converted_to_srgb(tmp_path):
    img = Image.new("RGB", (16, 16), (128, 128, 128))
    path = tmp_path / "linear.png"
    img.save(path, icc_profile=linear_rgb_profile())
    # linear-light 50% grey is sRGB-encoded ~188
    assert prepare_image(open_image(path), 64)[0, 0].tolist() == [188, 188, 188]
    plain = tmp_path / "plain.png"
    img.save(plain)
    assert prepare_image(open_image(plain), 64)[0, 0].tolist() == [128, 128, 128]  # no profile: sRGB
    broken = Image.new("RGB", (16, 16), (10, 200, 30))
    broken.info["icc_profile"] = b"not a profile"
    assert prepare_image(broken, 64)[0, 0].tolist() == [10, 200, 30]  # unusable profile: used as is


def test_preprocess_is_picklable_and_sized(tmp_path):
    import pickle

    img = Image.new("RGB", (1920, 1080), (1, 2, 3))
    path = tmp_path / "x.png"
    img.save(path)
    pre = pickle.loads(pickle.dumps(JTP3Preprocess(1024)))
    out = pre(str(path))
    assert out["patches"].shape == (42 * 24, 768) and out["patches"].dtype == np.uint8
    assert out["patch_coord"].dtype == np.int16 and out["patch_coord"][-1].tolist() == [23, 41]
