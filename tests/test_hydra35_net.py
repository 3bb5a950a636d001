"""Hydra 3.5 (hydra/models/hydra35_net.py, extensions_v2.py, testing/hydra35.py): strict loading of the real
file layout, the full-size layout on the meta device, the pool + head against an independent float64
implementation written here from the model's description, chunking, and v2 extensions.

The reference (`reference_logits`) shares no code with hydra/: from the raw state dict it computes K and V
from one matrix (K rows first), RMS-normalises K, attends with the stored queries, adds a SpGLU feed-forward
behind a weightless LayerNorm, runs each mid-block (RMS-normed projected queries, a second attention over
the same K and V, output projection, second feed-forward) and dots each tag's vector with its head row.

    venv/bin/python -m pytest tests/test_hydra35_net.py -q     # the full-size file test is marked slow
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import noise_image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hydra.models.hydra35_net as net_module
from hydra.images.naflex import JTP3Preprocess, collate
from hydra.models.backbone import create_backbone
from hydra.models.checkpoint import CheckpointError
from hydra.models.extensions import ExtensionError
from hydra.models.extensions_v2 import (
    IMPLEMENTATION,
    load_extensions_v2,
    merge_extensions_v2,
    read_extension_v2,
    save_extension_v2,
)
from hydra.models.hydra35_net import ARCHITECTURE, Hydra2Cfg, build_hydra35_net, load_hydra35
from hydra.testing.hydra35 import FULL_POOL, write_hydra35_extension, write_hydra35_model
from hydra.testing.jtp3 import write_extension as write_v1_extension

TAGS = [f"t{i}" for i in range(40)]
BACKBONE = {"embed_dim": 48, "depth": 2, "num_heads": 3}
POOL = {"n_heads": 4, "head_dim": 8, "ff_dim": 40, "mid_blocks": 2}  # two mid-blocks: the loop is exercised


# -- the independent reference ---------------------------------------------------------------------------

def reference_logits(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits (T,) in float64 for one image's valid tokens x (S, D)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    q = sd["attn_pool.q"]  # (H, T, E)
    heads, t, e = q.shape
    a = heads * e
    s = x.shape[0]
    u = x @ sd["attn_pool.kv.weight"].T  # (S, 2A)
    k = u[:, :a].reshape(s, heads, e)
    v = u[:, a:].reshape(s, heads, e)
    k = k / torch.sqrt((k * k).mean(-1, keepdim=True) + 1e-5)

    def attend(queries):  # (H, T, E) -> (T, A)
        scores = torch.einsum("hte,she->hts", queries, k) / math.sqrt(e)
        return torch.einsum("hts,she->the", torch.softmax(scores, dim=-1), v).reshape(t, a)

    def feed_forward(y, prefix):
        mean = y.mean(-1, keepdim=True)
        var = ((y - mean) ** 2).mean(-1, keepdim=True)
        z = ((y - mean) / torch.sqrt(var + 1e-5)) @ sd[prefix + "proj_in.weight"].T
        hidden = z.shape[-1] // 2
        gate = torch.where(z[:, :hidden] > 20, z[:, :hidden], torch.log1p(torch.exp(z[:, :hidden])))
        return (gate * z[:, hidden:]) @ sd[prefix + "proj_out.weight"].T

    y = attend(q)
    y = y + feed_forward(y, "attn_pool.ff.")
    i = 0
    while f"attn_pool.mid_blocks.{i}.q_proj.weight" in sd:
        p = f"attn_pool.mid_blocks.{i}."
        q2 = (y @ sd[p + "q_proj.weight"].T).reshape(t, heads, e).permute(1, 0, 2)
        q2 = q2 / torch.sqrt((q2 * q2).mean(-1, keepdim=True) + 1e-5)
        y = y + attend(q2) @ sd[p + "o_proj.weight"].T
        y = y + feed_forward(y, p + "ff.")
        i += 1
    return (y * sd["head.weight"]).sum(-1)


# -- fixtures ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("h35") / "m.safetensors"
    cats = ["general"] * 38 + ["species", "meta"]
    implies = [()] * 38 + [("t0", "not_a_label"), ()]
    return write_hydra35_model(path, TAGS, backbone=BACKBONE, head=POOL, seed=7, categories=cats, implies=implies)


def _read(path):
    with safe_open(path, "pt") as f:
        return load_file(path), dict(f.metadata())


def _write(tmp_path, name, state, meta):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=meta)
    return path


def _features(seed=0, b=3, s=30, d=48):
    """Random final features and a padding mask: image 1 has 20 valid tokens, image 2 only 5."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, d, generator=g)
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[1, 20:] = False
    valid[2, 5:] = False
    return x, valid


# -- file format and strict loading ------------------------------------------------------------------------

def test_fixture_file_has_the_real_layout_and_loads_strictly(model_file):
    state, meta = _read(model_file)
    assert {v.dtype for k, v in state.items() if k != "validation"} == {torch.bfloat16}
    assert state["validation"].dtype == torch.int32 and state["validation"].shape == (40, 99, 4)
    assert {"modelspec.architecture", "modelspec.title", "classifier.labels", "classifier.background",
            "classifier.resize", "modelspec.sai_model_spec", "modelspec.license"} <= set(meta)
    assert meta["modelspec.architecture"] == ARCHITECTURE
    assert meta["classifier.labels"].split("\n")[38] == "t38 species t0 not_a_label"
    model = load_hydra35(model_file)
    assert model.labels == TAGS and model.categories[38:] == ["species", "meta"]
    assert model.implies[38] == ("t0", "not_a_label") and model.implies[0] == ()
    assert model.title == meta["modelspec.title"] and (model.background, model.resize) == ("black", "lanczos")
    assert set(model.net.state_dict()) == set(state) - {"validation"}
    assert model.pool.cfg == Hydra2Cfg(n_tags=40, input_dim=48, **POOL)
    assert not any(p.is_meta or p.requires_grad for p in model.net.parameters()) and not model.net.training
    assert model.dtype == torch.bfloat16 and model.depth == 2
    np.testing.assert_array_equal(model.validation, state["validation"].numpy())


def test_fixture_validation_counts_are_plausible(model_file):
    v = load_hydra35(model_file).validation.astype(np.int64)  # (T, n, 4) [tp, fp, tn, fn]
    tp, fp, tn, fn = np.moveaxis(v, -1, 0)
    assert (v >= 0).all() and (np.diff(tp, axis=1) <= 0).all() and (np.diff(fp, axis=1) <= 0).all()
    assert (tp + fn == (tp + fn)[:, :1]).all() and (fp + tn == (fp + tn)[:, :1]).all()


def test_full_size_layout_on_the_meta_device():
    """The real dimensions, built without memory: 338 tensors with the file's names and shapes."""
    t = 8886
    net = build_hydra35_net(Hydra2Cfg(n_tags=t, input_dim=1152, **FULL_POOL), None, device="meta")
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    expected = {"embeds.pos_embed": (1, 16, 16, 1152), "embeds.proj.weight": (1152, 768), "embeds.proj.bias": (1152,),
                "norm.weight": (1152,), "norm.bias": (1152,)}
    for i in range(27):
        p = f"blocks.{i}."
        expected |= {p + "norm1.weight": (1152,), p + "norm1.bias": (1152,), p + "norm2.weight": (1152,),
                     p + "norm2.bias": (1152,), p + "attn.qkv.weight": (3456, 1152), p + "attn.qkv.bias": (3456,),
                     p + "attn.proj.weight": (1152, 1152), p + "attn.proj.bias": (1152,),
                     p + "mlp.fc1.weight": (4304, 1152), p + "mlp.fc1.bias": (4304,),
                     p + "mlp.fc2.weight": (1152, 4304), p + "mlp.fc2.bias": (1152,)}
    expected |= {"attn_pool.q": (32, t, 64), "attn_pool.kv.weight": (4096, 1152),
                 "attn_pool.ff.proj_in.weight": (10240, 2048), "attn_pool.ff.proj_out.weight": (2048, 5120),
                 "attn_pool.mid_blocks.0.q_proj.weight": (2048, 2048),
                 "attn_pool.mid_blocks.0.o_proj.weight": (2048, 2048),
                 "attn_pool.mid_blocks.0.ff.proj_in.weight": (10240, 2048),
                 "attn_pool.mid_blocks.0.ff.proj_out.weight": (2048, 5120), "head.weight": (t, 2048)}
    assert len(expected) == 338 and shapes == expected
    count = {k: math.prod(s) for k, s in shapes.items()}
    head = sum(n for k, n in count.items() if k.startswith(("attn_pool.", "head.")))
    assert head == 112_418_816 and sum(count.values()) - head == 412_649_712
    assert Hydra2Cfg.from_state(net.state_dict()) == Hydra2Cfg(n_tags=t, input_dim=1152, **FULL_POOL)


def test_layernorm_eps_is_upstreams_1e_5(model_file):
    model = load_hydra35(model_file)
    norms = [(name, m.eps) for name, m in model.net.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert {n for n, _ in norms} >= {"blocks.0.norm1", "blocks.1.norm2", "norm", "attn_pool.ff.norm"}
    assert all(eps == 1e-5 for _, eps in norms)
    # JTP-3's backbone keeps timm's 1e-6: the override is local to Hydra 3.5
    assert create_backbone(BACKBONE).norm.eps == 1e-6


def test_strict_load_errors(model_file, tmp_path):
    state, meta = _read(model_file)
    cases = [
        ({k: v for k, v in state.items() if k != "blocks.1.attn.proj.bias"}, meta, "missing blocks.1.attn.proj.bias"),
        ({k: v for k, v in state.items() if k != "attn_pool.mid_blocks.1.o_proj.weight"}, meta,
         "missing attn_pool.mid_blocks.1.o_proj.weight"),
        ({**state, "extra.weight": torch.zeros(2)}, meta, "unexpected extra.weight"),
        ({**state, "norm.weight": torch.zeros(5)}, meta, r"wrong shape norm.weight \(5,\) \(expected \(48,\)\)"),
        ({**state, "head.weight": torch.zeros(40, 31)}, meta, r"wrong shape head.weight \(40, 31\)"),
        ({**state, "attn_pool.kv.weight": torch.zeros(60, 48)}, meta, r"kv.weight \(60, 48\) must have"),
        ({k: v for k, v in state.items() if k != "attn_pool.q"}, meta, "missing tensor 'attn_pool.q'"),
        ({k: v for k, v in state.items() if k != "validation"}, meta, "missing tensor 'validation'"),
        ({**state, "validation": state["validation"][:, :, :3]}, meta, r"shape \(40, 99, 3\)"),
        ({**state, "validation": state["validation"][:39]}, meta, r"shape \(39, 99, 4\)"),
        ({**state, "validation": state["validation"].to(torch.int16)}, meta, "expected int32 or float32"),
        (state, {**meta, "modelspec.architecture": "naflexvit_so400m_patch16_siglip+rr_hydra"},
         "unsupported architecture .*a JTP-3 file"),
        (state, {**meta, "modelspec.architecture": "something"}, "unsupported architecture 'something'"),
        (state, {k: v for k, v in meta.items() if k != "modelspec.architecture"}, "missing metadata 'modelspec.arch"),
        (state, {k: v for k, v in meta.items() if k != "modelspec.title"}, "missing metadata 'modelspec.title'"),
        (state, {**meta, "classifier.labels": "\n".join(r for r in meta["classifier.labels"].split("\n")[:39])},
         "has 39 rows but attn_pool.q has 40 tags"),
        (state, {**meta, "classifier.background": "pink"}, "background = 'pink'; valid values: black, grey, white"),
        (state, {**meta, "classifier.resize": "bicubic"}, "valid values: lanczos, mks2013-linear"),
        (state, {**meta, "hydra.backbone": "{"}, "not valid JSON"),
    ]
    for i, (st, md, message) in enumerate(cases):
        with pytest.raises(CheckpointError, match=message):
            load_hydra35(_write(tmp_path, f"{i}.safetensors", st, md))
    only = {k: v for k, v in state.items() if not k.startswith("attn_pool.mid_blocks.")}
    with pytest.raises(CheckpointError, match="no attn_pool.mid_blocks"):
        load_hydra35(_write(tmp_path, "nomid.safetensors", only, meta))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_hydra35(junk)


@pytest.mark.parametrize(("rows", "message"), [
    (["t0 general", "", "t2 general"], "row 2 is empty"),
    (["t0 general", "t1 general", "t2 general", ""], "row 4 is empty"),  # a trailing newline
    (["t0 general", "t1"], "row 2 't1' has no category"),
    (["t0 general", "t1  general"], "row 2 't1  general' has an empty field"),
    (["t0 general", "t1 meta", "t0 species"], "rows 1 and 3 both define tag 't0'"),
])
def test_bad_label_rows(tmp_path, rows, message):
    path = write_hydra35_model(tmp_path / "m.safetensors", ["t0", "t1", "t2"],
                               extra_metadata={"classifier.labels": "\n".join(rows)})
    with pytest.raises(CheckpointError, match=message):
        load_hydra35(path)


def test_validation_int32_and_float32_both_load_exactly(tmp_path):
    counts = np.zeros((3, 5, 4), dtype=np.int64)
    counts[..., 0] = 16_777_215  # exact in int32 and float32, not in bf16 (8 bits of mantissa)
    counts[..., 2] = np.arange(5)
    for dtype in (np.int32, np.float32):
        path = write_hydra35_model(tmp_path / f"{dtype.__name__}.safetensors", ["a", "b", "c"],
                                   validation=counts.astype(dtype))
        model = load_hydra35(path, dtype=torch.bfloat16)
        assert model.validation.dtype == dtype and model.validation.shape == (3, 5, 4)
        np.testing.assert_array_equal(model.validation, counts)


def test_metadata_defaults_and_choices(tmp_path):
    path = write_hydra35_model(tmp_path / "d.safetensors", ["a", "b"], background=None, resize=None)
    model = load_hydra35(path)
    assert (model.background, model.resize) == ("black", "lanczos")
    path = write_hydra35_model(tmp_path / "w.safetensors", ["a", "b"], background="white", resize="mks2013-linear",
                               title="Hydra 3.5 real-ish")
    model = load_hydra35(path)
    assert (model.background, model.resize, model.title) == ("white", "mks2013-linear", "Hydra 3.5 real-ish")


# -- numbers ------------------------------------------------------------------------------------------------

def test_pool_and_head_match_the_independent_reference_fp32(model_file):
    state, _ = _read(model_file)
    model = load_hydra35(model_file, dtype=torch.float32)
    x, valid = _features()
    x[~valid] = 1e3  # garbage in the padding: it must not leak into any image's result
    with torch.inference_mode():
        batched = model.head_logits(x, valid)  # (B, T), padded + masked
        for b in range(3):
            ref = reference_logits(state, x[b, valid[b]])
            alone = model.head_logits(x[b:b + 1, valid[b]], None)[0]  # unpadded, no mask
            scale = ref.abs().max().item()
            assert (alone.double() - ref).abs().max() <= 1e-5 * scale
            assert (batched[b].double() - ref).abs().max() <= 1e-5 * scale


def test_head_logits_are_differentiable_wrt_features(model_file):
    """What the CAM needs: gradients of one tag's logit w.r.t. the tokens, as the float64 reference has them."""
    state, _ = _read(model_file)
    model = load_hydra35(model_file, dtype=torch.float32)
    x = _features()[0][:1].requires_grad_(True)
    model.head_logits(x, None, torch.tensor([5]))[0, 0].backward()
    x64 = x.detach().double()[0].requires_grad_(True)
    reference_logits(state, x64)[5].backward()
    torch.testing.assert_close(x.grad[0].double(), x64.grad, rtol=1e-4, atol=1e-6 * x64.grad.abs().max().item())


def test_end_to_end_padding_does_not_change_an_images_result(model_file):
    model = load_hydra35(model_file, dtype=torch.float32)
    pre = JTP3Preprocess(256)
    samples = [pre(noise_image(w, h, seed=i)) for i, (w, h) in enumerate([(256, 256), (400, 120), (20, 20)])]
    with torch.inference_mode():
        batched = model.logits(model.to_device_batch(collate(samples)))
        for i, s in enumerate(samples):
            alone = model.logits(model.to_device_batch(collate([s])))[0]
            torch.testing.assert_close(batched[i], alone, rtol=1e-5, atol=1e-5)
        assert torch.equal(model.sample_logits(samples), batched)  # the Tagger's entry point, same batch
    p = batched.sigmoid()
    assert p.std() > 0.15 and ((p > 0.05) & (p < 0.95)).float().mean() > 0.75  # spread over (0, 1)
    assert p.std(0).median() > 0.02  # and depending on the image


@pytest.mark.parametrize("rows", [7, 1, 1 << 20])  # three tags per chunk with a short last one; one tag; one pass
def test_chunks_are_bit_identical_to_one_pass_in_bf16(model_file, monkeypatch, rows):
    """In the run dtype the chunked forward gives the same bits. (In fp32, MKL picks GEMM kernels by row count
    and the last bits move: ~1e-6, checked below.)"""
    x, valid = _features()
    for dtype, exact in ((torch.bfloat16, True), (torch.float32, False)):
        model = load_hydra35(model_file, dtype=dtype)
        with torch.inference_mode():
            monkeypatch.setattr(net_module, "CHUNK_ROWS", 1 << 30)
            one = model.head_logits(x.to(dtype), valid), model.head_logits(x.to(dtype), None)
            monkeypatch.setattr(net_module, "CHUNK_ROWS", rows)
            got = model.head_logits(x.to(dtype), valid), model.head_logits(x.to(dtype), None)
        for a, b in zip(got, one):
            assert torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_tag_subset_gives_the_same_numbers(model_file, monkeypatch):
    x, valid = _features()
    index = torch.tensor([3, 39, 0, 17])
    monkeypatch.setattr(net_module, "CHUNK_ROWS", 7)
    for dtype in (torch.bfloat16, torch.float32):
        model = load_hydra35(model_file, dtype=dtype)
        with torch.inference_mode():
            full, part = model.head_logits(x.to(dtype), valid), model.head_logits(x.to(dtype), valid, index)
        assert part.shape == (3, 4)
        torch.testing.assert_close(part, full[:, index], rtol=1e-5, atol=1e-5)


def test_gpu_chunk_size_applies_off_cpu(monkeypatch):
    pool = build_hydra35_net(Hydra2Cfg(n_tags=37, input_dim=48, **POOL), BACKBONE).attn_pool  # on meta
    seen = []
    monkeypatch.setattr(net_module.Hydra2Pool, "_pool_chunk",
                        lambda self, q, *a: seen.append(q.shape[1]) or torch.empty(3, q.shape[1], 32, device="meta"))
    monkeypatch.setattr(net_module, "GPU_CHUNK_ROWS", 30)
    assert pool(torch.empty(3, 10, 48, device="meta")).shape == (3, 37, 32)
    assert seen == [10, 10, 10, 7]  # 30 rows // 3 images per chunk


# -- v2 extensions -----------------------------------------------------------------------------------------

def _ext(tmp_path, name, label, title, **kw):
    return write_hydra35_extension(tmp_path / name, label, title, head=POOL, **kw)


def test_extension_file_format(model_file, tmp_path):
    title = load_hydra35(model_file).title
    path = _ext(tmp_path, "e.safetensors", "new_tag", title, implies=("t1", "t2"), impliedby=("t0",))
    state, meta = _read(path)
    assert {k: tuple(v.shape) for k, v in state.items()} == {"attn_pool.q": (4, 1, 8), "head.weight": (1, 32),
                                                           "validation": (99, 4)}
    assert meta["modelspec.implementation"] == IMPLEMENTATION and meta["modelspec.architecture"] == ARCHITECTURE
    assert meta["classifier.model"] == title and "modelspec.sai_model_spec" in meta
    ext = read_extension_v2(path)
    assert (ext.label, ext.category, ext.implies, ext.impliedby) == ("new_tag", "general", ("t1", "t2"), ("t0",))
    assert ext.q.shape == (4, 1, 8) and ext.head_weight.shape == (1, 32) and ext.validation.shape == (99, 4)


def test_extensions_append_and_replace_with_their_own_logits(model_file, tmp_path):
    state, _ = _read(model_file)
    base = load_hydra35(model_file, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    q_new, w_new = torch.randn(4, 1, 8, generator=g), torch.randn(1, 32, generator=g) / 32 ** 0.5
    q_rep, w_rep = torch.randn(4, 1, 8, generator=g), torch.randn(1, 32, generator=g) / 32 ** 0.5
    val = np.tile(np.array([5, 6, 7, 8], dtype=np.int32), (99, 1))
    paths = [_ext(tmp_path, "b.safetensors", "new_b", base.title, q=q_new, head_weight=w_new, validation=val,
                  category="species", implies=("t1",), impliedby=("t0", "t5", "not_a_label")),
             _ext(tmp_path, "a.safetensors", "new_a", base.title, seed=4),
             _ext(tmp_path, "r.safetensors", "t38", base.title, q=q_rep, head_weight=w_rep, validation=val,
                  category="lore")]
    st, md = _read(paths[2])
    _write(tmp_path, "r.safetensors", {**st, "validation": st["validation"][None]}, md)  # (1, n, 4) is read too
    exts = load_extensions_v2([tmp_path])
    assert [e.label for e in exts] == ["new_a", "new_b", "t38"]  # sorted file order
    model = load_hydra35(model_file, dtype=torch.float32, extensions=exts)
    assert model.labels == TAGS + ["new_a", "new_b"] and model.pool.cfg.n_tags == 42 and model.extensions == exts
    assert model.categories[38] == "lore" and model.categories[41] == "species"
    assert model.implies[38] == ("t0", "not_a_label")  # kept: the replacing extension states no implications
    assert model.implies[41] == ("t1",) and model.implies[0] == ("new_b",) and model.implies[5] == ("new_b",)
    assert model.validation.shape == (42, 99, 4)
    np.testing.assert_array_equal(model.validation[38], val)
    np.testing.assert_array_equal(model.validation[41], val)
    np.testing.assert_array_equal(model.validation[:38], base.validation[:38])

    extended = dict(state)
    q, w = state["attn_pool.q"].clone(), state["head.weight"].clone()
    q[:, 38:39], w[38:39] = q_rep.bfloat16(), w_rep.bfloat16()  # the files store bf16
    extended["attn_pool.q"] = torch.cat([q, exts[0].q, q_new.bfloat16()], dim=1)
    extended["head.weight"] = torch.cat([w, exts[0].head_weight, w_new.bfloat16()], dim=0)
    x, valid = _features()
    with torch.inference_mode():
        got, before = model.head_logits(x, valid), base.head_logits(x, valid)
    for b in range(3):
        ref = reference_logits(extended, x[b, valid[b]])
        assert (got[b].double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    torch.testing.assert_close(got[:, :38], before[:, :38], rtol=1e-5, atol=1e-5)  # other tags untouched


def test_extension_errors(model_file, tmp_path):
    model = load_hydra35(model_file)
    with pytest.raises(ExtensionError, match=r"classifier.model is 'Other model', but the model .* is 'Hydra 3.5"):
        load_hydra35(model_file, extensions=[_ext(tmp_path, "w.safetensors", "x", "Other model")])
    one, two = _ext(tmp_path, "1.safetensors", "dup", model.title), _ext(tmp_path, "2.safetensors", "dup", model.title)
    with pytest.raises(ExtensionError, match=r"1.safetensors' and .*2.safetensors' both define tag 'dup'"):
        load_hydra35(model_file, extensions=[one, two])
    v1 = write_v1_extension(tmp_path / "v1.safetensors", "old", head={"n_heads": 4, "head_dim": 8})
    with pytest.raises(ExtensionError, match=r"a JTP-3 \(v1\) extension; Hydra 3.5 needs v2"):
        load_hydra35(model_file, extensions=[v1])
    from hydra.models.extensions import read_extension

    with pytest.raises(ExtensionError, match=r"a JTP-3 \(v1\) extension; Hydra 3.5 needs v2"):
        merge_extensions_v2(model, [read_extension(v1)])
    wide = write_hydra35_extension(tmp_path / "wide.safetensors", "wide", model.title, head={**POOL, "head_dim": 16})
    with pytest.raises(ExtensionError, match="do not fit this model"):
        merge_extensions_v2(model, [read_extension_v2(wide)])
    short = _ext(tmp_path, "short.safetensors", "short", model.title, validation=np.zeros((9, 4), np.int32))
    with pytest.raises(ExtensionError, match="has 9 thresholds, the model's table 99"):
        merge_extensions_v2(model, [read_extension_v2(short)])

    state, meta = _read(one)
    bad = [({k: v for k, v in state.items() if k != "validation"}, meta, "missing tensor 'validation'"),
           ({k: v for k, v in state.items() if k != "head.weight"}, meta, "missing head.weight"),
           ({**state, "attn_pool.kv.weight": torch.zeros(2)}, meta, "unexpected attn_pool.kv.weight"),
           ({**state, "head.weight": torch.zeros(2, 32)}, meta, "class dim 0 must have size 1"),
           ({**state, "validation": torch.zeros(99, 3)}, meta, r"\(n, 4\) or \(1, n, 4\), got \(99, 3\)"),
           (state, {k: v for k, v in meta.items() if k != "modelspec.implementation"}, "missing SAI modelspec"),
           (state, {**meta, "modelspec.implementation": "x"}, "unrecognized implementation 'x'"),
           (state, {k: v for k, v in meta.items() if k != "classifier.model"}, "missing metadata 'classifier.model'"),
           (state, {**meta, "classifier.label": "two words"}, "without whitespace")]
    for i, (st, md, message) in enumerate(bad):
        with pytest.raises(ExtensionError, match=message):
            read_extension_v2(_write(tmp_path, f"bad{i}.safetensors", st, md))
    with pytest.raises(ValueError, match="needs 'classifier.model'"):
        save_extension_v2(tmp_path / "n.safetensors", torch.zeros(4, 1, 8), torch.zeros(1, 32),
                          {"classifier.label": "x"}, np.zeros((99, 4)))


@pytest.mark.slow
def test_full_size_random_model_in_the_real_format(tmp_path):
    """Writes the ~1.06 GB real layout (339 tensors, no test-only metadata) and loads it strictly."""
    labels = [f"tag_{i:04d}" for i in range(8886)]
    path = write_hydra35_model(tmp_path / "hydra-3.5.safetensors", labels, full_size=True,
                               background="white", resize="mks2013-linear")
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in keys if k != "validation")
    assert len(keys) == 339 and n_params == 525_068_528 and "hydra.backbone" not in meta
    model = load_hydra35(path)
    assert model.pool.cfg == Hydra2Cfg(n_tags=8886, input_dim=1152, **FULL_POOL)
    batch = model.to_device_batch(collate([JTP3Preprocess(64)(noise_image(128, 96))]))
    with torch.inference_mode():
        p = model.logits(batch, torch.arange(0, 8886, 97)).float().sigmoid()
    assert p.shape == (1, 92) and torch.isfinite(p).all() and p.std() > 0.01
