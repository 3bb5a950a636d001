"""Random-weight JTP-3 model files in the exact real format, for tests and benchmarks (never a download).

`write_model(path, tags)` writes a tiny model (a small backbone declared in the `hydra.backbone` metadata,
a small Hydra head); `write_model(path, tags, full_size=True)` writes a file with every key, shape, dtype
and metadata field of the real `jtp-3-hydra.safetensors` (about 1 GB for 7,504 tags).

The random weights are scaled so that activations stay in a sensible range and the tags' probabilities
spread across (0, 1) and depend on the image, which the end-to-end tests rely on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch

from hydra.models.backbone import create_backbone
from hydra.models.checkpoint import ARCHITECTURE, KEY_ARCHITECTURE, KEY_BACKBONE, KEY_LABELS, save_safetensors
from hydra.models.extensions import save_extension
from hydra.models.head import HydraCfg, HydraPool

TINY_BACKBONE = {"embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
TINY_HEAD = {"n_heads": 2, "head_dim": 16, "ff_dim": 48}
FULL_HEAD = {"n_heads": 32, "head_dim": 64, "ff_dim": 6144}


def random_state(backbone: dict | None, head: dict, n_tags: int, seed: int = 0,
                 dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A state dict with the real key names, filled with scaled random values."""
    g = torch.Generator().manual_seed(seed)
    net = create_backbone(backbone, device="meta")
    d = net.embed_dim
    cfg = HydraCfg(n_tags=n_tags, input_dim=d, **head)
    net.attn_pool = HydraPool(cfg, device="meta")
    state = {}
    for name, meta in net.state_dict().items():
        shape = tuple(meta.shape)
        if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "ff_norm.weight")):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        elif name == "embeds.pos_embed":
            t = 0.5 * torch.randn(shape, generator=g)
        elif name == "attn_pool.q":
            q = torch.randn(shape, generator=g)  # stored RMS-normalised, as the release does
            t = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True))
        elif name == "attn_pool.out_proj.weight":
            t = torch.randn(shape, generator=g) * (2.0 / shape[1] ** 0.5)
        else:  # linear weights (out, in): unit-variance outputs for unit-variance inputs
            fan_in = shape[-1]
            t = torch.randn(shape, generator=g) / fan_in ** 0.5
        state[name] = t.to(dtype)
    return state


def write_model(path: str | os.PathLike, tags: Sequence[str], *, full_size: bool = False,
                backbone: dict | None = None, head: dict | None = None, seed: int = 0,
                extra_metadata: dict[str, str] | None = None) -> str:
    """Write a random-weight JTP-3 model file.

    Args:
        tags: labels in model order (`classifier.labels`).
        full_size: the real dimensions (no `hydra.backbone` metadata at all, exactly like the release).
        backbone / head: overrides of the tiny defaults (ignored with full_size).
    """
    if full_size:
        backbone_cfg, head_cfg = None, FULL_HEAD
    else:
        backbone_cfg = {**TINY_BACKBONE, **(backbone or {})}
        head_cfg = {**TINY_HEAD, **(head or {})}
    state = random_state(backbone_cfg, head_cfg, len(tags), seed)
    meta = {
        KEY_ARCHITECTURE: ARCHITECTURE,
        "modelspec.title": "JTP-3 beta6-pruned" if full_size else "JTP-3 test fixture",
        KEY_LABELS: "\n".join(tags),
        **(extra_metadata or {}),
    }
    if backbone_cfg is not None:
        meta[KEY_BACKBONE] = json.dumps(backbone_cfg)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_safetensors(path, state, meta)
    return os.fspath(path)


def write_extension(path: str | os.PathLike, label: str, *, head: dict | None = None, category: str = "general",
                    implies: Sequence[str] = (), seed: int = 1, validation: torch.Tensor | None = None,
                    q: torch.Tensor | None = None, out_proj: torch.Tensor | None = None) -> str:
    """Write a random extension for a model made with `write_model(head=head)`."""
    h = {**TINY_HEAD, **(head or {})}
    g = torch.Generator().manual_seed(seed)
    a = h["n_heads"] * h["head_dim"]
    if q is None:
        q = torch.randn(h["n_heads"], 1, h["head_dim"], generator=g)
    if out_proj is None:
        out_proj = torch.randn(1, a, 2, generator=g) * (2.0 / a ** 0.5)
    meta = {"classifier.label": label, "classifier.label.category": category,
            "modelspec.title": f"JTP-3 Hydra Extension: {label}"}
    if implies:
        meta["classifier.label.implies"] = " ".join(sorted(implies))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_extension(path, q, out_proj, meta, validation)
    return os.fspath(path)
