"""The Hydra head's chunked forward (hydra/models/head.py): running the tags in chunks gives the plain one-pass
computation's numbers, with or without the padding mask, for tag subsets, on the GPU chunk size, and with
gradients (training runs through the same forward).

    venv/bin/python -m pytest tests/test_head.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hydra.models.head as head_module
from hydra.models.head import HydraCfg, HydraPool, swiglu


def _pool(n_tags: int = 37, dtype: torch.dtype = torch.float32, seed: int = 0) -> HydraPool:
    g = torch.Generator().manual_seed(seed)
    cfg = HydraCfg(n_tags=n_tags, n_heads=4, head_dim=16, input_dim=48, ff_dim=96)
    pool = HydraPool(cfg, dtype=dtype)
    with torch.no_grad():
        for p in pool.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        pool.q.copy_(F.rms_norm(pool.q, (16,)))
        pool.ff_norm.weight.fill_(1.0)
    return pool.requires_grad_(False)


def _plain(pool: HydraPool, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The documented forward (docs/formats.md, JTP-3) in one pass over all tags, written out (no chunks)."""
    b, s, _ = x.shape
    kv = pool.kv(x).view(b, s, 2, 4, 16).permute(2, 0, 3, 1, 4)
    k, v = F.rms_norm(kv[0], (16,), eps=1e-5), kv[1]
    mask = None if valid is None else valid[:, None, None, :]
    y = F.scaled_dot_product_attention(pool.q.expand(b, -1, -1, -1), k, v, attn_mask=mask)
    y = y.transpose(1, 2).reshape(b, -1, 64)
    y = y + pool.ff_out(swiglu(pool.ff_in(pool.ff_norm(y))))
    return swiglu(torch.einsum("bta,tao->bto", y, pool.out_proj.weight)).squeeze(-1)


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 20, 48, generator=g)
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[1, 15:] = False
    return x, valid


@pytest.mark.parametrize("rows", [24, 3, 1 << 20])  # five chunks with a short last one; one tag each; one pass
def test_chunks_match_the_plain_forward(inputs, monkeypatch, rows):
    x, valid = inputs
    pool = _pool()
    monkeypatch.setattr(head_module, "CHUNK_ROWS", rows)
    with torch.inference_mode():
        torch.testing.assert_close(pool(x, valid), _plain(pool, x, valid), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pool(x), _plain(pool, x), rtol=1e-5, atol=1e-5)


def test_chunk_results_do_not_depend_on_history(inputs, monkeypatch):
    """The same image gives the same bits whenever it runs: first, after many others, in another process."""
    x, valid = inputs
    pool = _pool(dtype=torch.bfloat16)
    monkeypatch.setattr(head_module, "CHUNK_ROWS", 24)
    with torch.inference_mode():
        first = pool(x.bfloat16(), valid)
        for _ in range(6):
            pool(x.bfloat16())
        again = pool(x.bfloat16(), valid)
    assert torch.equal(first, again)


def test_tag_subset(inputs, monkeypatch):
    x, valid = inputs
    pool = _pool()
    monkeypatch.setattr(head_module, "CHUNK_ROWS", 6)
    index = torch.tensor([0, 5, 36, 17])
    with torch.inference_mode():
        full, part = pool(x, valid), pool(x, valid, index)
    assert part.shape == (3, 4)
    torch.testing.assert_close(part, full[:, index], rtol=1e-5, atol=1e-5)


def test_gpu_chunk_size_applies_off_cpu(inputs, monkeypatch):
    x, _ = inputs
    pool = _pool().to("meta")
    seen = []
    monkeypatch.setattr(HydraPool, "_tag_logits", lambda self, q, *a: seen.append(q.shape[1]) or
                        torch.empty(3, q.shape[1], device="meta"))
    monkeypatch.setattr(head_module, "GPU_CHUNK_ROWS", 30)
    pool(x.to("meta"))
    assert seen == [10, 10, 10, 7]  # 30 rows // 3 images per chunk


def test_gradients_flow_through_the_chunks(inputs, monkeypatch):
    x, valid = inputs
    monkeypatch.setattr(head_module, "CHUNK_ROWS", 24)
    pool, ref = _pool(), _pool()
    for p in (pool.out_proj.weight, pool.ff_out.weight, ref.out_proj.weight, ref.ff_out.weight):
        p.requires_grad_(True)
    pool(x, valid).sum().backward()
    _plain(ref, x, valid).sum().backward()
    torch.testing.assert_close(pool.out_proj.weight.grad, ref.out_proj.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pool.ff_out.weight.grad, ref.ff_out.weight.grad, rtol=1e-4, atol=1e-4)
