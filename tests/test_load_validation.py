"""Model and extension files that are damaged or hostile are refused at load with one line naming the file and
the tensor or metadata key (issue 15, items 8 and 9): bad `hydra.backbone` metadata, non-float weights, NaN or
infinite weights, wrongly structured `.pt` checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, noise_image

from hydra.models.checkpoint import KEY_BACKBONE, CheckpointError, load_tensors, save_safetensors
from hydra.models.family import ModelOptions

TAGS = ["a", "b", "c"]
BAD_BACKBONES = [
    ({"num_heads": 0}, "'num_heads' = 0 is out of range"),
    ({"depth": -1}, "'depth' = -1 is out of range"),
    ({"embed_dim": 10**12}, "'embed_dim' = 1000000000000 is out of range"),
    ({"depth": "2"}, "'depth' must be an integer"),
    ({"depth": True}, "'depth' must be an integer"),
    ({"num_heads": 2.5}, "'num_heads' must be an integer"),
    ({"mlp_ratio": -1.0}, "'mlp_ratio' = -1.0 is out of range"),
    ({"mlp_ratio": 1e308}, "'mlp_ratio' = 1e+308 is out of range"),
    ({"mlp_ratio": "x"}, "'mlp_ratio' must be a number"),
]


def _rewrite(path, out, *, meta=None, tensors=None):
    t, m = load_tensors(path, validate=False)
    save_safetensors(out, {**t, **(tensors or {})}, {**m, **(meta or {})})
    return str(out)


@pytest.fixture(scope="module")
def jtp3_file(tmp_path_factory):
    from hydra.testing.jtp3 import write_model

    return write_model(tmp_path_factory.mktemp("jtp3") / "m.safetensors", TAGS)


@pytest.fixture(scope="module")
def hydra35_file(tmp_path_factory):
    from hydra.testing.hydra35 import write_hydra35_model

    return write_hydra35_model(tmp_path_factory.mktemp("h35") / "h.safetensors", TAGS)


def _with_backbone(path, out, change):
    _, meta = load_tensors(path, validate=False)
    return _rewrite(path, out, meta={KEY_BACKBONE: json.dumps({**json.loads(meta[KEY_BACKBONE]), **change})})


@pytest.mark.parametrize(("change", "message"), BAD_BACKBONES)
def test_bad_backbone_metadata_is_refused_before_building(jtp3_file, hydra35_file, tmp_path, change, message):
    from hydra.models.hydra35_net import load_hydra35
    from hydra.models.jtp3_net import load_jtp3

    for load, src in ((load_jtp3, jtp3_file), (load_hydra35, hydra35_file)):
        bad = _with_backbone(src, tmp_path / "bad.safetensors", change)
        with pytest.raises(CheckpointError) as e:
            load(bad)
        text = str(e.value)
        assert text.startswith(f"{bad}: metadata {KEY_BACKBONE}: ") and message in text and "\n" not in text


def test_backbone_heads_must_divide_width(jtp3_file, tmp_path):
    from hydra.models.jtp3_net import load_jtp3

    bad = _with_backbone(jtp3_file, tmp_path / "bad.safetensors", {"num_heads": 3})
    with pytest.raises(CheckpointError, match="'embed_dim' 64 is not divisible by 'num_heads' 3"):
        load_jtp3(bad)


def test_deeply_nested_backbone_json_is_an_error(jtp3_file, tmp_path):
    from hydra.models.jtp3_net import load_jtp3

    bad = _rewrite(jtp3_file, tmp_path / "deep.safetensors", meta={KEY_BACKBONE: "[" * 100_000 + "]" * 100_000})
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_jtp3(bad)


def test_integer_weights_are_refused_not_cast(jtp3_file, tmp_path):
    from hydra.models.jtp3_net import load_jtp3

    q = load_tensors(jtp3_file)[0]["attn_pool.q"]
    bad = _rewrite(jtp3_file, tmp_path / "int.safetensors", tensors={"attn_pool.q": (q * 100).to(torch.int32)})
    with pytest.raises(CheckpointError, match=r"int\.safetensors: tensor 'attn_pool\.q' is int32; model weights"):
        load_jtp3(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_model_weights_are_refused_with_the_tensor_name(jtp3_file, hydra35_file, tmp_path, value):
    from hydra.models.hydra35_net import load_hydra35
    from hydra.models.jtp3_net import load_jtp3

    for load, src, name in ((load_jtp3, jtp3_file, "blocks.1.attn.proj.weight"),
                            (load_hydra35, hydra35_file, "head.weight")):
        t = load_tensors(src)[0][name].clone()
        t.view(-1)[3] = value
        bad = _rewrite(src, tmp_path / "nan.safetensors", tensors={name: t})
        with pytest.raises(CheckpointError, match=rf"nan\.safetensors: tensor '{name}' has 1 NaN or infinite"):
            load(bad)


def test_weights_that_overflow_the_cast_are_refused(jtp3_file, tmp_path):
    from hydra.models.jtp3_net import load_jtp3

    t = load_tensors(jtp3_file)[0]["attn_pool.out_proj.weight"].float()
    t.view(-1)[0] = 1e6  # finite in float32 and bfloat16, infinite in float16
    ok = _rewrite(jtp3_file, tmp_path / "big.safetensors", tensors={"attn_pool.out_proj.weight": t})
    load_jtp3(ok, dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match="'attn_pool.out_proj.weight' has 1 NaN or infinite"):
        load_jtp3(ok, dtype=torch.float16)


def test_non_finite_or_integer_extensions_are_refused(tmp_path):
    from hydra.models.extensions import read_extension
    from hydra.models.extensions_v2 import read_extension_v2
    from hydra.testing.hydra35 import write_hydra35_extension
    from hydra.testing.jtp3 import write_extension

    v1 = write_extension(tmp_path / "v1.safetensors", "new_tag")
    v2 = write_hydra35_extension(tmp_path / "v2.safetensors", "new_tag")
    read_extension(v1), read_extension_v2(v2)
    for src, read, name in ((v1, read_extension, "out_proj.weight"), (v2, read_extension_v2, "head.weight")):
        t = load_tensors(src)[0][name].clone()
        t.view(-1)[0] = float("nan")
        bad = _rewrite(src, tmp_path / "bad.safetensors", tensors={name: t})
        with pytest.raises(CheckpointError, match=rf"bad\.safetensors: tensor '{name}' has 1 NaN"):
            read(bad)
        bad = _rewrite(src, tmp_path / "int.safetensors", tensors={name: t.nan_to_num().to(torch.int16)})
        with pytest.raises(CheckpointError, match=rf"int\.safetensors: tensor '{name}' is int16"):
            read(bad)


# -- DINOv3: safetensors and .pt state dicts ------------------------------------------------------------


@pytest.fixture(scope="module")
def dinov3_dir(tmp_path_factory):
    from hydra.testing.dinov3 import write_dinov3_checkpoint, write_vocab

    d = tmp_path_factory.mktemp("d3")
    write_vocab(d / "tagger_vocab.json", TAGS)
    state = write_dinov3_checkpoint(d / "ok.safetensors", TAGS, width=128)
    return d, state


def _load_dinov3(path):
    from hydra.models.dinov3 import DINOV3

    return DINOV3.load(str(path), ModelOptions(), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize(("change", "message"), BAD_BACKBONES[:3])
def test_dinov3_bad_backbone_metadata(dinov3_dir, tmp_path, change, message):
    from safetensors.torch import save_file

    d, state = dinov3_dir
    save_file(state, d / "bad.safetensors", metadata={KEY_BACKBONE: json.dumps(change)})
    with pytest.raises(CheckpointError, match=message):
        _load_dinov3(d / "bad.safetensors")


def _bad_states(state):
    nan = dict(state)
    nan["backbone.norm.weight"] = state["backbone.norm.weight"].clone()
    nan["backbone.norm.weight"][0] = float("nan")
    return {
        "nan": (nan, "tensor 'backbone.norm.weight' has 1 NaN or infinite"),
        "int": ({k: (v * 10).to(torch.int32) for k, v in state.items()}, "is int32; model weights are floating"),
        "bool": ({k: v > 0 for k, v in state.items()}, "is bool; model weights are floating"),
        "complex": ({k: v.to(torch.complex64) for k, v in state.items()}, "is complex64"),
        "scalar": ({**state, "backbone.embeddings.cls_token": torch.zeros(())}, "not a usable DINOv3 tagger"),
        "layers": ({**state, "backbone.model.layer.99999999.norm1.weight": torch.zeros(3)},
                   "layer indices must run 0..n-1 with n <= 256, got 3 layer"),
    }


@pytest.mark.parametrize("case", ["nan", "int", "bool", "complex", "scalar", "layers"])
def test_dinov3_bad_pt_checkpoints_are_one_line_errors(dinov3_dir, case):
    d, state = dinov3_dir
    bad, message = _bad_states(state)[case]
    torch.save(bad, d / f"{case}.pt")
    with pytest.raises(CheckpointError) as e:
        _load_dinov3(d / f"{case}.pt")
    assert str(e.value).startswith(f"{d / case}.pt: ") and message in str(e.value)


def test_dinov3_nan_safetensors(dinov3_dir):
    from safetensors.torch import save_file

    d, state = dinov3_dir
    save_file(_bad_states(state)["nan"][0], d / "nan.safetensors")
    with pytest.raises(CheckpointError, match="'backbone.norm.weight' has 1 NaN"):
        _load_dinov3(d / "nan.safetensors")


def test_inference_script_reports_a_nan_model_in_one_line(jtp3_file, tmp_path):
    t = load_tensors(jtp3_file)[0]["attn_pool.q"].clone()
    t[0, 0, 0] = float("nan")
    bad = _rewrite(jtp3_file, tmp_path / "nan.safetensors", tensors={"attn_pool.q": t})
    noise_image(64, 64).save(tmp_path / "x.png")
    proc = subprocess.run([sys.executable, str(ROOT / "inference.py"), "-M", bad, "-E", "-o", "-",
                           str(tmp_path / "x.png")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{bad}: tensor 'attn_pool.q' has 1 NaN or infinite" in proc.stderr and not proc.stdout
