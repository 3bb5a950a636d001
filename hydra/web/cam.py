"""Multi-layer class-activation map (CAM) for one tag, and its overlay on the displayed image.

DrHead's method from the original WebUI: take the raw outputs of the last `depth` backbone blocks (before
the final LayerNorm), feed each one *directly* into the Hydra head restricted to the chosen tag (skipping
the later blocks and the final norm), back-propagate that single logit to the layer's tokens, and score
every token by sum over channels of grad * sign(activation). Summing over layers gives one value per
patch, scattered back onto the patch grid. Depth 1 is the sharpest map (the last block only); larger
depths blend in earlier, more spatial layers.

The overlay: the display image is desaturated by 33%, then covered with green where the map is positive
and red where it is negative, alpha = 0.5 * |cam| / max|cam|, upsampled NEAREST (one block per patch),
and max|cam| is printed at the bottom-right (`.4g`, blue).

Shapes: N = patches of the image, D = backbone width, (gh, gw) = patch grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch import Tensor

from hydra.images.decode import to_srgb
from hydra.images.naflex import collate, to_black_background, unpatchify
from hydra.models.naflex import NaFlexTagModel

DISPLAY_MAX_SIDE = 1080      # the original shows images with a longer side downscaled to this
DESATURATE = 0.33            # blend toward grayscale before the overlay
MAX_ALPHA = 0.5              # overlay opacity at the peak
PEAK_TEXT = {"margin": 7, "fill": (32, 32, 255), "size": 24}  # the original's label: anchor "rd"


def block_outputs(model: NaFlexTagModel, sample: dict[str, np.ndarray], depth: int) -> list[Tensor]:
    """Raw outputs of the last `depth` blocks for one preprocessed sample (no final norm).

    Args:
        sample: `{"patches": (N, 768) uint8, "patch_coord": (N, 2)}` from `Tagger.preprocess`.
        depth: how many of the last blocks, 1 to `model.depth`.

    Returns:
        `depth` tensors of shape (N, D), earliest block first, detached.
    """
    if not 1 <= depth <= model.depth:
        raise ValueError(f"CAM depth must be between 1 and {model.depth}, got {depth}")
    batch = model.to_device_batch(collate([sample]))
    with torch.no_grad():
        out = model.net.forward_intermediates(
            batch["patches"], indices=depth, output_dict=True, output_fmt="NLC", intermediates_only=True,
            patch_coord=batch["patch_coord"], patch_valid=batch["patch_valid"])
    return [x[0].detach() for x in out["image_intermediates"]]  # depth x (N, D)


def class_activation_map(model: NaFlexTagModel, sample: dict[str, np.ndarray], tag: int, depth: int = 1,
                         layers: Sequence[Tensor] | None = None) -> np.ndarray:
    """The multi-layer CAM of one tag for one image.

    Args:
        model: the loaded JTP-3 model.
        sample: the preprocessed image (as for `block_outputs`).
        tag: index of the tag in model order.
        depth: number of last blocks to sum over, 1 to `model.depth`.
        layers: block outputs from `block_outputs(model, sample, d)` with d >= depth, to skip the backbone
            pass (the last `depth` of them are used).

    Returns:
        (gh, gw) float32 relevance per patch: positive = evidence for the tag, negative = against.
    """
    if not 0 <= tag < len(model.labels):
        raise ValueError(f"tag index {tag} is out of range (the model has {len(model.labels)} tags)")
    if layers is None or len(layers) < depth:
        layers = block_outputs(model, sample, depth)
    index = torch.tensor([tag], device=model.device)
    total = None
    # The caller may be inside inference_mode (a UI handler): gradients need it off for this block.
    with torch.inference_mode(False), torch.enable_grad():
        for x in layers[len(layers) - depth:]:
            x = x.clone().unsqueeze(0).requires_grad_(True)  # (1, N, D)
            logit = model.head_logits(x, None, index)  # (1, 1): one unpadded image, so no mask
            (grad,) = torch.autograd.grad(logit.sum(), x)  # (1, N, D)
            relevance = (grad * x.sign()).float().sum(-1)[0]  # (N,)
            total = relevance if total is None else total + relevance
    coord = torch.from_numpy(np.asarray(sample["patch_coord"])).to(total.device)
    return unpatchify(total.detach(), coord).cpu().numpy()  # (gh, gw)


def display_image(img: Image.Image, max_side: int = DISPLAY_MAX_SIDE) -> Image.Image:
    """The image as shown in the UI: sRGB, transparency on black (as the model sees it), RGB, and
    LANCZOS-downscaled so the longer side is at most `max_side` (the original's 1080)."""
    out = to_black_background(to_srgb(img)).convert("RGB")
    if max(out.size) >= max_side:
        scale = max_side / max(out.size)
        size = (max(1, round(out.width * scale)), max(1, round(out.height * scale)))
        out = out.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return out


def draw_overlay(image: Image.Image, cam: np.ndarray) -> Image.Image:
    """Desaturate `image` and overlay the map: green = positive, red = negative; print the peak.

    Args:
        image: the display image (any size; the map is stretched over it).
        cam: (gh, gw) map from `class_activation_map`.

    Returns:
        A new RGB image of the same size as `image`.
    """
    base = image.convert("RGB")
    base = Image.blend(base, ImageOps.grayscale(base).convert("RGB"), DESATURATE).convert("RGBA")
    cam = np.nan_to_num(np.asarray(cam, dtype=np.float32))
    peak = float(np.abs(cam).max()) if cam.size else 0.0
    rgba = np.zeros((*cam.shape, 4), dtype=np.uint8)  # (gh, gw, 4)
    rgba[..., 0] = np.where(cam < 0, 255, 0)
    rgba[..., 1] = np.where(cam > 0, 255, 0)
    if peak > 0:
        rgba[..., 3] = np.round(255 * MAX_ALPHA * np.abs(cam) / peak).astype(np.uint8)
    overlay = Image.fromarray(rgba, "RGBA").resize(base.size, Image.Resampling.NEAREST)
    out = Image.alpha_composite(base, overlay).convert("RGB")
    draw = ImageDraw.Draw(out)
    m = PEAK_TEXT["margin"]
    draw.text((out.width - m, out.height - m), f"{peak:.4g}", fill=PEAK_TEXT["fill"], anchor="rd",
              font=ImageFont.load_default(PEAK_TEXT["size"]))
    return out
