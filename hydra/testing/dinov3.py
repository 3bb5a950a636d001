"""Tiny random DINOv3-tagger checkpoints and vocab files in the exact published layout, for tests.

`write_dinov3_checkpoint` writes the key names of `tagger_proto.safetensors` (docs/formats.md:
`backbone.embeddings.*`, `backbone.model.layer.N.*`, `backbone.norm.*`, one head) with small random
tensors, so loaders are exercised exactly as on the 5 GB file. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from hydra.images.naflex import PATCH_SIZE
from hydra.models.checkpoint import KEY_BACKBONE as METADATA_KEY
from hydra.models.dinov3_net import HEAD_DIM


def dinov3_state_dict(
    num_tags: int,
    *,
    width: int = 64,
    depth: int = 2,
    mlp_hidden: int = 128,
    n_registers: int = 4,
    head: str = "dense",
    rank: int = 8,
    head_bias: bool = False,
    head_name: str = "classifier",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random float32 tensors under the published key names (see `write_dinov3_checkpoint`)."""
    if head not in ("dense", "lowrank"):
        raise ValueError(f"head must be 'dense' or 'lowrank', got {head!r}")
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape, std=1.0: torch.randn(*shape, generator=g) * std
    around_one = lambda n: 1.0 + randn(n, std=0.2)  # layer scale / norm gain: random, so mistakes show
    sd = {
        "backbone.embeddings.cls_token": randn(1, 1, width),
        "backbone.embeddings.mask_token": randn(1, 1, width),  # unused at inference, present in the file
        "backbone.embeddings.register_tokens": randn(1, n_registers, width),
        "backbone.embeddings.patch_embeddings.weight": randn(width, 3, PATCH_SIZE, PATCH_SIZE, std=0.05),
        "backbone.embeddings.patch_embeddings.bias": randn(width, std=0.1),
    }
    lin = lambda out_f, in_f: randn(out_f, in_f, std=in_f**-0.5)
    for i in range(depth):
        p = f"backbone.model.layer.{i}."
        sd |= {
            p + "norm1.weight": around_one(width),
            p + "norm1.bias": randn(width, std=0.1),
            p + "attention.q_proj.weight": lin(width, width),
            p + "attention.q_proj.bias": randn(width, std=0.1),
            p + "attention.k_proj.weight": lin(width, width),  # k has no bias in the published model
            p + "attention.v_proj.weight": lin(width, width),
            p + "attention.v_proj.bias": randn(width, std=0.1),
            p + "attention.o_proj.weight": lin(width, width),
            p + "attention.o_proj.bias": randn(width, std=0.1),
            p + "layer_scale1.lambda1": around_one(width),
            p + "norm2.weight": around_one(width),
            p + "norm2.bias": randn(width, std=0.1),
            p + "mlp.gate_proj.weight": lin(mlp_hidden, width),
            p + "mlp.gate_proj.bias": randn(mlp_hidden, std=0.1),
            p + "mlp.up_proj.weight": lin(mlp_hidden, width),
            p + "mlp.up_proj.bias": randn(mlp_hidden, std=0.1),
            p + "mlp.down_proj.weight": lin(width, mlp_hidden),
            p + "mlp.down_proj.bias": randn(width, std=0.1),
            p + "layer_scale2.lambda1": around_one(width),
        }
    sd |= {"backbone.norm.weight": around_one(width), "backbone.norm.bias": randn(width, std=0.1)}

    features = (1 + n_registers) * width
    if head == "dense":
        layers = {f"{head_name}.": (num_tags, features)}
    else:
        layers = {f"{head_name}.proj_down.": (rank, features), f"{head_name}.proj_up.": (num_tags, rank)}
    for prefix, (out_f, in_f) in layers.items():
        sd[prefix + "weight"] = lin(out_f, in_f)
        if head_bias:
            sd[prefix + "bias"] = randn(out_f, std=0.1)
    return sd


def write_dinov3_checkpoint(
    path: str | os.PathLike,
    tags: list[str],
    *,
    width: int = 64,
    depth: int = 2,
    mlp_hidden: int = 128,
    n_registers: int = 4,
    head: str = "dense",
    rank: int = 8,
    head_bias: bool = False,
    head_name: str = "classifier",
    seed: int = 0,
    fmt: str = "safetensors",
    num_heads: int | None = None,
) -> dict[str, torch.Tensor]:
    """Write a random DINOv3 tagger checkpoint in the published key layout.

    Args:
        path: output file.
        tags: the vocabulary; the head gets one output row per tag.
        width, depth, mlp_hidden, n_registers: backbone dimensions (D, layers, SwiGLU hidden, R).
        head: "dense" (one (T, F) weight) or "lowrank" ((r, F) and (T, r) weights).
        rank: r for the low-rank head.
        head_bias: give every head weight a bias.
        head_name: key prefix of the head (the published file's name is not known; loaders find it by shape).
        seed: RNG seed.
        fmt: "safetensors" or "pt" (a plain `torch.save` state dict).
        num_heads: attention heads; anything but width / 64 is stored in the `hydra.backbone` metadata,
            which only safetensors files can carry.

    Returns:
        The state dict that was written.
    """
    sd = dinov3_state_dict(len(tags), width=width, depth=depth, mlp_hidden=mlp_hidden, n_registers=n_registers,
                           head=head, rank=rank, head_bias=head_bias, head_name=head_name, seed=seed)
    metadata = None
    if num_heads is not None and num_heads * HEAD_DIM != width:
        metadata = {METADATA_KEY: json.dumps({"num_heads": num_heads})}
    if fmt == "safetensors":
        save_file(sd, os.fspath(path), metadata=metadata)
    elif fmt == "pt":
        if metadata:
            raise ValueError(f"fmt='pt' cannot carry num_heads={num_heads}; use safetensors or width={num_heads * 64}")
        torch.save(sd, path)
    else:
        raise ValueError(f"fmt must be 'safetensors' or 'pt', got {fmt!r}")
    return sd


def write_vocab(path: str | os.PathLike, tags: list[str], categories: dict[str, int] | None = None) -> None:
    """Write a `tagger_vocab.json` (`{"idx2tag": tags}`), plus `tag2category` when given."""
    data: dict = {"idx2tag": list(tags)}
    if categories is not None:
        data["tag2category"] = categories
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
