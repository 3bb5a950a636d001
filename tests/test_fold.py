"""Folded heads (hydra/models/head.py, hydra35_net.py): JTP-3's ff_out x out_proj and Hydra 3.5's last proj_out x
head, built once at load, equal to the heads as stored (fp32: to float rounding; bf16: within the documented
tolerance), for several batch sizes, with extensions appended and replaced, off with HYDRA_NO_FOLD=1, and never in
the state dict.

    venv/bin/python -m pytest tests/test_fold.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import noise_image

from hydra.images.naflex import JTP3Preprocess
from hydra.models import head as head_module
from hydra.models.extensions import load_extensions
from hydra.models.hydra35_net import load_hydra35
from hydra.models.jtp3_net import load_jtp3
from hydra.testing.hydra35 import TITLE, write_hydra35_extension, write_hydra35_model
from hydra.testing.jtp3 import write_extension, write_model

TAGS = [f"t{i:02d}" for i in range(40)]
# |delta p| folded vs stored: fp32 is float rounding; bf16 rounds G once instead of ff_out's output, which moves
# a logit by a few bf16 ulps (measured on these models: max 0.004; full-size random models: see README)
FP32_TOL, BF16_TOL = 2e-5, 0.02


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fold")
    jtp3 = write_model(d / "jtp3.safetensors", TAGS, seed=5)
    hydra35 = write_hydra35_model(d / "hydra35.safetensors", TAGS, seed=5)
    # extensions: one new tag and one replacing t03, for each family
    ext = [write_extension(d / "new.safetensors", "brand_new", seed=2),
           write_extension(d / "t03.safetensors", "t03", seed=3)]
    ext35 = [write_hydra35_extension(d / "new35.safetensors", "brand_new", TITLE, seed=2),
             write_hydra35_extension(d / "t03_35.safetensors", "t03", TITLE, seed=3)]
    return {"jtp3": (jtp3, ext), "hydra35": (hydra35, ext35)}


def samples(n: int) -> list[dict[str, np.ndarray]]:
    pre = JTP3Preprocess(96)
    return [pre(noise_image(40 + 37 * i, 150 - 23 * i, seed=i)) for i in range(n)]


def load(family: str, path: str, dtype: torch.dtype, extensions=()):
    if family == "jtp3":
        return load_jtp3(path, dtype=dtype, extensions=load_extensions(list(extensions)))
    return load_hydra35(path, dtype=dtype, extensions=list(extensions))


def set_fold(model, on: bool) -> None:
    if hasattr(model, "folded_head"):
        model.fold = on
    else:
        model.head.fold = on


def folded_tensor(model):
    return model.folded_head() if hasattr(model, "folded_head") else model.head.folded_weights()


def probs(model, batch, tags=None) -> np.ndarray:
    with torch.inference_mode():
        return model.sample_logits(batch, tags).float().sigmoid().numpy()


@pytest.mark.parametrize("family", ["jtp3", "hydra35"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("with_extensions", [False, True])
def test_folded_equals_stored_for_every_batch_size(files, family, dtype, tol, with_extensions):
    path, ext = files[family]
    model = load(family, path, dtype, ext if with_extensions else ())
    assert folded_tensor(model) is not None  # built at load
    n_tags = len(TAGS) + (1 if with_extensions else 0)
    assert len(model.labels) == n_tags
    imgs = samples(5)
    for b in (1, 2, 5):
        batches = [imgs[i:i + b] for i in range(0, len(imgs), b)]
        set_fold(model, True)
        folded = np.concatenate([probs(model, x) for x in batches])
        set_fold(model, False)
        stored = np.concatenate([probs(model, x) for x in batches])
        assert folded.shape == stored.shape == (5, n_tags)
        delta = np.abs(folded - stored)
        assert delta.max() <= tol, (b, delta.max())
        assert delta.max() > 0 or dtype == torch.float32 or family == "hydra35"  # really a different computation
    # a folded image's result is the same whatever the batch it runs in (fp32: to rounding)
    set_fold(model, True)
    alone = np.concatenate([probs(model, [s]) for s in imgs])
    together = probs(model, imgs)
    assert np.abs(alone - together).max() <= (FP32_TOL if dtype == torch.float32 else BF16_TOL)


@pytest.mark.parametrize("family", ["jtp3", "hydra35"])
def test_folding_is_really_used_and_tag_subsets_match(files, family, monkeypatch):
    """A fold built from corrupted weights changes the output (the forward does read it); subsets give the same
    numbers as the full run."""
    path, _ = files[family]
    model = load(family, path, torch.float32)
    imgs = samples(2)
    full = probs(model, imgs)
    subset = torch.tensor([7, 2, 30])
    assert np.abs(probs(model, imgs, subset) - full[:, [7, 2, 30]]).max() <= FP32_TOL
    g = folded_tensor(model)
    with torch.no_grad():
        g.mul_(3.0)  # the cache is keyed on the weights, not on G itself: it stays (and is now wrong)
    assert np.abs(probs(model, imgs) - full).max() > 1e-3


@pytest.mark.parametrize("family", ["jtp3", "hydra35"])
def test_fold_is_rebuilt_when_the_weights_change(files, family):
    """Replacing a tag's weights after load (what extensions and training do) rebuilds the fold: the folded run
    then equals the stored run of the new weights."""
    path, _ = files[family]
    model = load(family, path, torch.float32)
    before = folded_tensor(model).clone()
    if family == "jtp3":
        pool = model.head
        a = pool.cfg.attn_dim
        pool.replace_tag(4, torch.randn(pool.cfg.n_heads, 1, pool.cfg.head_dim),
                         torch.randn(1, a, 2) / a ** 0.5)
        pool.append_tags(torch.randn(pool.cfg.n_heads, 2, pool.cfg.head_dim), torch.randn(2, a, 2) / a ** 0.5)
    else:
        with torch.no_grad():
            model.net.head.weight[4] += 0.5  # an in-place edit, not through replace_tag: the stamp notices it
    imgs = samples(2)
    folded = probs(model, imgs)
    after = folded_tensor(model)
    assert after.shape[0] == (len(TAGS) + 2 if family == "jtp3" else len(TAGS))  # the pool's own tag count
    assert not torch.equal(after[4], before[4])
    set_fold(model, False)
    assert np.abs(folded - probs(model, imgs)).max() <= FP32_TOL


@pytest.mark.parametrize("family", ["jtp3", "hydra35"])
def test_off_switch_and_state_dict(files, family, monkeypatch):
    path, _ = files[family]
    monkeypatch.setenv(head_module.NO_FOLD_ENV, "1")
    off = load(family, path, torch.float32)
    assert folded_tensor(off) is None
    monkeypatch.setenv(head_module.NO_FOLD_ENV, "0")
    on = load(family, path, torch.float32)
    assert folded_tensor(on) is not None
    # derived state only: the state dict (saving, training, the strict key match) is the file's
    assert set(on.net.state_dict()) == set(off.net.state_dict())
    assert all(torch.equal(on.net.state_dict()[k], v) for k, v in off.net.state_dict().items())
    imgs = samples(3)
    assert np.abs(probs(on, imgs) - probs(off, imgs)).max() <= FP32_TOL


def test_training_heads_run_unfolded(files):
    """JTP-3's trainable one-tag head is a HydraPool: it must keep `fold` off, so gradients reach out_proj."""
    from hydra.train.heads import make_train_head

    model = load("jtp3", files["jtp3"][0], torch.float32)
    head = make_train_head(model.head, init_index=3)
    assert head.fold is False and head.folded_weights() is None
    x = torch.randn(2, 9, model.head.cfg.input_dim)
    head(x).sum().backward()
    assert head.out_proj.weight.grad is not None and head.out_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["jtp3", "hydra35"])
def test_folded_head_is_differentiable_wrt_features(files, family):
    """The CAM backpropagates to the features outside inference mode: the fold (built at load) must allow it."""
    model = load(family, files[family][0], torch.float32)
    x = torch.randn(1, 9, model.net.embed_dim, requires_grad=True)
    model.head_logits(x, None, torch.tensor([5]))[0, 0].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bf16_fold_matmul_rounds_like_float32():
    """On CPU the bf16 fold is a bf16 matmul (float32 accumulation, one rounding): it must equal the float32
    product cast to bf16 up to one bf16 ulp (the summation order differs), almost always exactly."""
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(64, 512, generator=g) / 20).bfloat16()
    b = (torch.randn(512, 300, generator=g) / 20).bfloat16()
    fast = head_module.fold_matmul(a, b, torch.bfloat16)
    exact = (a.float() @ b.float()).bfloat16()
    ulp = exact.float().abs() * 2.0 ** -7
    assert ((fast.float() - exact.float()).abs() <= ulp + 1e-30).all()
    assert (fast == exact).float().mean() > 0.99
