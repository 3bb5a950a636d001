"""DINOv3 tagger core: timm-based model vs an independent plain-PyTorch forward, checkpoint strictness,
and preprocessing parity with the published script.

The reference forward below is written from the documented architecture only (docs/formats.md; no timm),
on tiny random checkpoints in the published key layout (width 64, depth 2). Everything runs on CPU in a few seconds:

    venv/bin/python -m pytest tests/test_dinov3.py -q
"""

from __future__ import annotations

import io
import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from hydra.images.dinov3 import DinoV3Preprocess, snap_size
from hydra.models.dinov3_net import backbone_kwargs, backbone_to_timm, build_head, load_dinov3, split_checkpoint
from hydra.testing.dinov3 import write_dinov3_checkpoint, write_vocab

TAGS = ["solo", "breasts", "anthro", "1girl", "hi res"]


# ---------------------------------------------------------------------------------------------------------
# Independent reference forward (docs/formats.md, DINOv3 tagger)


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    t1, t2 = t.chunk(2, dim=-1)
    return torch.cat([-t2, t1], dim=-1)


def reference_forward(sd: dict, pixels: torch.Tensor, num_heads: int, rope_scale: float = 2.0) -> torch.Tensor:
    """Tagger logits from the raw checkpoint dict, following the documented forward step by step."""
    p = lambda k: sd["backbone." + k]
    width = p("embeddings.cls_token").shape[-1]
    head_dim = width // num_heads
    depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("backbone.model.layer."))

    x = F.conv2d(pixels, p("embeddings.patch_embeddings.weight"), p("embeddings.patch_embeddings.bias"),
                 stride=16)  # (B, D, h, w)
    B, _, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)  # (B, h·w, D), row-major: y then x
    prefix = torch.cat([p("embeddings.cls_token"), p("embeddings.register_tokens")], dim=1)  # (1, 1+R, D)
    n_prefix = prefix.shape[1]
    x = torch.cat([prefix.expand(B, -1, -1), x], dim=1)  # (B, N, D)

    # 2-D RoPE on patch tokens: centre coords in [-1, 1] per axis, x2, 100^(-k/(hd/4)) frequencies
    ys = (torch.arange(gh, dtype=torch.float64) + 0.5) / gh * 2 - 1
    xs = (torch.arange(gw, dtype=torch.float64) + 0.5) / gw * 2 - 1
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2) * rope_scale  # (hw, 2)
    n_freq = head_dim // 4
    inv_freq = 100.0 ** (-torch.arange(n_freq, dtype=torch.float64) / n_freq)  # (hd/4,)
    angles = (2 * math.pi * coords[:, :, None] * inv_freq).flatten(1)  # (hw, hd/2): y freqs, then x freqs
    angles = torch.cat([angles, angles], dim=-1)  # (hw, hd)
    cos, sin = angles.cos().float(), angles.sin().float()

    def rope(t: torch.Tensor) -> torch.Tensor:  # (B, heads, N, hd)
        head, patches = t[:, :, :n_prefix], t[:, :, n_prefix:]
        return torch.cat([head, patches * cos + _rotate_half(patches) * sin], dim=2)

    def split_heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(B, -1, num_heads, head_dim).transpose(1, 2)  # (B, heads, N, hd)

    for i in range(depth):
        L = f"model.layer.{i}."
        y = F.layer_norm(x, (width,), p(L + "norm1.weight"), p(L + "norm1.bias"), eps=1e-5)
        q = split_heads(F.linear(y, p(L + "attention.q_proj.weight"), p(L + "attention.q_proj.bias")))
        k = split_heads(F.linear(y, p(L + "attention.k_proj.weight")))  # no k bias
        v = split_heads(F.linear(y, p(L + "attention.v_proj.weight"), p(L + "attention.v_proj.bias")))
        q, k = rope(q), rope(k)
        attn = (q @ k.transpose(-2, -1) * head_dim**-0.5).softmax(dim=-1)  # (B, heads, N, N)
        o = (attn @ v).transpose(1, 2).reshape(B, -1, width)  # (B, N, D)
        o = F.linear(o, p(L + "attention.o_proj.weight"), p(L + "attention.o_proj.bias"))
        x = x + p(L + "layer_scale1.lambda1") * o
        y = F.layer_norm(x, (width,), p(L + "norm2.weight"), p(L + "norm2.bias"), eps=1e-5)
        gate = F.linear(y, p(L + "mlp.gate_proj.weight"), p(L + "mlp.gate_proj.bias"))
        up = F.linear(y, p(L + "mlp.up_proj.weight"), p(L + "mlp.up_proj.bias"))
        x = x + p(L + "layer_scale2.lambda1") * F.linear(F.silu(gate) * up, p(L + "mlp.down_proj.weight"),
                                                          p(L + "mlp.down_proj.bias"))
    x = F.layer_norm(x, (width,), p("norm.weight"), p("norm.bias"), eps=1e-5)
    feats = x[:, :n_prefix].flatten(1)  # (B, (1+R)·D)

    head = {k: v for k, v in sd.items() if not k.startswith("backbone.")}
    if "classifier.weight" in head:
        return F.linear(feats, head["classifier.weight"], head.get("classifier.bias"))
    down = F.linear(feats, head["classifier.proj_down.weight"], head.get("classifier.proj_down.bias"))
    return F.linear(down, head["classifier.proj_up.weight"], head.get("classifier.proj_up.bias"))


# ---------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))  # non-square: 4 × 6 patches


@pytest.fixture
def vocab_path(tmp_path):
    path = tmp_path / "tagger_vocab.json"
    write_vocab(path, TAGS)
    return path


def _logits(ckpt, vocab, pixels, **kwargs) -> torch.Tensor:
    model, _ = load_dinov3(ckpt, vocab, **kwargs)
    with torch.inference_mode():
        return model(pixels)


# ---------------------------------------------------------------------------------------------------------
# Numerical parity


@pytest.mark.parametrize("head", ["dense", "lowrank"])
@pytest.mark.parametrize("head_bias", [False, True])
def test_timm_model_matches_reference_forward(tmp_path, vocab_path, pixels, head, head_bias):
    ckpt = tmp_path / "tagger.safetensors"
    sd = write_dinov3_checkpoint(ckpt, TAGS, head=head, head_bias=head_bias)
    model, vocab = load_dinov3(ckpt, vocab_path)
    assert model.head_type == head and vocab.tags == TAGS
    with torch.inference_mode():
        logits = model(pixels)
    assert logits.shape == (2, len(TAGS)) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference_forward(sd, pixels, num_heads=1), atol=1e-4, rtol=0)


def test_heads_from_metadata_odd_mlp_and_registers(tmp_path, vocab_path, pixels):
    # 2 heads of 32 (metadata), SwiGLU hidden 100 (not a multiple of timm's default 8), 2 registers, depth 3
    ckpt = tmp_path / "tagger.safetensors"
    sd = write_dinov3_checkpoint(ckpt, TAGS, num_heads=2, mlp_hidden=100, n_registers=2, depth=3)
    model, _ = load_dinov3(ckpt, vocab_path)
    assert model.backbone.blocks[0].attn.num_heads == 2 and model.num_features == 3 * 64
    with torch.inference_mode():
        torch.testing.assert_close(model(pixels), reference_forward(sd, pixels, num_heads=2), atol=1e-4, rtol=0)


def test_rope_coordinate_scale_is_what_makes_parity(tmp_path, vocab_path, pixels):
    # timm's own inference RoPE (scale 1) is a different model from the published script's (scale 2)
    ckpt = tmp_path / "tagger.safetensors"
    sd = write_dinov3_checkpoint(ckpt, TAGS)
    unscaled = _logits(ckpt, vocab_path, pixels, rope_scale=1.0)
    torch.testing.assert_close(unscaled, reference_forward(sd, pixels, 1, rope_scale=1.0), atol=1e-4, rtol=0)
    assert (unscaled - reference_forward(sd, pixels, 1, rope_scale=2.0)).abs().max() > 0.1  # measured 0.7


def test_loaded_model_state(tmp_path, vocab_path, pixels):
    ckpt = tmp_path / "tagger.safetensors"
    write_dinov3_checkpoint(ckpt, TAGS)
    model, _ = load_dinov3(ckpt, vocab_path)
    tensors = list(model.parameters()) + list(model.buffers())
    assert not any(t.is_meta for t in tensors)
    assert all(t.dtype == torch.float32 for t in tensors)  # CPU default
    assert not model.training
    assert torch.equal(model.backbone.blocks[0].attn.k_bias, torch.zeros(64))
    with torch.inference_mode():
        assert model.forward_features(pixels).shape == (2, 5 * 64)
    with pytest.raises(AssertionError, match="multiples of 16"):
        model(pixels[..., :90])


def test_bf16_backbone_keeps_float32_head(tmp_path, vocab_path, pixels):
    ckpt = tmp_path / "tagger.safetensors"
    write_dinov3_checkpoint(ckpt, TAGS, head="lowrank", head_bias=True)
    model, _ = load_dinov3(ckpt, vocab_path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.backbone.rope.periods.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.head.parameters())
    with torch.inference_mode():
        logits = model(pixels)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, _logits(ckpt, vocab_path, pixels), atol=0.05, rtol=0)  # measured 0.009


def test_full_size_layout_maps_onto_timm_h_plus():
    # The published 616-tensor layout on the meta device: no memory, real shapes
    import timm

    D, L, hidden, T = 1280, 32, 5120, 74625
    shapes = {
        "embeddings.cls_token": (1, 1, D), "embeddings.mask_token": (1, 1, D),
        "embeddings.register_tokens": (1, 4, D),
        "embeddings.patch_embeddings.weight": (D, 3, 16, 16), "embeddings.patch_embeddings.bias": (D,),
        "norm.weight": (D,), "norm.bias": (D,),
    }
    for i in range(L):
        for name, shape in {
            "norm1.weight": (D,), "norm1.bias": (D,), "norm2.weight": (D,), "norm2.bias": (D,),
            "attention.q_proj.weight": (D, D), "attention.q_proj.bias": (D,), "attention.k_proj.weight": (D, D),
            "attention.v_proj.weight": (D, D), "attention.v_proj.bias": (D,),
            "attention.o_proj.weight": (D, D), "attention.o_proj.bias": (D,),
            "layer_scale1.lambda1": (D,), "layer_scale2.lambda1": (D,),
            "mlp.gate_proj.weight": (hidden, D), "mlp.gate_proj.bias": (hidden,),
            "mlp.up_proj.weight": (hidden, D), "mlp.up_proj.bias": (hidden,),
            "mlp.down_proj.weight": (D, hidden), "mlp.down_proj.bias": (D,),
        }.items():
            shapes[f"model.layer.{i}.{name}"] = shape
    sd = {"backbone." + k: torch.empty(s, device="meta") for k, s in shapes.items()}
    sd["projection.weight"] = torch.empty(T, 5 * D, device="meta")
    assert len(sd) == 616

    backbone, head = split_checkpoint(sd)
    kwargs = backbone_kwargs(backbone, {}, "full")
    assert (kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"], kwargs["num_reg_tokens"]) == (D, L, 20, 4)
    model = timm.create_model("vit_huge_plus_patch16_dinov3_qkvb", num_classes=0, device="meta", **kwargs)
    reference = timm.create_model("vit_huge_plus_patch16_dinov3_qkvb", num_classes=0, device="meta")
    expected = {k: v.shape for k, v in model.state_dict().items()}
    assert expected == {k: v.shape for k, v in reference.state_dict().items()}  # same as timm's registered H+
    model.load_state_dict(backbone_to_timm(backbone, expected, "full"), strict=True, assign=True)
    assert build_head(head, 5 * D, T, "full", "vocab").weight.shape == (T, 5 * D)


# ---------------------------------------------------------------------------------------------------------
# Checkpoint formats and key mapping strictness


def _resave(path, edit) -> None:
    sd = load_file(path)
    edit(sd)
    save_file(sd, path)


def test_pt_checkpoint_matches_safetensors(tmp_path, vocab_path, pixels):
    write_dinov3_checkpoint(tmp_path / "a.safetensors", TAGS, head="lowrank")
    write_dinov3_checkpoint(tmp_path / "a.pt", TAGS, head="lowrank", fmt="pt")
    torch.testing.assert_close(_logits(tmp_path / "a.pt", vocab_path, pixels),
                               _logits(tmp_path / "a.safetensors", vocab_path, pixels), atol=0, rtol=0)


class _NotATensor:
    pass


def test_pt_checkpoint_with_objects_is_refused(tmp_path, vocab_path):
    torch.save({"backbone.embeddings.cls_token": torch.zeros(1), "evil": _NotATensor()}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_dinov3(tmp_path / "x.pt", vocab_path)


def test_transformers4_layout_and_dropped_keys_load(tmp_path, vocab_path, pixels):
    # transformers 4.x has no `model.` level; RoPE buffers and mask_token are ignored, as by the published loader
    ckpt = tmp_path / "tagger.safetensors"
    sd = write_dinov3_checkpoint(ckpt, TAGS)
    renamed = {k.replace("backbone.model.layer.", "backbone.layer."): v for k, v in sd.items()}
    renamed["backbone.rope_embeddings.inv_freq"] = torch.ones(16)
    save_file(renamed, ckpt)
    torch.testing.assert_close(_logits(ckpt, vocab_path, pixels), reference_forward(sd, pixels, 1),
                               atol=1e-4, rtol=0)


def test_lowrank_pair_is_found_by_shape_not_name(tmp_path, vocab_path, pixels):
    ckpt = tmp_path / "tagger.safetensors"
    sd = write_dinov3_checkpoint(ckpt, TAGS, head="lowrank", head_bias=True)
    names = {"classifier.proj_up.": "a_up.", "classifier.proj_down.": "z_down."}  # up now sorts first
    renamed = {next((k.replace(o, n) for o, n in names.items() if k.startswith(o)), k): v for k, v in sd.items()}
    save_file(renamed, ckpt)
    torch.testing.assert_close(_logits(ckpt, vocab_path, pixels), reference_forward(sd, pixels, 1),
                               atol=1e-4, rtol=0)


BAD_BACKBONES = {
    "missing": (lambda sd: sd.pop("backbone.model.layer.1.mlp.up_proj.bias"),
                r"missing backbone key\(s\) 'backbone.model.layer.1.mlp.up_proj.bias'"),
    "unexpected": (lambda sd: sd.update({"backbone.model.layer.0.attention.k_proj.bias": torch.zeros(64)}),
                   r"unexpected backbone key\(s\) 'backbone.model.layer.0.attention.k_proj.bias'"),
    "shape": (lambda sd: sd.update({"backbone.model.layer.1.attention.v_proj.weight": torch.zeros(64, 32)}),
              r"'backbone.model.layer.1.attention.v_proj.weight' has shape \(64, 32\), expected \(64, 64\)"),
    "layer_scale_shape": (lambda sd: sd.update({"backbone.model.layer.0.layer_scale2.lambda1": torch.ones(63)}),
                          r"'backbone.model.layer.0.layer_scale2.lambda1' has shape \(63,\)"),
    "no_layers": (lambda sd: [sd.pop(k) for k in list(sd) if ".layer." in k], "no 'backbone.model.layer.N"),
}


@pytest.mark.parametrize("case", BAD_BACKBONES)
def test_backbone_key_errors_name_the_key(tmp_path, vocab_path, case):
    ckpt = tmp_path / "tagger.safetensors"
    write_dinov3_checkpoint(ckpt, TAGS)
    edit, message = BAD_BACKBONES[case]
    _resave(ckpt, edit)
    with pytest.raises(ValueError, match=message) as info:
        load_dinov3(ckpt, vocab_path)
    assert str(ckpt) in str(info.value)


BAD_HEADS = {
    "three_weights": (lambda sd: sd.update({"a.weight": torch.zeros(5, 8), "b.weight": torch.zeros(8, 320)}),
                      "one dense head weight"),
    "unpaired": (lambda sd: sd.update({"extra.weight": torch.zeros(5, 8)}), r"as a low-rank pair \(r, 320\)"),
    "not_2d": (lambda sd: sd.update({"classifier.weight": torch.zeros(5, 320, 1)}), "expected 2-D"),
    "features": (lambda sd: sd.update({"classifier.weight": torch.zeros(5, 256)}), "256 input features"),
    "orphan_bias": (lambda sd: sd.update({"other.bias": torch.zeros(5)}), "other.bias"),
    "bias_shape": (lambda sd: sd.update({"classifier.bias": torch.zeros(4)}), r"'classifier.bias' has shape"),
    "stray": (lambda sd: sd.update({"classifier.scale": torch.ones(1)}), "classifier.scale"),
    "no_head": (lambda sd: sd.pop("classifier.weight"), "found {}"),
}


@pytest.mark.parametrize("case", BAD_HEADS)
def test_head_errors(tmp_path, vocab_path, case):
    ckpt = tmp_path / "tagger.safetensors"
    write_dinov3_checkpoint(ckpt, TAGS)
    edit, message = BAD_HEADS[case]
    _resave(ckpt, edit)
    with pytest.raises(ValueError, match=message):
        load_dinov3(ckpt, vocab_path)


@pytest.mark.parametrize("head", ["dense", "lowrank"])
def test_tag_count_mismatch_names_both_files(tmp_path, head):
    ckpt, vocab = tmp_path / "tagger.safetensors", tmp_path / "tagger_vocab.json"
    write_dinov3_checkpoint(ckpt, TAGS, head=head)
    write_vocab(vocab, TAGS + ["extra"])
    with pytest.raises(ValueError, match=f"{ckpt}: the head predicts 5 tags but {vocab} lists 6 tags"):
        load_dinov3(ckpt, vocab)


def test_width_without_heads_metadata_is_an_error(tmp_path, vocab_path):
    ckpt = tmp_path / "tagger.safetensors"
    write_dinov3_checkpoint(ckpt, TAGS, width=96, num_heads=2)
    _resave(ckpt, lambda sd: None)  # re-saving drops the metadata
    with pytest.raises(ValueError, match="width 96 is not a multiple of 64"):
        load_dinov3(ckpt, vocab_path)


def test_bad_metadata_is_an_error(tmp_path, vocab_path):
    ckpt = tmp_path / "tagger.safetensors"
    sd = write_dinov3_checkpoint(ckpt, TAGS)
    save_file(sd, ckpt, metadata={"hydra.backbone": json.dumps({"no_such_option": 1})})
    with pytest.raises(ValueError, match="cannot build"):
        load_dinov3(ckpt, vocab_path)


def test_unreadable_files(tmp_path, vocab_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors: not a readable safetensors file"):
        load_dinov3(tmp_path / "junk.safetensors", vocab_path)
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="junk.pt: not a plain tensor checkpoint"):
        load_dinov3(tmp_path / "junk.pt", vocab_path)


# ---------------------------------------------------------------------------------------------------------
# Preprocessing


@pytest.mark.parametrize(("size", "max_size", "expected"), [
    ((300, 200), 1024, (288, 192)),  # long 300 -> 288, scale 0.96: 200 -> 192
    ((4000, 3000), 1024, (1024, 768)),
    ((10, 10), 1024, (16, 16)),  # the only case that upscales: sides never go below 16
    ((2000, 1000), 512, (512, 256)),
    ((500, 3000), 1024, (160, 1024)),  # 500·1024/3000 = 170.67 -> 171 -> floored to 160
    ((1000, 17), 1024, (992, 16)),  # 17·0.992 = 16.86 -> 17 -> 16
    ((1024, 1024), 1024, (1024, 1024)),
    ((1030, 520), 1024, (1024, 512)),  # 520·1024/1030 = 516.97 -> 517 -> 512
])
def test_snap_size(size, max_size, expected):
    assert snap_size(*size, max_size) == expected


def _noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    channels = len(mode)
    data = torch.randint(0, 256, (height, width, channels), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(data, mode)


@pytest.mark.parametrize(("size", "max_size"), [((300, 200), 1024), ((123, 457), 1024), ((50, 50), 1024),
                                                ((1100, 700), 1024), ((700, 300), 512)])
def test_preprocess_matches_torchvision_pipeline(size, max_size):
    from torchvision.transforms import InterpolationMode, v2

    image = _noise(*size)
    w, h = snap_size(*size, max_size)
    published = v2.Compose([
        v2.Resize((h, w), interpolation=InterpolationMode.LANCZOS),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    out = {k: torch.from_numpy(v) for k, v in DinoV3Preprocess(max_size=max_size)(image).items()}
    assert set(out) == {"pixels"}
    assert out["pixels"].shape == (3, h, w) and out["pixels"].dtype == torch.float32
    torch.testing.assert_close(out["pixels"], published(image), atol=1e-6, rtol=0)


def _normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (torch.tensor(rgb) / 255 - mean) / std


def _transparent_red(mode: str) -> Image.Image:
    image = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent, stored colour red
    image.paste((0, 0, 255, 255), (0, 0, 16, 32))  # left half opaque blue
    if mode == "P":
        image = image.convert("P")
        image.info["transparency"] = image.getpixel((20, 5))  # palette index of the red
    return image


@pytest.mark.parametrize("mode", ["RGBA", "P"])
def test_alpha_dropped_by_default_and_white_on_request(mode):
    image = _transparent_red(mode)
    dropped = torch.from_numpy(DinoV3Preprocess()(image)["pixels"])
    white = torch.from_numpy(DinoV3Preprocess(white_background=True)(image)["pixels"])
    torch.testing.assert_close(dropped[:, 5, 20], _normalised((255, 0, 0)))  # published: stored RGB shows
    torch.testing.assert_close(white[:, 5, 20], _normalised((255, 255, 255)))
    torch.testing.assert_close(white[:, 5, 5], _normalised((0, 0, 255)))  # opaque pixels untouched


def test_exif_orientation_only_on_request():
    buffer = io.BytesIO()
    image = _noise(32, 16)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    image.save(buffer, "PNG", exif=exif.tobytes())
    assert DinoV3Preprocess()(Image.open(buffer))["pixels"].shape == (3, 16, 32)
    assert DinoV3Preprocess(exif=True)(Image.open(buffer))["pixels"].shape == (3, 32, 16)


def test_animation_uses_first_frame():
    buffer = io.BytesIO()
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    image = Image.open(buffer)
    image.seek(1)
    torch.testing.assert_close(torch.from_numpy(DinoV3Preprocess()(image)["pixels"][:, 0, 0]),
                               _normalised((255, 0, 0)))


def test_preprocess_is_picklable_and_validates():
    pre = pickle.loads(pickle.dumps(DinoV3Preprocess(max_size=512, exif=True)))
    assert pre == DinoV3Preprocess(max_size=512, exif=True)
    assert pre(_noise(600, 300))["pixels"].shape == (3, 256, 512)
    with pytest.raises(ValueError, match="max_size"):
        DinoV3Preprocess(max_size=8)
