"""Extensions (docs/formats.md, extensions): discovery, validation, appending new tags, replacing existing
ones (the intended behaviour, not upstream's bug), conflicts, and the q scale of upstream-built files.

    venv/bin/python -m pytest tests/test_extensions.py -q
"""

from __future__ import annotations

import pytest
import torch
from conftest import noise_image
from safetensors.torch import load_file, save_file

from hydra.images.naflex import JTP3Preprocess, collate
from hydra.models.extensions import ExtensionError, find_extensions, load_extensions, read_extension
from hydra.models.jtp3_net import load_jtp3
from hydra.testing.jtp3 import write_extension


def _probs(model, sample):
    with torch.inference_mode():
        return model.logits(model.to_device_batch(collate([sample]))).float().sigmoid()[0]


@pytest.fixture(scope="module")
def sample():
    return JTP3Preprocess(256)(noise_image(200, 150, seed=5))


def test_append_new_tags_in_order(small_model, tmp_path, sample):
    path, names = small_model
    ext_dir = tmp_path / "ext"
    write_extension(ext_dir / "b.safetensors", "new_b", seed=2)
    write_extension(ext_dir / "a.safetensors", "new_a", seed=1)
    (ext_dir / ".hidden.safetensors").write_bytes(b"")
    (ext_dir / "readme.txt").write_text("x")
    exts = load_extensions([ext_dir])
    assert [e.label for e in exts] == ["new_a", "new_b"]  # sorted file order
    base = load_jtp3(path, dtype=torch.float32)
    model = load_jtp3(path, dtype=torch.float32, extensions=exts)
    assert model.labels == names + ["new_a", "new_b"]
    p_base, p = _probs(base, sample), _probs(model, sample)
    assert torch.allclose(p[:12], p_base, atol=1e-6)  # base tags unchanged
    assert model.head.n_tags == 14


def test_replace_existing_tag_uses_both_tensors(small_model, tmp_path, sample):
    path, names = small_model
    base = load_jtp3(path, dtype=torch.float32)
    # an extension that carries tag_03's own parameters under the name tag_05: tag_05 must then score
    # exactly like tag_03 (upstream copied q into the out_proj slot and could not do this)
    q = base.head.q[:, 3:4].clone()
    out = base.head.out_proj.weight[3:4].clone()
    write_extension(tmp_path / "r.safetensors", "tag_05", q=q, out_proj=out)
    model = load_jtp3(path, dtype=torch.float32, extensions=load_extensions([tmp_path / "r.safetensors"]))
    assert model.labels == names
    p_base, p = _probs(base, sample), _probs(model, sample)
    assert p[5] == pytest.approx(p_base[3].item(), abs=1e-3)
    assert torch.allclose(p[[0, 1, 2, 3, 4, 6]], p_base[[0, 1, 2, 3, 4, 6]], atol=1e-6)


def test_upstream_unit_norm_q_and_frozen_copies_behave_like_ours(small_model, tmp_path, sample):
    """Upstream's builder writes unit-L2 q plus frozen copies of the shared head; we read it as trained."""
    path, _ = small_model
    ours = write_extension(tmp_path / "ours.safetensors", "ext_tag", seed=7)
    tensors = load_file(ours)
    from safetensors import safe_open

    with safe_open(ours, "pt") as f:
        meta = f.metadata()
    base = load_file(path)
    upstream = {"q": torch.nn.functional.normalize(tensors["q"].float(), dim=-1, eps=1e-5).bfloat16(),
                "out_proj.weight": tensors["out_proj.weight"],
                **{k.removeprefix("attn_pool."): v for k, v in base.items()
                   if k.startswith("attn_pool.") and k not in ("attn_pool.q", "attn_pool.out_proj.weight")}}
    save_file(upstream, tmp_path / "up.safetensors", metadata=meta)
    assert tensors["q"].float().norm(dim=-1).mean() == pytest.approx(4.0, rel=0.01)  # sqrt(head_dim=16)
    a = load_jtp3(path, dtype=torch.float32, extensions=[read_extension(ours)])
    b = load_jtp3(path, dtype=torch.float32, extensions=[read_extension(tmp_path / "up.safetensors")])
    assert _probs(a, sample)[-1] == pytest.approx(_probs(b, sample)[-1].item(), abs=2e-3)


def test_errors(small_model, tmp_path):
    path, _ = small_model
    e1 = write_extension(tmp_path / "x1.safetensors", "dup")
    e2 = write_extension(tmp_path / "x2.safetensors", "dup", seed=3)
    with pytest.raises(ExtensionError, match="both define tag 'dup'"):
        load_extensions([e1, e2])
    wrong = write_extension(tmp_path / "w.safetensors", "w", head={"n_heads": 4})
    with pytest.raises(ExtensionError, match="do not fit this model"):
        load_jtp3(path, extensions=[read_extension(wrong)])
    tensors = load_file(e1)
    save_file(tensors, tmp_path / "nometa.safetensors", metadata={"classifier.label": "x"})
    with pytest.raises(ExtensionError, match="missing SAI modelspec metadata"):
        read_extension(tmp_path / "nometa.safetensors")
    meta = {"modelspec.implementation": "redrocket.extension.label.v1", "classifier.label": "x",
            "modelspec.architecture": "something_else"}
    save_file(tensors, tmp_path / "arch.safetensors", metadata=meta)
    with pytest.raises(ExtensionError, match="architecture 'something_else' does not match"):
        load_jtp3(path, extensions=[read_extension(tmp_path / "arch.safetensors")])
    save_file({**tensors, "mid_blocks.0.q_cls": torch.zeros(1, 2)}, tmp_path / "mid.safetensors",
              metadata={**meta, "modelspec.architecture": "x"})
    with pytest.raises(ExtensionError, match="unexpected tensor"):
        read_extension(tmp_path / "mid.safetensors")
    save_file({**tensors, "validation": torch.zeros(3, 5, dtype=torch.int32)}, tmp_path / "val.safetensors",
              metadata=meta)
    with pytest.raises(ExtensionError, match="validation must have shape"):
        read_extension(tmp_path / "val.safetensors")
    with pytest.raises(FileNotFoundError):
        find_extensions([tmp_path / "nope"], use_default=False)


def test_a_label_outside_the_tag_rule_is_refused_naming_the_file(tmp_path):
    tensors = load_file(write_extension(tmp_path / "ok.safetensors", "ok"))
    save_file(tensors, tmp_path / "tab.safetensors",
              metadata={"modelspec.implementation": "redrocket.extension.label.v1", "classifier.label": "a\tb"})
    message = r"tab\.safetensors: metadata classifier\.label 'a\\tb': it contains a tab"
    with pytest.raises(ExtensionError, match=message):
        read_extension(tmp_path / "tab.safetensors")


def test_metadata_fields_and_validation_are_read(tmp_path):
    val = torch.tensor([[5, 1, 10, 2], [4, 0, 11, 3]], dtype=torch.int32)
    path = write_extension(tmp_path / "e.safetensors", "my_tag_(custom)", category="species",
                           implies=["b_tag", "a_tag"], validation=val)
    ext = read_extension(path)
    assert (ext.label, ext.category, ext.implies) == ("my_tag_(custom)", "species", ["a_tag", "b_tag"])
    assert ext.validation.tolist() == val.tolist()
    assert set(load_file(path)) == {"q", "out_proj.weight", "validation"}  # only its own tensors


@pytest.fixture(scope="module")
def pussy_model(tmp_path_factory):
    from hydra.testing.jtp3 import write_model

    names = ["big_pussy", "spread_vulva", "tag_2"]  # as in the real model: no name has both spellings
    return write_model(tmp_path_factory.mktemp("pussy") / "m.safetensors", names, seed=4), names


def test_a_tag_that_the_caption_rename_makes_equal_to_another_is_refused(pussy_model, tmp_path):
    """`big_vulva` would be written `big_pussy` in captions and CSV columns, like the model's own `big_pussy`
    (issue 15, item 10): refused at load with one line naming both tags and the file."""
    path, names = pussy_model
    clash = write_extension(tmp_path / "clash.safetensors", "big_vulva")
    with pytest.raises(ExtensionError) as e:
        load_jtp3(path, extensions=load_extensions([clash]))
    message = str(e.value)
    assert message.startswith(f"{clash}: tag 'big_vulva' is written 'big_pussy'") and "\n" not in message
    assert "the model's tag 'big_pussy'" in message
    # two extensions that clash with each other, whichever the model holds
    a = write_extension(tmp_path / "a.safetensors", "new_vulva")
    b = write_extension(tmp_path / "b.safetensors", "new_pussy", seed=2)
    with pytest.raises(ExtensionError, match=r"b\.safetensors: tag 'new_pussy' .* the tag of extension "
                                             r".*a\.safetensors' 'new_vulva'"):
        load_extensions([a, b])
    with pytest.raises(ExtensionError, match="the tag of extension"):  # not through load_extensions
        load_jtp3(path, extensions=[read_extension(a), read_extension(b)])
    # replacing a tag of the model under its own name, in either spelling the model uses, is fine
    ok = [write_extension(tmp_path / "r1.safetensors", "spread_vulva", seed=3),
          write_extension(tmp_path / "r2.safetensors", "big_pussy", seed=5),
          write_extension(tmp_path / "r3.safetensors", "other_vulva", seed=6)]
    assert load_jtp3(path, extensions=load_extensions(ok)).labels == names + ["other_vulva"]


def test_inference_refuses_the_clash_in_one_line(pussy_model, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    path, _ = pussy_model
    clash = write_extension(tmp_path / "ext" / "clash.safetensors", "big_vulva")
    noise_image(64, 64).save(tmp_path / "a.png")
    proc = subprocess.run([sys.executable, str(ROOT / "inference.py"), "-M", path, "-w", "0", "-E", "-e", clash,
                           "-o", tmp_path / "out.csv", tmp_path / "a.png"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "tag 'big_vulva' is written 'big_pussy'" in proc.stderr and str(clash) in proc.stderr
    assert not (tmp_path / "out.csv").exists()
