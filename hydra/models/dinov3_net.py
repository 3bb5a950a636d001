"""DINOv3 ViT-H/16+ booru tagger ("taggerine"): checkpoint loading onto timm, the model, preprocessing.

The published checkpoint `tagger_proto.safetensors` holds a transformers-v5 `DINOv3ViTModel` under
`backbone.` and one linear head (74,625 tags) over the final-normed CLS + 4 register tokens
(docs/formats.md, DINOv3 tagger). We build the backbone through timm's `vit_huge_plus_patch16_dinov3_qkvb` and map the
keys in one table (`_key_table`); all dimensions come from tensor shapes, so tiny test checkpoints in the
same layout load the same way.

Two things differ from a plain timm DINOv3 and are reproduced for parity with the published script:
- RoPE patch coordinates are multiplied by 2 at inference (`ROPE_RESCALE`); timm, Meta and transformers
  only use that factor as a random train-time augmentation, and without it the logits differ by O(1).
- Preprocessing (in `hydra/images/dinov3.py`, torch-free for loader workers): long edge capped at
  1024 and each side floored to a multiple of 16, LANCZOS, alpha dropped, no EXIF orientation
  (docs/preprocessing.md). `DinoV3Preprocess` can fix the last two behind flags.

Shape legend: B = images, H, W = pixel height / width, h, w = patch grid (H/16, W/16),
R = register tokens, N = tokens (1 + R + h·w), D = embed width, F = features ((1 + R)·D),
r = low-rank head rank, T = tags.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from itertools import chain

import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3
from torch import Tensor, nn

from hydra.images.naflex import PATCH_SIZE
from hydra.models.checkpoint import KEY_BACKBONE as METADATA_KEY  # JSON object of timm constructor overrides
from hydra.models.vocab import Vocab, load_vocab

TIMM_MODEL = "vit_huge_plus_patch16_dinov3_qkvb"  # the _qkvb variant keeps the trained q / v biases
HEAD_DIM = 64  # attention heads = width / 64 unless the checkpoint metadata says otherwise
ROPE_RESCALE = 2.0  # the published script's constant RoPE coordinate scale, applied on every call

# ---------------------------------------------------------------------------------------------------------
# Checkpoint reading and key mapping


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a tagger checkpoint into CPU tensors.

    `.safetensors` / `.sft` are read with safetensors; anything else goes through
    `torch.load(weights_only=True)`, which refuses to unpickle arbitrary objects.

    Returns:
        (state_dict, metadata); metadata is the safetensors `__metadata__` block ({} for torch files).
    """
    name = os.fspath(path)
    if name.endswith((".safetensors", ".sft")):
        try:
            with safe_open(name, framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except SafetensorError as e:
            raise ValueError(f"{name}: not a readable safetensors file ({e})") from None
    if not os.path.exists(name):
        raise FileNotFoundError(name)
    try:
        obj = torch.load(name, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0]
        raise ValueError(f"{name}: not a plain tensor checkpoint, refusing to unpickle it ({reason})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{name}: expected a dict of tensors, got {type(obj).__name__}")
    return obj, {}


def _key_table(depth: int) -> dict[str, str]:
    """Checkpoint backbone key (without `backbone.`) -> timm key. q/k/v weights all map to the fused qkv."""
    table = {
        "embeddings.cls_token": "cls_token",
        "embeddings.register_tokens": "reg_token",
        "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
        "norm.weight": "norm.weight",
        "norm.bias": "norm.bias",
    }
    per_layer = {
        "norm1.weight": "norm1.weight",
        "norm1.bias": "norm1.bias",
        "attention.q_proj.weight": "attn.qkv.weight",  # rows concatenated in order q, k, v
        "attention.k_proj.weight": "attn.qkv.weight",
        "attention.v_proj.weight": "attn.qkv.weight",
        "attention.q_proj.bias": "attn.q_bias",  # no k bias: timm's k_bias is a zero, non-persistent buffer
        "attention.v_proj.bias": "attn.v_bias",
        "attention.o_proj.weight": "attn.proj.weight",
        "attention.o_proj.bias": "attn.proj.bias",
        "layer_scale1.lambda1": "gamma_1",
        "layer_scale2.lambda1": "gamma_2",
        "norm2.weight": "norm2.weight",
        "norm2.bias": "norm2.bias",
        "mlp.gate_proj.weight": "mlp.fc1_g.weight",
        "mlp.gate_proj.bias": "mlp.fc1_g.bias",
        "mlp.up_proj.weight": "mlp.fc1_x.weight",
        "mlp.up_proj.bias": "mlp.fc1_x.bias",
        "mlp.down_proj.weight": "mlp.fc2.weight",
        "mlp.down_proj.bias": "mlp.fc2.bias",
    }
    for i in range(depth):
        table.update({f"model.layer.{i}.{src}": f"blocks.{i}.{dst}" for src, dst in per_layer.items()})
    return table


def _is_dropped(key: str) -> bool:
    # mask_token is a pretraining leftover; RoPE buffers are recomputed (the published loader drops both too)
    return key == "embeddings.mask_token" or "rope_embeddings" in key


def _list_keys(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"'backbone.{k}'" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def split_checkpoint(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split into (backbone, head) the way the published loader does.

    Backbone keys lose `backbone.`; transformers-4.x `layer.N.*` is renamed to the v5 `model.layer.N.*`;
    `mask_token` and `rope_embeddings` keys are dropped. Every non-`backbone.` key belongs to the head.
    """
    backbone, head = {}, {}
    for key, tensor in state_dict.items():
        if not key.startswith("backbone."):
            head[key] = tensor
            continue
        key = key.removeprefix("backbone.")
        if key.startswith("layer."):
            key = "model." + key
        if not _is_dropped(key):
            backbone[key] = tensor
    return backbone, head


def _depth(backbone: dict[str, Tensor], source: str) -> int:
    layers = {int(m.group(1)) for k in backbone if (m := re.match(r"model\.layer\.(\d+)\.", k))}
    if not layers:
        raise ValueError(f"{source}: no 'backbone.model.layer.N.*' keys; is this a DINOv3 tagger checkpoint?")
    return max(layers) + 1


def _check_key_set(backbone: dict[str, Tensor], table: dict[str, str], source: str) -> None:
    unknown = sorted(set(backbone) - set(table))
    if unknown:
        raise ValueError(f"{source}: unexpected backbone key(s) {_list_keys(unknown)}")
    missing = [k for k in table if k not in backbone]
    if missing:
        raise ValueError(f"{source}: missing backbone key(s) {_list_keys(missing)}")


def backbone_kwargs(backbone: dict[str, Tensor], metadata: dict[str, str], source: str) -> dict:
    """timm constructor arguments for this checkpoint, all read from tensor shapes (+ metadata overrides)."""
    width = backbone["embeddings.cls_token"].shape[-1]
    registers = backbone["embeddings.register_tokens"]
    if registers.ndim != 3:
        raise ValueError(f"{source}: 'backbone.embeddings.register_tokens' has shape {tuple(registers.shape)},"
                         " expected (1, R, D)")
    hidden = backbone["model.layer.0.mlp.gate_proj.weight"].shape[0]
    kwargs = dict(
        embed_dim=width,
        depth=_depth(backbone, source),
        num_heads=width // HEAD_DIM,
        # timm computes hidden = int(D * mlp_ratio); the +0.5 keeps float error from truncating a unit away
        mlp_ratio=(hidden + 0.5) / width,
        swiglu_align_to=1,  # keeps timm's split fc1_g / fc1_x SwiGLU without padding the hidden size
        num_reg_tokens=registers.shape[1],
        global_pool="token",  # unused by the tagger (it reads tokens), but CLS pooling matches upstream DINOv3
    )
    if METADATA_KEY in metadata:
        try:
            overrides = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: metadata '{METADATA_KEY}' is not JSON ({e.msg})") from None
        if not isinstance(overrides, dict):
            raise ValueError(f"{source}: metadata '{METADATA_KEY}' must be a JSON object, got {overrides!r}")
        kwargs.update(overrides)
    elif width % HEAD_DIM:
        raise ValueError(f"{source}: width {width} is not a multiple of {HEAD_DIM}; "
                         f"give num_heads in the '{METADATA_KEY}' metadata")
    return kwargs


def backbone_to_timm(
    backbone: dict[str, Tensor], expected: dict[str, torch.Size], source: str
) -> dict[str, Tensor]:
    """Rename checkpoint backbone keys to timm's and fuse q/k/v, checking every shape.

    Args:
        backbone: checkpoint backbone tensors as returned by `split_checkpoint`.
        expected: timm key -> shape of the model being loaded.
        source: file name for error messages.
    """
    table = _key_table(_depth(backbone, source))
    _check_key_set(backbone, table, source)
    for key, dst in table.items():
        want = expected[dst]
        if dst.endswith("attn.qkv.weight"):
            want = torch.Size((want[0] // 3, want[1]))  # each of q, k, v is one third of the fused rows
        if backbone[key].shape != want:
            raise ValueError(f"{source}: 'backbone.{key}' has shape {tuple(backbone[key].shape)}, "
                             f"expected {tuple(want)}")
    out: dict[str, Tensor] = {}
    for key, dst in table.items():
        if key.endswith("q_proj.weight"):
            stem = key.removesuffix("q_proj.weight")
            out[dst] = torch.cat([backbone[f"{stem}{p}_proj.weight"] for p in "qkv"])  # (3·D, D)
        elif not dst.endswith("attn.qkv.weight"):
            out[dst] = backbone[key]
    return out


# ---------------------------------------------------------------------------------------------------------
# RoPE with the published script's constant coordinate scale


class RescaledRotaryEmbeddingDinoV3(RotaryEmbeddingDinoV3):
    """timm's DINOv3 RoPE with patch coordinates multiplied by `coord_scale` at inference too.

    timm (like Meta and transformers) applies `rescale_coords` only as a random train-time augmentation;
    the published tagger multiplies its ((i + 0.5) / n)·2 - 1 coordinates by 2 on every call, and the
    outputs differ by O(1) logits without it. Every timm code path (dynamic size, cached grid,
    batched shapes) goes through `_get_pos_embed_from_coords`, so scaling there covers them all.
    """

    coord_scale: float = 1.0

    def _get_pos_embed_from_coords(self, coords: Tensor) -> tuple[Tensor, Tensor]:
        return super()._get_pos_embed_from_coords(coords * self.coord_scale)  # coords: (h·w, 2)


def rescale_rope(backbone: nn.Module, scale: float) -> None:
    """Make `backbone.rope` (timm's `RotaryEmbeddingDinoV3`) scale its coordinates by `scale`."""
    rope = backbone.rope
    if not isinstance(rope, RotaryEmbeddingDinoV3):
        raise TypeError(f"expected timm's RotaryEmbeddingDinoV3, got {type(rope).__name__}")
    # Swapping the class keeps every constructor setting and buffer timm gave the module; only the one
    # method above changes. Rebuilding it from attributes would silently miss options timm adds later.
    rope.__class__ = RescaledRotaryEmbeddingDinoV3
    rope.coord_scale = float(scale)


def _materialise_buffers(module: nn.Module) -> None:
    """Give the non-persistent buffers left on the meta device (RoPE periods, zero k_bias) real values."""
    for m in module.modules():
        for name, buf in list(m.named_buffers(recurse=False)):
            if buf.is_meta:
                m.register_buffer(name, torch.empty_like(buf, device="cpu"), persistent=False)
    for m in module.modules():
        if hasattr(m, "init_non_persistent_buffers"):  # timm's hook for recomputing derived buffers
            m.init_non_persistent_buffers()
    left = [n for n, t in chain(module.named_parameters(), module.named_buffers()) if t.is_meta]
    assert not left, f"tensors still on the meta device after loading: {left}"


# ---------------------------------------------------------------------------------------------------------
# Head


class LowRankHead(nn.Module):
    """Two stacked linear maps F -> r -> T: the low-rank head layout the published loader also accepts."""

    def __init__(self, num_features: int, rank: int, num_tags: int, down_bias: bool, up_bias: bool):
        super().__init__()
        self.proj_down = nn.Linear(num_features, rank, bias=down_bias)
        self.proj_up = nn.Linear(rank, num_tags, bias=up_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj_up(self.proj_down(x))  # (B, F) -> (B, r) -> (B, T)


def build_head(
    head: dict[str, Tensor], num_features: int, num_tags: int, source: str, vocab_source: str
) -> nn.Module:
    """Auto-detect the head among the non-`backbone.` keys and return it as a float32 module.

    Accepted: one 2-D `*.weight` of shape (T, F) with optional `.bias` (an `nn.Linear`), or a low-rank
    pair (r, F) and (T, r), each with optional bias (a `LowRankHead`). Key names are free.

    Args:
        head: the head tensors from `split_checkpoint`.
        num_features: F = (1 + R)·D, the backbone feature size.
        num_tags: T, the vocabulary length, which the head's output size must equal.
        source, vocab_source: file names for error messages.
    """
    weights = {k.removesuffix(".weight"): v for k, v in head.items() if k.endswith(".weight")}
    biases = {k.removesuffix(".bias"): v for k, v in head.items() if k.endswith(".bias")}
    stray = [k for k in head if not k.endswith((".weight", ".bias"))]
    stray += [f"{k}.bias" for k in biases if k not in weights]
    if stray:
        raise ValueError(f"{source}: unexpected non-backbone key(s) {stray}; the head has only .weight/.bias")
    for k, w in weights.items():
        if w.ndim != 2:
            raise ValueError(f"{source}: head weight '{k}.weight' has shape {tuple(w.shape)}, expected 2-D")
        if k in biases and biases[k].shape != w.shape[:1]:
            raise ValueError(f"{source}: head bias '{k}.bias' has shape {tuple(biases[k].shape)}, "
                             f"expected ({w.shape[0]},)")

    def check_tags(rows: int) -> None:
        if rows != num_tags:
            raise ValueError(f"{source}: the head predicts {rows} tags but {vocab_source} lists {num_tags} tags")

    shapes = {f"{k}.weight": tuple(w.shape) for k, w in weights.items()}
    if len(weights) == 1:
        (name, w), = weights.items()
        if w.shape[1] != num_features:
            raise ValueError(f"{source}: head weight '{name}.weight' has {w.shape[1]} input features, "
                             f"the backbone gives {num_features} (CLS + registers × width)")
        check_tags(w.shape[0])
        with torch.device("meta"):  # no throw-away init: the real head is 74,625 × 6,400
            module = nn.Linear(num_features, num_tags, bias=name in biases)
        state = {"weight": w} | ({"bias": biases[name]} if name in biases else {})
    elif len(weights) == 2:
        orders = [(a, b) for a, b in (tuple(weights), tuple(weights)[::-1])
                  if weights[a].shape[1] == num_features and weights[b].shape[1] == weights[a].shape[0]]
        if len(orders) != 1:
            raise ValueError(f"{source}: cannot read head weights {shapes} as a low-rank pair (r, {num_features})"
                             " and (T, r)")
        down, up = orders[0]
        check_tags(weights[up].shape[0])
        with torch.device("meta"):
            module = LowRankHead(num_features, weights[down].shape[0], num_tags, down in biases, up in biases)
        state = {f"proj_{role}.{kind}": t for role, key in (("down", down), ("up", up))
                 for kind, t in (("weight", weights[key]), ("bias", biases.get(key))) if t is not None}
    else:
        raise ValueError(f"{source}: expected one dense head weight (T, F) or a low-rank pair, found {shapes}")
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return module


# ---------------------------------------------------------------------------------------------------------
# Model


class DinoV3Tagger(nn.Module):
    """timm DINOv3 backbone + linear (or low-rank) tag head over the normed CLS and register tokens.

    The backbone may run in bf16; features are cast to float32 before the head, which stays float32
    (as in the published script and the card's training setup). To change precision later, cast
    `model.backbone` only: `model.to(dtype)` would cast the head too.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_prefix_tokens: int = backbone.num_prefix_tokens  # 1 + R
        self.num_features: int = self.num_prefix_tokens * backbone.embed_dim  # F
        self.head_type = "lowrank" if isinstance(head, LowRankHead) else "dense"

    @property
    def dtype(self) -> torch.dtype:
        """Backbone compute dtype."""
        return self.backbone.cls_token.dtype

    def forward_features(self, pixels: Tensor) -> Tensor:
        """Image descriptor the head reads.

        Args:
            pixels: (B, 3, H, W) normalised images, H and W multiples of 16.

        Returns:
            (B, F) float32: final-normed CLS then registers reg0..reg{R-1}, flattened.
        """
        assert pixels.ndim == 4 and pixels.shape[-1] % PATCH_SIZE == 0 and pixels.shape[-2] % PATCH_SIZE == 0, (
            f"expected (B, 3, H, W) with H, W multiples of {PATCH_SIZE}, got {tuple(pixels.shape)}")
        tokens = self.backbone.forward_features(pixels.to(self.dtype))  # (B, N, D), final norm applied
        return tokens[:, : self.num_prefix_tokens].flatten(1).float()  # (B, F)

    @property
    def head_device(self) -> torch.device:
        return next(self.head.parameters()).device

    def head_rows(self, feats: Tensor, tags: Tensor | None = None) -> Tensor:
        """The head's logits (B, T) for features (B, F), or only the columns in `tags` (same numbers, less work)."""
        head = self.head
        if tags is None:
            return head(feats)
        if isinstance(head, nn.Linear):
            return F.linear(feats, head.weight[tags], None if head.bias is None else head.bias[tags])
        up = head.proj_up  # low-rank pair: down-project once, then only the needed rows of the up matrix
        return F.linear(head.proj_down(feats), up.weight[tags], None if up.bias is None else up.bias[tags])

    def forward(self, pixels: Tensor) -> Tensor:
        """Tag logits (apply sigmoid for probabilities).

        Args:
            pixels: (B, 3, H, W) normalised images, H and W multiples of 16.

        Returns:
            (B, T) float32 logits.
        """
        return self.head(self.forward_features(pixels))  # (B, T)


def build_dinov3(
    state_dict: dict[str, Tensor],
    num_tags: int,
    *,
    metadata: dict[str, str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    rope_scale: float = ROPE_RESCALE,
    source: str = "<checkpoint>",
    vocab_source: str = "<vocab>",
) -> DinoV3Tagger:
    """Build a `DinoV3Tagger` from a tagger state dict (see `load_dinov3` for the arguments).

    The backbone is created on the meta device and the checkpoint tensors are assigned into it, so no
    random initialisation is computed and (in float32 on CPU) the file's tensors are not copied.
    """
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    backbone_sd, head_sd = split_checkpoint(state_dict)
    _check_key_set(backbone_sd, _key_table(_depth(backbone_sd, source)), source)
    kwargs = backbone_kwargs(backbone_sd, metadata or {}, source)
    try:
        backbone = timm.create_model(TIMM_MODEL, pretrained=False, num_classes=0, device="meta", **kwargs)
    except (TypeError, AssertionError, ValueError) as e:
        raise ValueError(f"{source}: cannot build {TIMM_MODEL} with {kwargs}: {e}") from None
    expected = {k: v.shape for k, v in backbone.state_dict().items()}
    backbone.load_state_dict(backbone_to_timm(backbone_sd, expected, source), strict=True, assign=True)
    _materialise_buffers(backbone)
    rescale_rope(backbone, rope_scale)
    num_features = backbone.num_prefix_tokens * backbone.embed_dim
    head = build_head(head_sd, num_features, num_tags, source, vocab_source)
    model = DinoV3Tagger(backbone.to(device=device, dtype=dtype), head.to(device))
    return model.eval()


def load_dinov3(
    checkpoint_path: str | os.PathLike,
    vocab_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    rope_scale: float = ROPE_RESCALE,
) -> tuple[DinoV3Tagger, Vocab]:
    """Load the DINOv3 tagger and its vocabulary.

    Args:
        checkpoint_path: `tagger_proto.safetensors` (or `.sft`), or a `.pt`/`.pth` state dict.
        vocab_path: `tagger_vocab.json` or a `*_with_categories*.json` variant.
        device: where the model runs.
        dtype: backbone dtype; None = bfloat16 on CUDA (as published), float32 elsewhere.
            The head always stays float32.
        rope_scale: RoPE coordinate scale; 2.0 reproduces the published script, 1.0 is what
            Meta / timm / transformers use at inference (which one tags better is unmeasured).

    Returns:
        (model in eval mode, vocab); `model(pixels)` gives (B, T) float32 logits in vocab order.

    Raises:
        ValueError: unreadable file, unmapped / missing / mis-shaped key, unrecognised head, or a
            head size that differs from the vocabulary length; the message names the key or files.
    """
    vocab = load_vocab(vocab_path)
    source = os.fspath(checkpoint_path)
    state_dict, metadata = read_checkpoint(source)
    model = build_dinov3(state_dict, len(vocab), metadata=metadata, device=device, dtype=dtype,
                         rope_scale=rope_scale, source=source, vocab_source=os.fspath(vocab_path))
    return model, vocab
