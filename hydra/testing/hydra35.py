"""Random-weight Hydra 3.5 model and v2 extension files in the exact real layout, for tests (never a download).

`write_hydra35_model(path, labels)` writes a tiny model: a small backbone declared in the `hydra.backbone`
metadata and a small pool (2 heads x 16, FF 48, one mid-block), whose sizes the loader reads from the
tensor shapes. `full_size=True` writes every key, shape, dtype and metadata field of the real
`hydra-3.5.safetensors` (about 1.06 GB for 8,886 tags) and no test-only metadata.

The random weights are scaled so that activations stay near unit variance and the tags' probabilities
spread across (0, 1) and depend on the image. The validation table holds plausible counts: per tag a
number of positives and negatives, and scores of each drawn from a logit-normal, so tp and fp fall as the
threshold rises and tp + fn, fp + tn stay constant.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch

from hydra.models.checkpoint import KEY_ARCHITECTURE, KEY_BACKBONE, KEY_LABELS, save_safetensors
from hydra.models.extensions_v2 import KEY_IMPLIEDBY, KEY_MODEL, KEY_SAI, SAI_MODEL_SPEC, save_extension_v2
from hydra.models.hydra35_net import (
    ARCHITECTURE,
    KEY_BACKGROUND,
    KEY_RESIZE,
    KEY_TITLE,
    KEY_VALIDATION,
    Hydra2Cfg,
    build_hydra35_net,
)

TINY_BACKBONE = {"embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
TINY_POOL = {"n_heads": 2, "head_dim": 16, "ff_dim": 48, "mid_blocks": 1}
FULL_POOL = {"n_heads": 32, "head_dim": 64, "ff_dim": 5120, "mid_blocks": 1}
N_THRESHOLDS = 99  # the real table's rows per tag: thresholds 0.01 ... 0.99
TITLE = "Hydra 3.5 test fixture"  # the real title is not known


def random_state(backbone: dict | None, pool: dict, n_tags: int, seed: int = 0,
                 dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A state dict with the real key names, filled with scaled random values (backbone as JTP-3's fixture)."""
    g = torch.Generator().manual_seed(seed)
    net = build_hydra35_net(pool_cfg(pool, n_tags, backbone), backbone, device="meta")
    state = {}
    for name, meta in net.state_dict().items():
        shape = tuple(meta.shape)
        if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        elif name == "embeds.pos_embed":
            t = 0.5 * torch.randn(shape, generator=g)
        elif name == "attn_pool.q":
            # RMS 2 (L2 norm 2 sqrt(E)): sharper attention than upstream's init (RMS 1), so the pooled
            # vectors, and with them the probabilities, differ clearly between images.
            q = torch.randn(shape, generator=g)
            t = 2.0 * q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True))
        elif name == "head.weight":
            # Each residual add (FF, and per mid-block o_proj and FF) adds about unit variance to the pooled
            # vectors; rows scaled so the logits have std ~1.5 for any mid-block count: ~95% of the
            # probabilities fall in (0.05, 0.95).
            t = torch.randn(shape, generator=g) * (3.0 / (1 + 2 * pool["mid_blocks"]) / shape[-1]) ** 0.5
        else:  # linear weights (out, in): unit-variance outputs for unit-variance inputs
            t = torch.randn(shape, generator=g) / shape[-1] ** 0.5
        state[name] = t.to(dtype)
    return state


def pool_cfg(pool: dict, n_tags: int, backbone: dict | None = None) -> Hydra2Cfg:
    """The Hydra2Cfg for `pool` (a TINY_POOL / FULL_POOL-like dict) on a backbone of width `embed_dim`."""
    width = (backbone or {}).get("embed_dim", 1152)
    return Hydra2Cfg(n_tags=n_tags, input_dim=width, **pool)


def random_validation(n_tags: int, seed: int = 0, n_thresholds: int = N_THRESHOLDS) -> np.ndarray:
    """Plausible (T, n, 4) int32 [tp, fp, tn, fn] counts at thresholds (i + 1) / (n + 1), monotone in i."""
    rng = np.random.default_rng(seed)
    total = 20_000
    pos = rng.integers(5, 2_000, n_tags)  # (T,)
    neg = total - pos  # (T,)
    thr = np.arange(1, n_thresholds + 1) / (n_thresholds + 1)  # (n,)
    z = np.log(thr / (1 - thr))  # (n,) logit of the threshold
    mu_pos, mu_neg = rng.normal(1.5, 1.0, n_tags), rng.normal(-3.0, 1.0, n_tags)  # (T,) mean score logits
    surv_pos = 0.5 * (1 - _erf((z[None] - mu_pos[:, None]) / np.sqrt(2)))  # (T, n) share of positives above
    surv_neg = 0.5 * (1 - _erf((z[None] - mu_neg[:, None]) / np.sqrt(2)))  # (T, n)
    tp = np.round(pos[:, None] * surv_pos).astype(np.int64)  # (T, n), rounding keeps it non-increasing
    fp = np.round(neg[:, None] * surv_neg).astype(np.int64)  # (T, n)
    return np.stack([tp, fp, neg[:, None] - fp, pos[:, None] - tp], axis=-1).astype(np.int32)  # (T, n, 4)


def _erf(x: np.ndarray) -> np.ndarray:
    return torch.special.erf(torch.from_numpy(x)).numpy()


def label_rows(labels: Sequence[str], categories: Sequence[str] | None = None,
               implies: Sequence[Sequence[str]] | None = None) -> str:
    """`classifier.labels`: rows `tag category implied...` joined by "\\n" (no trailing newline)."""
    categories = categories or ["general"] * len(labels)
    implies = implies or [()] * len(labels)
    assert len(categories) == len(implies) == len(labels), (len(labels), len(categories), len(implies))
    return "\n".join(" ".join([t, c, *i]) for t, c, i in zip(labels, categories, implies))


def write_hydra35_model(path: str | os.PathLike, labels: Sequence[str], *, full_size: bool = False,
                        backbone: dict | None = None, head: dict | None = None, seed: int = 0,
                        categories: Sequence[str] | None = None, implies: Sequence[Sequence[str]] | None = None,
                        validation: np.ndarray | torch.Tensor | None = None, background: str | None = "black",
                        resize: str | None = "lanczos", title: str = TITLE,
                        extra_metadata: dict[str, str] | None = None) -> str:
    """Write a random-weight Hydra 3.5 model file.

    Args:
        labels: tags in model order.
        full_size: the real dimensions (no `hydra.backbone` metadata at all, exactly like the release).
        backbone / head: overrides of TINY_BACKBONE / TINY_POOL (ignored with full_size).
        categories / implies: per label (default: general, no implications).
        validation: (T, n, 4) counts written as given (default: `random_validation`, int32, n = 99).
        background / resize: `classifier.background` / `classifier.resize`; None leaves the key out.
        extra_metadata: added last (may override anything).
    """
    if full_size:
        backbone_cfg, pool = None, FULL_POOL
    else:
        backbone_cfg, pool = {**TINY_BACKBONE, **(backbone or {})}, {**TINY_POOL, **(head or {})}
    state = random_state(backbone_cfg, pool, len(labels), seed)
    state[KEY_VALIDATION] = torch.as_tensor(random_validation(len(labels), seed) if validation is None
                                            else validation)
    meta = {
        KEY_SAI: SAI_MODEL_SPEC,
        KEY_ARCHITECTURE: ARCHITECTURE,
        KEY_TITLE: title,
        "modelspec.license": "Apache-2.0",
        KEY_LABELS: label_rows(labels, categories, implies),
    }
    if background is not None:
        meta[KEY_BACKGROUND] = background
    if resize is not None:
        meta[KEY_RESIZE] = resize
    if backbone_cfg is not None:
        meta[KEY_BACKBONE] = json.dumps(backbone_cfg)
    meta.update(extra_metadata or {})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_safetensors(path, state, meta)
    return os.fspath(path)


def write_hydra35_extension(path: str | os.PathLike, label: str, base_title: str = TITLE, *,
                            head: dict | None = None, full_size: bool = False, category: str | None = "general",
                            implies: Sequence[str] = (), impliedby: Sequence[str] = (), seed: int = 1,
                            validation: np.ndarray | torch.Tensor | None = None, q: torch.Tensor | None = None,
                            head_weight: torch.Tensor | None = None,
                            extra_metadata: dict[str, str] | None = None) -> str:
    """Write a random v2 extension for a model made with `write_hydra35_model(head=head)`.

    Args:
        base_title: `classifier.model`, the title of the model it extends.
        category: `classifier.label.category`; None leaves the key out (the reader's default is general).
        q / head_weight: (H, 1, E) / (1, A) parameters (default: random, scaled like the model's).
        validation: (n, 4) counts (default: random, n = 99).
    """
    pool = FULL_POOL if full_size else {**TINY_POOL, **(head or {})}
    g = torch.Generator().manual_seed(seed)
    h, e = pool["n_heads"], pool["head_dim"]
    if q is None:
        q = torch.randn(h, 1, e, generator=g)
        q = 2.0 * q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True))
    if head_weight is None:
        head_weight = torch.randn(1, h * e, generator=g) / (h * e) ** 0.5
    if validation is None:
        validation = random_validation(1, seed)[0]
    meta = {KEY_MODEL: base_title, "classifier.label": label}
    if category is not None:
        meta["classifier.label.category"] = category
    if implies:
        meta["classifier.label.implies"] = " ".join(implies)
    if impliedby:
        meta[KEY_IMPLIEDBY] = " ".join(impliedby)
    meta.update(extra_metadata or {})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_extension_v2(path, q, head_weight, meta, validation)
    return os.fspath(path)
