"""The JTP-3 backbone: timm's `naflexvit_so400m_patch16_siglip` (SigLIP2 So400m/16 NaFlex), built empty.

The checkpoint's backbone keys (`embeds.*`, `blocks.N.*`, `norm.*`) are already timm's names, so no key
mapping is needed. What differs from timm's defaults, and why:

- `pos_embed_interp_mode="bilinear"` (antialiased, float32 interpolation then cast): the release's setting.
- `use_key_only_attn_mask=True`: the release masks padded *keys* only, shape (B, 1, 1, S); padded query
  rows stay finite. timm builds this as an additive float mask, which is right on both its fused (SDPA) and
  its manual attention paths (a boolean mask would be silently wrong on the manual one: it is *added* to
  the scores there).
- `global_pool=""` and `num_classes=0`: the MAP pool and classifier are replaced by the Hydra head.
- Built on the meta device: timm's random init of ~430M parameters costs seconds and is thrown away; the
  weights are assigned straight from the file instead (the release's `weight_init="skip"` is refused by
  timm >= 1.0.23).
- LayerNorm eps is timm's 1e-6, as in the release (upstream's later own ViT uses torch's 1e-5; the difference
  is below bf16 noise).
- Attention always takes timm's fused path (`F.scaled_dot_product_attention`), whatever `TIMM_FUSED_ATTN`
  says: it is the release's path, keeps the scores in fp32, and on CPU its flash kernel ran ~2.5x faster
  than timm's manual attention in bf16 (measured on a 2-core Zen 4 at 1,024 tokens: 62 vs 24 GFLOP/s).

Test models: `overrides` (from the file's `hydra.backbone` metadata) change `embed_dim`, `depth`,
`num_heads` or `mlp_ratio` and keep every key name.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.models.naflexvit import NaFlexVit

from hydra.models.checkpoint import BACKBONE

OVERRIDABLE = ("embed_dim", "depth", "num_heads", "mlp_ratio")


def create_backbone(overrides: dict[str, Any] | None = None, device: str | torch.device = "meta",
                    dtype: torch.dtype | None = None) -> NaFlexVit:
    """An uninitialised NaFlexVit with the release's settings, on `device` (default: meta, no memory).

    Args:
        overrides: timm constructor overrides for small test models; only `OVERRIDABLE` keys.
    """
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(OVERRIDABLE)
    if unknown:
        raise ValueError(f"hydra.backbone: unsupported key(s) {sorted(unknown)}; allowed: {list(OVERRIDABLE)}")
    with torch.device(device):
        model = timm.create_model(
            BACKBONE, pretrained=False, num_classes=0, global_pool="",
            pos_embed_interp_mode="bilinear", use_key_only_attn_mask=True, fix_init=False,
            dtype=dtype, **overrides,
        )
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    return model
