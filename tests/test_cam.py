"""hydra.web.cam: the multi-layer CAM on a tiny random model, and the overlay drawing.

The map is checked against a reference written here with plain autograd and a manual loop over the
backbone blocks (not timm's `forward_intermediates`), including the patch-grid orientation on a
non-square image, the per-layer sum, cached layers and inference-mode callers. The overlay is checked
pixel by pixel on hand-made maps.

Run: venv/bin/python -m pytest tests/test_cam.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import noise_image
from PIL import Image

from hydra.images.naflex import JTP3Preprocess, collate
from hydra.models.jtp3_net import load_jtp3
from hydra.web.cam import DESATURATE, block_outputs, class_activation_map, display_image, draw_overlay


@pytest.fixture(scope="module")
def model(small_model):
    path, _ = small_model
    return load_jtp3(path, "cpu", torch.float32)


@pytest.fixture(scope="module")
def sample():
    return JTP3Preprocess(64)(noise_image(160, 96, seed=5))  # 10 x 6 patches: rows != columns


def manual_blocks(model, sample) -> list[torch.Tensor]:
    """Every block's raw output (N, D), by running timm's embedding and blocks one at a time."""
    batch = model.to_device_batch(collate([sample]))
    net = model.net
    with torch.no_grad():
        x = net._forward_embeds(batch["patches"], patch_coord=batch["patch_coord"], patch_valid=None,
                                attn_mask=None)["patches"]
        outs = []
        for blk in net.blocks:
            x = blk(x)
            outs.append(x[0])
    return outs


def reference_cam(model, layers, tag, grid) -> np.ndarray:
    total = 0
    for x in layers:
        x = x.clone().unsqueeze(0).requires_grad_(True)
        model.head(x, None, torch.tensor([tag]))[0, 0].backward()
        total = total + (x.grad[0] * x.sign()[0]).sum(-1)
    return total.detach().reshape(grid).numpy()  # row-major patches -> (gh, gw)


def test_block_outputs_are_the_raw_last_blocks(model, sample):
    ref = manual_blocks(model, sample)
    got = block_outputs(model, sample, model.depth)
    assert len(got) == model.depth == 2
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(block_outputs(model, sample, 1)[0], ref[-1])
    # the last raw block output, normed, is what the head sees in normal tagging
    batch = model.to_device_batch(collate([sample]))
    with torch.no_grad():
        torch.testing.assert_close(model.net.norm(got[-1]), model.features(batch)[0])


@pytest.mark.parametrize("depth", [1, 2])
def test_cam_matches_reference_and_grid_orientation(model, sample, depth):
    tag = 4
    cam = class_activation_map(model, sample, tag, depth)
    assert cam.shape == (6, 10) and cam.dtype == np.float32
    ref = reference_cam(model, manual_blocks(model, sample)[-depth:], tag, (6, 10))
    np.testing.assert_allclose(cam, ref, rtol=1e-4, atol=1e-6)
    assert np.abs(cam).max() > 0


def test_depth_sums_layers_and_cached_layers_agree(model, sample):
    layers = block_outputs(model, sample, 2)
    both = class_activation_map(model, sample, 7, 2, layers=layers)
    last = class_activation_map(model, sample, 7, 1, layers=layers)
    first = class_activation_map(model, sample, 7, 1, layers=layers[:1])
    np.testing.assert_allclose(both, last + first, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(last, class_activation_map(model, sample, 7, 1), rtol=1e-6)
    # different tags look at the image differently
    assert not np.allclose(last, class_activation_map(model, sample, 2, 1, layers=layers))


def test_cam_works_inside_inference_mode(model, sample):
    with torch.inference_mode():
        cam = class_activation_map(model, sample, 1, 1)
    np.testing.assert_allclose(cam, class_activation_map(model, sample, 1, 1), rtol=1e-6)


def test_bad_depth_or_tag_is_a_value_error(model, sample):
    with pytest.raises(ValueError, match="between 1 and 2"):
        class_activation_map(model, sample, 0, 3)
    with pytest.raises(ValueError, match="between 1 and 2"):
        block_outputs(model, sample, 0)
    with pytest.raises(ValueError, match="out of range"):
        class_activation_map(model, sample, 12, 1)


def test_overlay_colours_alpha_and_peak_label():
    base = Image.new("RGB", (200, 100), (200, 120, 40))
    cam = np.zeros((2, 4), np.float32)
    cam[0, 0] = 2.0    # top-left block: strongest positive -> green at alpha 0.5
    cam[1, 1] = -1.0   # negative, half the peak -> red at alpha 0.25
    out = np.asarray(draw_overlay(base, cam)).astype(int)
    assert out.shape == (100, 200, 3)
    gray = round(0.299 * 200 + 0.587 * 120 + 0.114 * 40)
    desat = np.round(np.array([200, 120, 40]) * (1 - DESATURATE) + gray * DESATURATE)
    np.testing.assert_allclose(out[80, 150], desat, atol=2)  # cam == 0: desaturated only
    np.testing.assert_allclose(out[10, 10], desat * 0.5 + np.array([0, 255, 0]) * 0.5, atol=2)
    np.testing.assert_allclose(out[70, 60], desat * 0.75 + np.array([255, 0, 0]) * 0.25, atol=2)
    # NEAREST upsampling: the block edge is sharp (the map cell is 50 x 50 pixels)
    assert abs(out[10, 49, 1] - out[10, 50, 1]) > 50
    # the peak "2" is printed in blue at the bottom-right corner
    corner = out[60:95, 150:195]
    blue = (corner[..., 2] > 150) & (corner[..., 0] < 100) & (corner[..., 1] < 100)
    assert blue.sum() > 10


def test_overlay_of_an_all_zero_map_is_just_desaturated():
    base = noise_image(64, 48, seed=2)
    out = draw_overlay(base, np.zeros((3, 4), np.float32))
    assert out.size == base.size and out.mode == "RGB"


def test_display_image_downscales_large_and_blackens_transparency():
    assert display_image(Image.new("RGB", (2160, 1000))).size == (1080, 500)
    assert display_image(Image.new("RGB", (800, 1079))).size == (800, 1079)
    assert display_image(Image.new("RGB", (500, 1080))).size == (500, 1080)  # at the limit: same size
    clear = Image.new("RGBA", (10, 10), (255, 255, 255, 0))
    shown = display_image(clear)
    assert shown.mode == "RGB" and shown.getpixel((5, 5)) == (0, 0, 0)
