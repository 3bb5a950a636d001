"""Tests for hydra/train/ (workspace, feature cache, loop) and train_extension.py's argument handling.

Covers: the workspace rules (tag folder, which files count); the feature cache (contents equal the
backbone's valid-token features, freshness by mtime, --rebuild-cache, --no-mtime, failures counted, loader
workers); the seeded split, sanity checks and epoch sampling; padding masked in training as at inference;
the one-tag training head (shared frozen weights, init, -i); validation counts and the EPOCH line; the
epoch loop's checkpoints (interval every k epochs, last epoch, Ctrl-C, Windows-valid names, weights_only
loading, resume); the resume/flag conflicts of the CLI. All on a tiny random model, CPU only.

Run: venv/bin/python -m pytest tests/test_training.py -q
"""

import math
import os
import random
import re
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import train_extension
from hydra.images.naflex import JTP3Preprocess, collate
from hydra.models.jtp3_net import load_jtp3
from hydra.testing.jtp3 import write_model
from hydra.train import features, heads
from hydra.train import loop as training
from hydra.train.features import Item
from hydra.train.optim import AdamWScheduleFree

TAGS = ["alpha", "beta", "gamma"]
D = 64  # tiny fixture backbone width


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("model") / "tiny.safetensors", TAGS)


@pytest.fixture(scope="module")
def model(model_path):
    return load_jtp3(model_path)


def write_image(path, size=(48, 32), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


def fake_items(folder, n_pos, n_neg, seed=0, lengths=(5, 9)):
    """Items whose cache files hold random features (no images or backbone needed)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for label, n in ((1, n_pos), (0, n_neg)):
        for i in range(n):
            path = os.path.join(folder, "positive" if label else "negative", f"{i:03d}.png")
            cache = features.cache_path(path, "jtp3")
            n_tok = int(torch.randint(lengths[0], lengths[1] + 1, (), generator=g))
            feats = torch.randn(n_tok, D, generator=g) + (0.8 if label else -0.8)
            features.save_features(cache, feats)
            items.append(Item(path, label, cache))
    return sorted(items)


# -- workspace -----------------------------------------------------------------------------------


def test_tag_folder_name_and_tag_rules():
    assert features.tag_dir_name("my tag/v1.2") == "my_tag_v1_2"
    assert features.tag_dir_name("my_tag_(custom)") == "my_tag_(custom)"
    for bad in ("", "a\\b", "a\nb"):
        with pytest.raises(ValueError):
            features.check_tag(bad)


def test_list_images_skips_dot_files_notes_and_folders(tmp_path):
    for name in ("b.png", "a.jpg", ".hidden.png", "notes.txt", "list.CSV", "x.webp"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "_cache").mkdir()
    assert [os.path.basename(p) for p in features.list_images(tmp_path)] == ["a.jpg", "b.png", "x.webp"]


def test_workspace_needs_the_tag_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        features.Workspace.for_tag(tmp_path, "my tag")
    (tmp_path / "my_tag" / "positive").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="negative"):
        features.Workspace.for_tag(tmp_path, "my tag")
    (tmp_path / "my_tag" / "negative").mkdir()
    ws = features.Workspace.for_tag(tmp_path, "my tag")
    write_image(tmp_path / "my_tag" / "positive" / "p.png")
    write_image(tmp_path / "my_tag" / "negative" / "n.png")
    assert ws.checkpoints == os.path.join(str(tmp_path), "my_tag", "checkpoints")
    assert [(os.path.basename(p), y) for p, y in ws.images()] == [("p.png", 1), ("n.png", 0)]


# -- feature cache ---------------------------------------------------------------------------------


def test_cache_path_and_cache_tag_rules():
    assert features.cache_path(os.path.join("t", "positive", "a.png"), "jtp3") == \
        os.path.join("t", "positive", "_cache", "jtp3__a.png.safetensors")
    for bad in ("", ".x", "a/b", "a\\b"):
        with pytest.raises(ValueError):
            features.check_cache_tag(bad)


def test_cache_freshness_follows_mtime_unless_disabled(tmp_path):
    image = write_image(tmp_path / "a.png")
    cache = features.cache_path(image, "jtp3")
    assert not features.cache_is_fresh(image, cache)
    features.save_features(cache, torch.zeros(2, D))
    assert features.cache_is_fresh(image, cache)
    t = os.stat(cache).st_mtime_ns
    os.utime(image, ns=(t + 10**9, t + 10**9))  # the image changed after caching
    assert not features.cache_is_fresh(image, cache)
    assert features.cache_is_fresh(image, cache, check_mtime=False)


def test_feature_cache_holds_the_valid_token_features(tmp_path, model):
    (tmp_path / "positive").mkdir()
    images = [(write_image(tmp_path / "positive" / f"{i}.png", size, seed=i), 1)
              for i, size in enumerate([(48, 32), (32, 80), (64, 64)])]
    images.append((str(tmp_path / "positive" / "broken.png"), 1))
    (tmp_path / "positive" / "broken.png").write_bytes(b"not an image")
    result = features.build_feature_cache(model, images, "jtp3", batch_size=2, progress=False)
    assert (result.computed, result.failed) == (3, 1)
    assert [it.path for it in result.items] == sorted(p for p, _ in images[:3])
    for path, _ in images[:3]:
        cached = features.load_features(features.cache_path(path, "jtp3"))
        sample = JTP3Preprocess()(path)
        with torch.inference_mode():
            alone = model.features(model.to_device_batch(collate([sample])))[0]  # (N, D)
        assert cached.dtype == torch.bfloat16 and cached.shape == (len(sample["patches"]), D)
        # batched with padding vs alone: the backbone masks padding, so only rounding noise differs
        torch.testing.assert_close(cached.float(), alone.float(), atol=0.05, rtol=0.02)

    again = features.build_feature_cache(model, images[:3], "jtp3", progress=False)
    assert (again.computed, again.failed, len(again.items)) == (0, 0, 3)
    rebuilt = features.build_feature_cache(model, images[:3], "jtp3", rebuild=True, progress=False)
    assert rebuilt.computed == 3
    other = features.build_feature_cache(model, images[:1], "other", progress=False)  # a separate namespace
    assert other.computed == 1 and os.path.exists(features.cache_path(images[0][0], "other"))


def test_feature_cache_with_loader_workers(tmp_path, model):
    images = [(write_image(tmp_path / f"{i}.png", seed=i), i % 2) for i in range(4)]
    result = features.build_feature_cache(model, images, "jtp3", batch_size=3, workers=1, share_memory=False,
                                          progress=False)
    assert (result.computed, result.failed) == (4, 0)
    assert [it.label for it in result.items] == [0, 1, 0, 1]


def test_feature_cache_needs_no_model_when_fresh(tmp_path):
    image = write_image(tmp_path / "a.png")
    features.save_features(features.cache_path(image, "jtp3"), torch.zeros(3, D))
    result = features.build_feature_cache(None, [(image, 1)], "jtp3", progress=False)
    assert result.items == [Item(image, 1, features.cache_path(image, "jtp3"))]


# -- split and sampling ----------------------------------------------------------------------------


def test_split_is_seeded_balanced_sorted_and_disjoint(tmp_path):
    items = fake_items(tmp_path, 12, 15)
    train, val = training.split_dataset(items, 4, random.Random(3407))
    assert sum(it.label for it in val) == 4 and len(val) == 8
    assert len(train) == 19 and not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)
    again = training.split_dataset(list(reversed(items)), 4, random.Random(3407))
    assert again == (train, val)  # the input order does not matter, only the seed
    assert training.split_dataset(items, 4, random.Random(1)) != (train, val)
    with pytest.raises(ValueError, match="12 positive"):
        training.split_dataset(items, 12, random.Random(0))


def test_sanity_checks_name_each_problem(tmp_path):
    items = fake_items(tmp_path, 10, 50)
    train, val = training.split_dataset(items, 5, random.Random(0))
    problems = " ".join(training.sanity_problems(items, train, val, batch=8, accumulate=1))
    assert "Training dataset of size 50 is too small" in problems
    assert "Validation dataset of size 10 is too small" in problems
    assert "very imbalanced" in problems and "Effective batch size" in problems
    big = [Item(f"{i:04d}", i % 2, "") for i in range(200)]
    train, val = training.split_dataset(big, 20, random.Random(0))
    assert training.sanity_problems(big, train, val, batch=8, accumulate=2) == []


def test_epoch_sample_draws_whole_steps_without_replacement():
    train = [Item(f"{i:02d}", i % 2, "") for i in range(37)]
    rng = random.Random(0)
    first = training.epoch_sample(rng, train, batch=4, accumulate=2)
    assert len(first) == 32 and len(set(first)) == 32 and set(first) <= set(train)
    assert training.epoch_sample(rng, train, 4, 2) != first  # a new draw every epoch
    with pytest.raises(ValueError, match="lower the batch size"):
        training.epoch_sample(rng, train[:5], batch=4, accumulate=2)


def test_collate_features_pads_with_zeros_and_marks_valid_tokens():
    x, valid = training.collate_features([torch.ones(2, 3), torch.ones(4, 3)], "cpu", torch.float32)
    assert x.shape == (2, 4, 3) and valid.tolist() == [[True, True, False, False], [True] * 4]
    assert x[0, 2:].abs().sum() == 0


# -- the training head -----------------------------------------------------------------------------


def test_train_head_shares_frozen_weights_and_trains_only_its_own(model):
    head = heads.make_train_head(model.head, generator=torch.Generator().manual_seed(0))
    base = model.head
    assert head.kv.weight is base.kv.weight and head.ff_in.weight is base.ff_in.weight
    assert head.ff_out.weight is base.ff_out.weight and head.ff_norm.weight is base.ff_norm.weight
    trainable = [n for n, p in head.named_parameters() if p.requires_grad]
    assert sorted(trainable) == ["out_proj.weight", "q"]
    h, e, a = base.cfg.n_heads, base.cfg.head_dim, base.cfg.attn_dim
    assert head.q.shape == (h, 1, e) and head.out_proj.weight.shape == (1, a, 2)
    assert head.out_proj.weight.abs().max() <= 1 / math.sqrt(a) and not head.q_normed
    assert [n for n, _ in heads.named_trainable(head)] == ["attn_pool.q", "attn_pool.out_proj.weight"]


def test_init_from_tag_reproduces_that_tag(model):
    head = heads.make_train_head(model.head, init_index=1)
    x = torch.randn(2, 7, D).to(torch.bfloat16)
    with torch.no_grad():  # the stored q is RMS-normalised, so normalising again changes ~nothing
        torch.testing.assert_close(head(x).float(), model.head(x)[:, 1:2].float(), atol=0.05, rtol=0.02)


def test_padding_is_masked_in_training_as_at_inference(model):
    """Deliberate fix: upstream's training mask was all True, so zero padding joined the softmax."""
    head = heads.make_train_head(model.head, generator=torch.Generator().manual_seed(0))
    feats = [torch.randn(3, D), torch.randn(9, D)]
    x, valid = training.collate_features(feats, "cpu", torch.bfloat16)
    with torch.no_grad():
        batched = head(x, valid)[0]
        alone = head(feats[0].to(torch.bfloat16)[None])[0]
        unmasked = head(x)[0]
    torch.testing.assert_close(batched, alone)
    assert not torch.equal(unmasked, alone)


# -- validation and the loop -----------------------------------------------------------------------


def test_validation_thresholds_are_bf16_logits_of_an_even_grid():
    t = training.validation_thresholds(99)
    assert t.dtype == torch.bfloat16 and t.shape == (99,)
    np.testing.assert_allclose(torch.sigmoid(t.float()).numpy(), np.arange(1, 100) / 100, atol=0.002)


def test_counts_and_best_cti_by_hand():
    thresholds = torch.tensor([-1.0, 0.0, 1.0]).to(torch.bfloat16)
    logits = torch.tensor([2.0, 0.5, -0.5, 0.0, -2.0])
    labels = torch.tensor([1, 1, 1, 0, 0])
    counts = training.count_outcomes(logits, labels, thresholds)
    assert counts.dtype == torch.int32
    # logit >= thr: at -1 -> 4 predicted (3 tp, 1 fp); at 0 -> 3 (2 tp, 1 fp); at 1 -> 1 (1 tp)
    assert counts.tolist() == [[3, 1, 1, 0], [2, 1, 1, 1], [1, 0, 2, 2]]
    cti, thr = training.best_cti(counts, thresholds)
    assert cti == pytest.approx(0.75) and thr == pytest.approx(1 / (1 + math.e), abs=1e-3)
    line = training.Validation(0.123456, cti, thr, counts).line(7)
    assert line == "EPOCH 7 VALIDATION: loss=0.1235, cti=0.7500, thr=0.2689"


def run_fit(tmp_path, model, items, *, epochs, interval=0, stop=None, start_epoch=0, head=None, opt=None,
            rng=None, on_epoch=None):
    train, val = training.split_dataset(items, 4, random.Random(3407))
    head = head or heads.make_train_head(model.head, generator=torch.Generator().manual_seed(0))
    opt = opt or AdamWScheduleFree(heads.named_trainable(head), lr=1e-2, warmup_steps=2, seed=0)
    settings = training.LoopSettings(batch=4, accumulate=2, max_epochs=epochs, checkpoint_interval=interval,
                                     progress=False)
    saved = training.fit(head, opt, train, val, rng or random.Random(5), seed=3407, settings=settings,
                         checkpoint_dir=str(tmp_path / "checkpoints"), start_epoch=start_epoch, stop=stop,
                         on_epoch=on_epoch)
    return saved, head, opt


def test_fit_prints_epoch_lines_and_saves_every_k_epochs_and_the_last(tmp_path, model, capsys):
    items = fake_items(tmp_path, 14, 14)
    saved, _, _ = run_fit(tmp_path, model, items, epochs=5, interval=2)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5
    for n, line in enumerate(out, start=1):
        assert re.fullmatch(rf"EPOCH {n} VALIDATION: loss=\d+\.\d{{4}}, cti=\d\.\d{{4}}, thr=\d\.\d{{4}}", line)
    names = [os.path.basename(p) for p in saved]
    assert [n.split("_e")[1] for n in names] == ["2.pt", "4.pt", "5.pt"]
    assert all(re.fullmatch(r"\d{8}-\d{6}_e\d+\.pt", n) for n in names)  # no ':' or '%-H': fine on Windows


def test_checkpoint_loads_weights_only_and_resumes(tmp_path, model, capsys):
    items = fake_items(tmp_path, 14, 14)
    rng = random.Random(5)
    saved, head, opt = run_fit(tmp_path, model, items, epochs=2, rng=rng)
    ckpt = training.load_checkpoint(saved[-1])  # torch.load(weights_only=True) inside
    assert set(ckpt) == {"seed", "epoch", "rng_state", "attn_pool", "optimizer", "validation"}
    assert (ckpt["seed"], ckpt["epoch"]) == (3407, 2)
    assert ckpt["validation"].shape == (99, 4) and ckpt["validation"].dtype == torch.int32
    assert ckpt["validation"].sum(1).eq(8).all()  # each threshold classifies all 8 held-out items
    torch.testing.assert_close(ckpt["attn_pool"]["q"], head.q.detach())  # saved in train mode (y)
    assert ckpt["optimizer"]["param_groups"][0]["train_mode"]
    assert ckpt["optimizer"]["param_groups"][0]["param_names"] == ["attn_pool.q", "attn_pool.out_proj.weight"]
    restored = random.Random()
    restored.setstate(ckpt["rng_state"])
    assert restored.random() == rng.random()

    # resume: fresh head and optimizer, then the checkpoint's state; numbering continues
    head2 = heads.make_train_head(model.head, generator=torch.Generator().manual_seed(1))
    heads.load_head_state(head2, ckpt["attn_pool"])
    opt2 = AdamWScheduleFree(heads.named_trainable(head2), lr=0.5, seed=0)
    opt2.load_state_dict(ckpt["optimizer"])
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["step"] == opt.param_groups[0]["step"]
    torch.testing.assert_close(opt2.state[head2.q]["z"], opt.state[head.q]["z"])
    capsys.readouterr()
    saved2, _, _ = run_fit(tmp_path, model, items, epochs=3, start_epoch=2, head=head2, opt=opt2, rng=restored)
    assert capsys.readouterr().out.startswith("EPOCH 3 VALIDATION")
    assert saved2[-1].endswith("_e3.pt")


def test_load_head_state_checks_shapes(model):
    head = heads.make_train_head(model.head)
    with pytest.raises(training.CheckpointError, match="shape"):
        heads.load_head_state(head, {"q": torch.zeros(1, 1, 1), "out_proj.weight": head.out_proj.weight})


def test_first_ctrl_c_stops_at_the_end_of_the_epoch_and_saves(tmp_path, model, capsys):
    items = fake_items(tmp_path, 14, 14)
    stop = training.StopFlag()
    seen = []

    def on_epoch(epoch, result):
        seen.append(epoch)
        if epoch == 2:
            stop(signal.SIGINT, None)  # what the handler does on the first Ctrl-C

    saved, _, _ = run_fit(tmp_path, model, items, epochs=0, stop=stop, on_epoch=on_epoch)
    assert seen == [1, 2] and len(saved) == 1 and saved[0].endswith("_e2.pt")
    assert "Interrupted. Stopping at the end of this epoch." in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        stop(signal.SIGINT, None)  # the second one aborts


def test_stop_flag_installs_and_restores_the_sigint_handler():
    before = signal.getsignal(signal.SIGINT)
    with training.StopFlag() as stop:
        assert signal.getsignal(signal.SIGINT) is stop
    assert signal.getsignal(signal.SIGINT) is before


def test_corrupt_or_unsafe_checkpoints_are_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(training.CheckpointError, match="not a readable"):
        training.load_checkpoint(str(bad))
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"seed": 1, "epoch": 1, "attn_pool": {}, "optimizer": {}, "x": object()}, unsafe)
    with pytest.raises(training.CheckpointError):
        training.load_checkpoint(str(unsafe))


# -- the CLI's argument rules ----------------------------------------------------------------------


def parse(*argv):
    return train_extension.build_parser().parse_args(list(argv))


def test_cli_defaults():
    args = parse("my_tag")
    assert (args.dir, args.model, args.device, args.resume, args.seed, args.init_from_tag) == \
        ("train", None, None, None, None, None)
    assert (args.batch, args.accumulate, args.max_epochs, args.checkpoint_interval) == (16, 1, 0, 0)
    assert (args.validation_samples, args.validation_thresholds, args.force) == (20, 99, False)
    assert (args.cache_batch, args.cache_workers, args.cache_tag) == (4, -1, "jtp3")
    assert not (args.rebuild_cache or args.no_train or args.no_shm or args.no_mtime)
    assert train_extension.HYPER == {"lr": 1e-4, "beta1": 0.9, "beta2": 0.999, "beta1_c": 200.0,
                                     "weight_decay": 1e-2, "warmup_steps": 20}
    assert train_extension.SEED == 3407
    text = train_extension.build_parser().format_help()
    for flag in ("-D", "-M", "-d", "-r", "-s", "-i", "-b", "-a", "-e", "-c", "-v", "-T", "--force", "--lr",
                 "--beta1", "--beta2", "--beta1-c", "--weight-decay", "--warmup-steps", "-B", "-W",
                 "--cache-tag", "--rebuild-cache", "--no-train", "--no-shm", "--no-mtime"):
        assert flag in text


@pytest.mark.parametrize("flag", [["-s", "1"], ["-i", "alpha"], ["--lr", "1"], ["--beta1", "0.5"],
                                  ["--beta2", "0.5"], ["--beta1-c", "10"], ["--weight-decay", "0"],
                                  ["--warmup-steps", "0"]])
def test_resume_refuses_seed_init_and_optimizer_flags(flag):
    with pytest.raises(ValueError, match="--resume"):
        train_extension.check_args(parse("-r", "x.pt", *flag, "my_tag"))
    train_extension.check_args(parse(*flag, "my_tag"))  # fine without --resume


def test_cli_reports_a_missing_workspace(tmp_path, capsys):
    assert train_extension.main(parse("-D", str(tmp_path), "my_tag")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_tag_the_caption_rename_makes_equal_to_a_model_tag_is_refused(tmp_path, capsys):
    """`big_vulva` is written `big_pussy` in captions and CSV columns, like the model's `big_pussy` (issue 15,
    item 10): refused once the model is loaded, before any feature is computed."""
    path = write_model(tmp_path / "m.safetensors", ["big_pussy", "other"])
    for kind, seed in (("positive", 1), ("negative", 2)):
        (tmp_path / "train" / "big_vulva" / kind).mkdir(parents=True)
        write_image(tmp_path / "train" / "big_vulva" / kind / "a.png", seed=seed)
    before = sorted(p for p in (tmp_path / "train").rglob("*"))
    code = train_extension.main(parse("-D", str(tmp_path / "train"), "-M", path, "-d", "cpu", "big_vulva"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert (f"error: TAG 'big_vulva' is written 'big_pussy' in captions and CSV columns (the vulva -> pussy "
            f"rename), as is the tag 'big_pussy' of '{path}'") in err
    assert sorted(p for p in (tmp_path / "train").rglob("*")) == before  # no feature cache started
