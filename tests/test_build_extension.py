"""Tests for build_extension.py and `hydra.train.heads.extension_tensors`.

Covers: flags and defaults; what is written (only q, out_proj.weight and validation; q RMS-normalised;
bf16 / int32) and the metadata keys; the schedule-free averaged weights rebuilt from the optimizer's z;
that the built extension gives at inference exactly the validation counts of its checkpoint (the q-scale
decision); that an upstream-style file (unit-L2 q plus frozen head copies) loads and behaves the same;
the output folder rules (default created only when defaulted, FileExistsError without --replace) and the
checks on TAG, implications and FILE_NAME (the tag-name rule itself: tests/test_tag_names.py). Checkpoints
are trained for two epochs on random features.

Run: venv/bin/python -m pytest tests/test_build_extension.py -q
"""

import datetime
import os
import random

import pytest
import torch
import torch.nn.functional as F

import build_extension
from hydra.models import resources
from hydra.models.checkpoint import load_tensors, save_safetensors
from hydra.models.extensions import FROZEN_COPIES, read_extension
from hydra.models.jtp3_net import load_jtp3
from hydra.testing.jtp3 import write_model
from hydra.train import features, heads
from hydra.train import loop as training
from hydra.train.export import DESCRIPTION
from hydra.train.features import Item
from hydra.train.optim import AdamWScheduleFree, schedule_free_eval_point

TAGS = ["alpha", "beta", "gamma"]
D, H, E = 64, 2, 16  # tiny fixture: backbone width, heads, head dim


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("model") / "tiny.safetensors", TAGS)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_path):
    """A two-epoch checkpoint on random features, with its validation items."""
    folder = tmp_path_factory.mktemp("ws")
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(28):
        label = i % 2
        path = str(folder / f"{i:03d}.png")
        feats = torch.randn(int(torch.randint(4, 10, (), generator=g)), D, generator=g) + (0.8 if label else -0.8)
        features.save_features(features.cache_path(path, "jtp3"), feats)
        items.append(Item(path, label, features.cache_path(path, "jtp3")))
    rng = random.Random(3407)
    train, val = training.split_dataset(items, 4, rng)
    model = load_jtp3(model_path)
    head = heads.make_train_head(model.head, generator=torch.Generator().manual_seed(0))
    opt = AdamWScheduleFree(heads.named_trainable(head), lr=1e-2, warmup_steps=2, seed=0)
    settings = training.LoopSettings(batch=4, max_epochs=2, progress=False)
    saved = training.fit(head, opt, train, val, rng, seed=3407, settings=settings,
                         checkpoint_dir=str(folder / "checkpoints"))
    return saved[-1], val


def run(capsys, *argv):
    code = build_extension.main(build_extension.build_parser().parse_args([str(a) for a in argv]))
    return code, capsys.readouterr().err


def test_parser_flags_and_defaults():
    p = build_extension.build_parser()
    args = p.parse_args(["ck.pt", "my_tag", "general"])
    assert (args.output_dir, args.replace, args.author, args.license, args.title, args.language, args.implies,
            args.file_name) == (None, False, None, "MIT", None, "en/US", [], None)
    assert p.description == "JTP-3 Hydra Extension Builder"
    with pytest.raises(SystemExit):
        p.parse_args(["ck.pt", "my_tag", "nonsense"])
    for cat in ("general", "artist", "copyright", "character", "species", "meta", "lore"):
        p.parse_args(["ck.pt", "t", cat])


def test_build_writes_only_the_extension_tensors_and_the_metadata(tmp_path, trained, capsys):
    ckpt_path, _ = trained
    code, err = run(capsys, "-o", tmp_path, "-a", "Me", "-i", "zeta", "-i", "alpha", ckpt_path, "my.tag/x", "species")
    assert code == 0, err
    path = tmp_path / "my_tag_x.safetensors"
    tensors, meta = load_tensors(path)
    assert set(tensors) == {"q", "out_proj.weight", "validation"}
    assert tensors["q"].dtype == torch.bfloat16 and tensors["q"].shape == (H, 1, E)
    assert tensors["out_proj.weight"].dtype == torch.bfloat16 and tensors["out_proj.weight"].shape == (1, H * E, 2)
    assert tensors["validation"].dtype == torch.int32 and tensors["validation"].shape == (99, 4)
    norms = tensors["q"].float().norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, E ** 0.5), atol=0.05, rtol=0)  # RMS-normalised
    assert meta == {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "naflexvit_so400m_patch16_siglip+rr_hydra",
        "modelspec.implementation": "redrocket.extension.label.v1",
        "modelspec.description": DESCRIPTION,
        "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.tags": "Image Classification",
        "modelspec.title": "JTP-3 Hydra Extension: my.tag/x",
        "modelspec.author": "Me",
        "modelspec.license": "MIT",
        "modelspec.language": "en/US",
        "classifier.label": "my.tag/x",
        "classifier.label.category": "species",
        "classifier.label.implies": "alpha zeta",
    }
    lines = err.splitlines()
    assert lines[0] == f"Loading checkpoint '{ckpt_path}'..."
    assert "modelspec.sai_model_spec: '1.0.0'" in lines and "classifier.label.category: 'species'" in lines
    assert "Apply optimizer state: attn_pool.q" in lines
    assert "Apply optimizer state: attn_pool.out_proj.weight" in lines
    assert any(line.startswith("Normalize: attn_pool.q (RMSNorm") for line in lines)
    assert lines[-1] == f"Saving extension '{path}'..."


def test_weights_are_the_schedule_free_average(trained):
    ckpt = training.load_checkpoint(trained[0])
    state = ckpt["optimizer"]["state"]
    y_q, y_out = ckpt["attn_pool"]["q"], ckpt["attn_pool"]["out_proj.weight"]
    state[0]["z"] = y_q.float() + 0.9  # far enough from y that x = y + (1 - 1/beta1)(z - y) = y - 0.1 shows
    q, out, validation = heads.extension_tensors(ckpt, lambda _: None)
    torch.testing.assert_close(q.float(), y_q.float() - 0.1, atol=0.01, rtol=0)
    torch.testing.assert_close(q, schedule_free_eval_point(y_q, state[0]["z"], 0.9))
    torch.testing.assert_close(out, schedule_free_eval_point(y_out, state[1]["z"], 0.9))
    assert validation is ckpt["validation"]
    # a group already in eval mode holds x: nothing to apply
    ckpt["optimizer"]["param_groups"][0]["train_mode"] = False
    said = []
    q2, _, _ = heads.extension_tensors(ckpt, said.append)
    assert said == [] and torch.equal(q2, y_q)
    del ckpt["optimizer"]["param_groups"][0]["param_names"]
    ckpt["optimizer"]["param_groups"][0]["train_mode"] = True
    with pytest.raises(training.CheckpointError, match="param_names"):
        heads.extension_tensors(ckpt)


def test_extension_reproduces_its_validation_at_inference(tmp_path, trained, model_path, capsys):
    """The q-scale decision: the loader RMS-normalises q, so the built tag scores as it did in validation."""
    ckpt_path, val = trained
    assert run(capsys, "-o", tmp_path, ckpt_path, "new_tag", "general")[0] == 0
    model = load_jtp3(model_path, extensions=[read_extension(tmp_path / "new_tag.safetensors")])
    assert model.labels == [*TAGS, "new_tag"]
    x, valid = training.collate_features([features.load_features(it.cache) for it in val], "cpu", torch.bfloat16)
    with torch.no_grad():
        logits = model.head(x, valid)[:, 3]
    labels = torch.tensor([it.label for it in val])
    counts = training.count_outcomes(logits, labels, training.validation_thresholds(99))
    assert torch.equal(counts, training.load_checkpoint(ckpt_path)["validation"])


def test_upstream_style_file_with_unit_q_and_frozen_copies_behaves_the_same(tmp_path, trained, model_path, capsys):
    ckpt_path, val = trained
    assert run(capsys, "-o", tmp_path, ckpt_path, "new_tag", "general", "ours")[0] == 0
    ours = read_extension(tmp_path / "ours.safetensors")
    # what upstream's builder writes: the whole attn_pool with q unit-L2-normalised (F.normalize, eps 1e-5)
    q, out, validation = heads.extension_tensors(training.load_checkpoint(ckpt_path), lambda _: None)
    base, _ = load_tensors(model_path)
    tensors = {"q": F.normalize(q.float(), dim=-1, eps=1e-5).to(torch.bfloat16), "out_proj.weight": out,
               "validation": validation, **{k: base["attn_pool." + k] for k in FROZEN_COPIES}}
    save_safetensors(tmp_path / "upstream.safetensors", tensors, ours.metadata)
    upstream = read_extension(tmp_path / "upstream.safetensors")
    assert upstream.q.float().norm(dim=-1).sub(1).abs().max() < 0.01
    x, valid = training.collate_features([features.load_features(it.cache) for it in val], "cpu", torch.bfloat16)
    with torch.no_grad():
        a = load_jtp3(model_path, extensions=[ours]).head(x, valid)[:, 3]
        b = load_jtp3(model_path, extensions=[upstream]).head(x, valid)[:, 3]
    torch.testing.assert_close(a.float(), b.float(), atol=0.05, rtol=0.02)


def test_replace_tag_through_an_extension(tmp_path, trained, model_path, capsys):
    assert run(capsys, "-o", tmp_path, trained[0], "beta", "general")[0] == 0
    assert run(capsys, "-o", tmp_path, trained[0], "new_tag", "general")[0] == 0
    replaced = load_jtp3(model_path, extensions=[read_extension(tmp_path / "beta.safetensors")])
    appended = load_jtp3(model_path, extensions=[read_extension(tmp_path / "new_tag.safetensors")])
    assert replaced.labels == TAGS  # replaced in place, not appended
    x = torch.randn(3, 6, D).to(torch.bfloat16)
    with torch.no_grad():
        out, ref, new = replaced.head(x), load_jtp3(model_path).head(x), appended.head(x)
    torch.testing.assert_close(out[:, [0, 2]], ref[:, [0, 2]])  # the other tags are untouched
    torch.testing.assert_close(out[:, 1], new[:, 3])  # "beta" now scores as the trained tag
    assert not torch.equal(out[:, 1], ref[:, 1])


def test_output_folder_rules(tmp_path, trained, capsys, monkeypatch):
    monkeypatch.setattr(resources, "ROOT", tmp_path)  # the project folder holds the default output
    monkeypatch.chdir(tmp_path)
    code, _ = run(capsys, trained[0], "my_tag", "general")
    assert code == 0 and (tmp_path / "extensions" / "jtp-3-hydra" / "my_tag.safetensors").is_file()
    code, err = run(capsys, trained[0], "my_tag", "general")
    assert code == 2 and "Provide a different file name, or specify --replace" in err
    assert run(capsys, "-r", trained[0], "my_tag", "general")[0] == 0
    code, err = run(capsys, "-o", tmp_path / "missing", trained[0], "my_tag", "general")
    assert code == 2 and "does not exist" in err and not (tmp_path / "missing").exists()


@pytest.mark.parametrize("argv", [
    ["bad tag", "general"], ["", "general"], ["a\\b", "general"], ["ok", "general", "-i", "two words"],
    ["ok", "general", "-i", ""], ["ok", "general", "f.x"], ["ok", "general", "a/b"], ["a\tb", "general"],
    ["ok", "general", "-I", "a\xa0b"],
])
def test_invalid_tags_and_file_names_are_refused(tmp_path, trained, capsys, argv):
    code, err = run(capsys, "-o", tmp_path, trained[0], *argv)
    assert code == 2 and "error:" in err and not list(tmp_path.iterdir())


def test_a_refused_tag_is_named_with_the_reason_and_the_underscore_spelling(tmp_path, trained, capsys):
    code, err = run(capsys, "-o", tmp_path, trained[0], "my tag", "general")
    assert code == 2 and "error: TAG 'my tag': it contains a space (" in err and "e621 spelling: 'my_tag')" in err


def test_unicode_tag_with_parentheses_and_colon_builds_and_loads(tmp_path, trained, capsys):
    code, err = run(capsys, "-o", tmp_path, "-i", "16:9", trained[0], "pokémon_(species)", "species")
    assert code == 0, err
    ext = read_extension(tmp_path / "pokémon_(species).safetensors")
    assert (ext.label, ext.category, ext.implies) == ("pokémon_(species)", "species", ["16:9"])


def test_checkpoint_without_validation_warns_and_writes_none(tmp_path, trained, capsys):
    ckpt = training.load_checkpoint(trained[0])
    ckpt["validation"] = None
    torch.save(ckpt, tmp_path / "noval.pt")
    code, err = run(capsys, "-o", tmp_path, tmp_path / "noval.pt", "t", "meta")
    assert code == 0 and "Calibration will not be supported" in err
    assert "validation" not in load_tensors(tmp_path / "t.safetensors")[0]


def test_upstream_checkpoint_with_whole_attn_pool_is_accepted(tmp_path, trained, model_path, capsys):
    """Upstream checkpoints carry the frozen copies and `_extra_state` inside attn_pool."""
    ckpt = training.load_checkpoint(trained[0])
    base, _ = load_tensors(model_path)
    ckpt["attn_pool"].update({k: base["attn_pool." + k] for k in FROZEN_COPIES})
    torch.save(ckpt, tmp_path / "upstream.pt")
    assert run(capsys, "-o", tmp_path, tmp_path / "upstream.pt", "t", "general")[0] == 0
    assert set(load_tensors(tmp_path / "t.safetensors")[0]) == {"q", "out_proj.weight", "validation"}
    assert os.path.getsize(tmp_path / "t.safetensors") < 4096


def test_a_tag_the_caption_rename_makes_equal_to_another_is_refused(tmp_path, trained, capsys, monkeypatch):
    """`big_vulva` is written `big_pussy` in captions and CSV columns, like the real model's `big_pussy`
    (data/jtp-3-hydra-tags.csv) or a neighbouring extension's tag (issue 15, item 10)."""
    tags_csv = resources.project_path(resources.DEFAULT_METADATA)
    monkeypatch.setattr(resources, "ROOT", tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / resources.DEFAULT_METADATA).write_text("tag,category,implications\nbig_pussy,0,\nspread_vulva,0,\n",
                                                       encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    code, err = run(capsys, "-o", out, trained[0], "big_vulva", "general")
    assert code == 2 and err.count("\n") == 2, err  # "Loading checkpoint" and the error
    assert ("error: TAG 'big_vulva' is written 'big_pussy' in captions and CSV columns (the vulva -> pussy "
            f"rename), as is the tag 'big_pussy' of '{resources.project_path(resources.DEFAULT_METADATA)}'") in err
    assert not list(out.iterdir())
    assert run(capsys, "-o", out, trained[0], "new_vulva", "general")[0] == 0
    code, err = run(capsys, "-o", out, trained[0], "new_pussy", "general")
    assert code == 2 and f"as is the tag 'new_vulva' of '{out / 'new_vulva.safetensors'}'" in err
    # replacing the tag by its own name is fine, and so is rebuilding one file under another spelling
    assert run(capsys, "-o", out, trained[0], "big_pussy", "general")[0] == 0
    assert run(capsys, "-o", out, "-r", trained[0], "new_pussy", "general", "new_vulva")[0] == 0
    assert os.path.isfile(tags_csv)  # the real file is untouched (only the project folder was redirected)
