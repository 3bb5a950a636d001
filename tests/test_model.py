"""The JTP-3 model: strict loading of the real file format, and our timm-based forward checked against an
independent plain-PyTorch forward written from the documented architecture (docs/formats.md, JTP-3) on the same
random weights.

The reference computes in float64 from the raw state dict: patch projection, bilinear antialiased pos-embed
resize onto the first gh*gw tokens, pre-norm blocks (LayerNorm eps 1e-6, GELU-tanh MLP) with a key-padding
mask, final norm, then the Hydra head (RMSNorm'd K, stored q, masked softmax, SwiGLU FF with residual,
per-tag SwiGLU output). It shares no code with hydra/.

    venv/bin/python -m pytest tests/test_model.py -q            # the full-size test is marked slow
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import noise_image
from safetensors.torch import load_file, save_file

from hydra.images.naflex import JTP3Preprocess, collate
from hydra.models.checkpoint import CheckpointError
from hydra.models.jtp3_net import load_jtp3
from hydra.testing.jtp3 import write_model


def reference_logits(state: dict[str, torch.Tensor], meta: dict[str, str], sample: dict) -> torch.Tensor:
    """Logits (T,) for one unpadded image, float64, written from the documented architecture alone."""
    sd = {k: v.double() for k, v in state.items()}
    cfg = json.loads(meta["hydra.backbone"])
    d, depth, n_heads = cfg["embed_dim"], cfg["depth"], cfg["num_heads"]
    x = torch.tensor(sample["patches"], dtype=torch.float64) / 127.5 - 1.0  # (N, 768)
    coord = torch.tensor(sample["patch_coord"], dtype=torch.long)
    n = x.shape[0]
    x = x @ sd["embeds.proj.weight"].T + sd["embeds.proj.bias"]
    gh, gw = int(coord[:, 0].max()) + 1, int(coord[:, 1].max()) + 1
    pos = sd["embeds.pos_embed"].permute(0, 3, 1, 2)  # (1, D, 16, 16)
    if (gh, gw) != (16, 16):
        pos = F.interpolate(pos, size=(gh, gw), mode="bilinear", align_corners=False, antialias=True)
    x = x + pos[0].permute(1, 2, 0).reshape(gh * gw, d)

    def ln(v, prefix, eps=1e-6):
        return F.layer_norm(v, (v.shape[-1],), sd[prefix + ".weight"], sd[prefix + ".bias"], eps)

    hd = d // n_heads
    for i in range(depth):
        p = f"blocks.{i}."
        h = ln(x, p + "norm1")
        qkv = (h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).view(n, 3, n_heads, hd)
        q, k, v = (qkv[:, j].transpose(0, 1) for j in range(3))  # (heads, N, hd)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1) @ v
        x = x + a.transpose(0, 1).reshape(n, d) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        h = ln(x, p + "norm2")
        h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"], approximate="tanh")
        x = x + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    x = ln(x, "norm")

    qs = sd["attn_pool.q"]  # (H, T, E), used as stored
    hh, t, e = qs.shape
    kv = (x @ sd["attn_pool.kv.weight"].T).view(n, 2, hh, e)
    k, v = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)  # (H, N, E)
    k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + 1e-5)
    att = torch.softmax(qs @ k.transpose(1, 2) / math.sqrt(e), dim=-1) @ v  # (H, T, E)
    y = att.transpose(0, 1).reshape(t, hh * e)
    z = ln(y, "attn_pool.ff_norm", eps=1e-5) @ sd["attn_pool.ff_in.weight"].T
    f = z.shape[-1] // 2
    y = y + (F.silu(z[:, :f]) * z[:, f:]) @ sd["attn_pool.ff_out.weight"].T
    out = torch.einsum("ta,tao->to", y, sd["attn_pool.out_proj.weight"])
    return F.silu(out[:, 0]) * out[:, 1]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    tags = [f"t{i}" for i in range(40)]
    path = tmp_path_factory.mktemp("m") / "m.safetensors"
    write_model(path, tags, backbone={"embed_dim": 96, "depth": 3, "num_heads": 3}, head={"n_heads": 4},
                seed=11)
    return str(path)


def _samples(seqlen=256):
    pre = JTP3Preprocess(seqlen)
    # 16x16 grid (no pos-embed resize), a wide and a tall one (resized grids), one tiny
    return [pre(noise_image(w, h, seed=i)) for i, (w, h) in enumerate([(256, 256), (400, 120), (90, 300), (20, 20)])]


def test_matches_independent_reference_fp32(model_file):
    from safetensors import safe_open

    state = load_file(model_file)
    with safe_open(model_file, "pt") as f:
        meta = f.metadata()
    model = load_jtp3(model_file, dtype=torch.float32)
    samples = _samples()
    with torch.inference_mode():
        batched = model.logits(model.to_device_batch(collate(samples)))  # padded + masked
        for i, s in enumerate(samples):
            ref = reference_logits(state, meta, s).float()
            alone = model.logits(model.to_device_batch(collate([s])))[0]  # unpadded, no mask
            assert (alone - ref).abs().max() < 1e-4
            assert (batched[i] - ref).abs().max() < 1e-4


def test_bf16_within_noise_of_reference(model_file):
    from safetensors import safe_open

    state = load_file(model_file)
    with safe_open(model_file, "pt") as f:
        meta = f.metadata()
    model = load_jtp3(model_file, dtype=torch.bfloat16)
    samples = _samples()
    with torch.inference_mode():
        got = model.logits(model.to_device_batch(collate(samples))).float().sigmoid()
    ref = torch.stack([reference_logits(state, meta, s) for s in samples]).sigmoid().float()
    diff = (got - ref).abs()
    # bf16 vs exact: running the same random weights in fp32 instead of bf16 moves p by mean ~0.003, max ~0.1
    assert diff.mean() < 0.01 and diff.max() < 0.1


def test_padding_and_batch_composition_do_not_change_results(model_file):
    model = load_jtp3(model_file, dtype=torch.float32)
    samples = _samples()
    with torch.inference_mode():
        longest = model.logits(model.to_device_batch(collate(samples)))
        fixed = model.logits(model.to_device_batch(collate(samples, pad_to=256)))
        pairs = model.logits(model.to_device_batch(collate(samples[2:])))
    assert (longest - fixed).abs().max() < 1e-5 and (longest[2:] - pairs).abs().max() < 1e-5


def test_tag_subset_gives_the_same_numbers(model_file):
    model = load_jtp3(model_file, dtype=torch.float32)
    batch = model.to_device_batch(collate(_samples()))
    index = torch.tensor([3, 17, 39])
    with torch.inference_mode():
        full = model.logits(batch)
        part = model.logits(batch, index)
    assert (full[:, index] - part).abs().max() < 1e-5


def test_strict_load_errors(model_file, tmp_path):
    state = load_file(model_file)
    from safetensors import safe_open

    with safe_open(model_file, "pt") as f:
        meta = f.metadata()

    def write(st, md, name):
        path = tmp_path / name
        save_file(st, path, metadata=md)
        return path

    with pytest.raises(CheckpointError, match="missing blocks.1.attn.proj.bias"):
        load_jtp3(write({k: v for k, v in state.items() if k != "blocks.1.attn.proj.bias"}, meta, "a.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected extra.weight"):
        load_jtp3(write({**state, "extra.weight": torch.zeros(2)}, meta, "b.safetensors"))
    bad = dict(state)
    bad["norm.weight"] = torch.zeros(5)
    with pytest.raises(CheckpointError, match=r"wrong shape norm.weight \(5,\)"):
        load_jtp3(write(bad, meta, "c.safetensors"))
    with pytest.raises(CheckpointError, match="unsupported architecture"):
        load_jtp3(write(state, {**meta, "modelspec.architecture": "naflexvit_so400m_patch16_siglip+rr_hydra2"},
                        "d.safetensors"))
    with pytest.raises(CheckpointError, match="lists 2 tags but the head has 40"):
        load_jtp3(write(state, {**meta, "classifier.labels": "a\nb"}, "e.safetensors"))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_jtp3(write(state, {**meta, "hydra.backbone": "{"}, "f.safetensors"))
    junk = tmp_path / "g.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_jtp3(junk)


def test_state_dict_keys_are_the_release_names(model_file):
    model = load_jtp3(model_file)
    keys = set(model.net.state_dict())
    assert {"embeds.proj.weight", "embeds.pos_embed", "blocks.0.attn.qkv.weight", "norm.weight", "attn_pool.q",
            "attn_pool.kv.weight", "attn_pool.ff_norm.bias", "attn_pool.ff_in.weight", "attn_pool.ff_out.weight",
            "attn_pool.out_proj.weight"} <= keys
    assert len(keys) == 5 + 12 * 3 + 7
    assert not any(p.is_meta for p in model.net.parameters())


@pytest.mark.slow
def test_full_size_random_model_in_the_real_format(full_size_model, tags):
    """The real layout: 336 bf16 tensors, 501,225,712 parameters, no test-only metadata; loads strictly
    and tags an image on CPU."""
    from safetensors import safe_open

    path = full_size_model
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in keys)
        assert {f.get_slice(k).get_dtype() for k in keys} == {"BF16"}
    assert len(keys) == 336 and n_params == 501_225_712
    assert set(meta) == {"modelspec.architecture", "modelspec.title", "classifier.labels"}
    assert meta["classifier.labels"].split("\n") == tags
    model = load_jtp3(path, dtype=torch.bfloat16)
    assert model.head.cfg.n_heads == 32 and model.head.cfg.head_dim == 64 and model.head.cfg.ff_dim == 6144
    sample = JTP3Preprocess(256)(noise_image(320, 240))
    with torch.inference_mode():
        p = model.logits(model.to_device_batch(collate([sample]))).float().sigmoid()[0].numpy()
    assert p.shape == (7504,) and np.isfinite(p).all() and 0.01 < p.std()
