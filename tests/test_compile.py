"""`-c/--compile`: torch.compile of the network's forward, for every family, falling back to eager with one
warning when compiling fails (at set-up or at a call), and not recompiling for every NaFlex length."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from conftest import noise_image

from hydra import cli
from hydra.tagger import Tagger

SIZES = [(64, 64), (200, 100), (300, 500), (640, 480), (123, 77), (1000, 300), (90, 400), (512, 512)]


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, tags) -> dict[str, tuple[str, str | None]]:
    """One tiny model file per family: name -> (checkpoint, vocabulary or None)."""
    from hydra.testing.dinov3 import write_dinov3_checkpoint, write_vocab
    from hydra.testing.hydra35 import write_hydra35_model
    from hydra.testing.jtp3 import write_model

    d = tmp_path_factory.mktemp("compile")
    names = [f"tag_{i}" for i in range(10)]
    write_dinov3_checkpoint(d / "dino.safetensors", names, seed=1)
    write_vocab(d / "tagger_vocab.json", names)
    return {"jtp3": (write_model(d / "jtp3.safetensors", tags), None),
            "hydra35": (write_hydra35_model(d / "h35.safetensors", names), None),
            "dinov3": (str(d / "dino.safetensors"), str(d / "tagger_vocab.json"))}


def _samples(tagger: Tagger, sizes=SIZES[:3]) -> list[dict]:
    return [tagger.preprocess(noise_image(w, h, seed=i)) for i, (w, h) in enumerate(sizes)]


@pytest.mark.parametrize("family", ["jtp3", "hydra35", "dinov3"])
def test_every_family_compiles_its_forward(family, family_models, monkeypatch):
    """-c hands each family's forward to torch.compile, and the compiled callable is what runs."""
    path, vocab = family_models[family]
    compiled, ran = [], []

    def fake_compile(fn, **kwargs):
        compiled.append(kwargs)

        def run(*a, **k):
            ran.append(True)
            return fn(*a, **k)
        return run

    eager = Tagger(path, vocab, device="cpu", dtype="fp32")
    monkeypatch.setattr(torch, "compile", fake_compile)
    tagger = Tagger(path, vocab, device="cpu", dtype="fp32", compile=True)
    samples = _samples(eager)
    np.testing.assert_array_equal(tagger.predict_samples(samples), eager.predict_samples(samples))
    assert len(compiled) == 1 and compiled[0]["dynamic"] is True and ran
    assert tagger.spec.compile and tagger.spec.load().compile


def _raise(*a, **k):
    raise RuntimeError("Compiler: cc not found\nmore detail")


@pytest.mark.parametrize("where", ["setup", "call"])
def test_failing_compile_warns_once_and_runs_eagerly(where, family_models, monkeypatch, capsys):
    path, _ = family_models["jtp3"]
    eager = Tagger(path, device="cpu", dtype="fp32", size=256)
    monkeypatch.setattr(torch, "compile", _raise if where == "setup" else (lambda fn, **k: _raise))
    tagger = Tagger(path, device="cpu", dtype="fp32", size=256, compile=True)
    for sizes in (SIZES[:2], SIZES[2:5], SIZES[5:6]):
        samples = _samples(eager, sizes)
        np.testing.assert_array_equal(tagger.predict_samples(samples), eager.predict_samples(samples))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "compile" in line]
    assert lines == ["warning: -c/--compile: torch.compile failed (RuntimeError: Compiler: cc not found); "
                     "running without it"]


def test_user_errors_after_a_working_compile_propagate(family_models, monkeypatch):
    """Once compiled calls work, an error that is not the compiler's (bad input) is not swallowed."""
    path, _ = family_models["jtp3"]
    monkeypatch.setattr(torch, "compile", lambda fn, **k: fn)
    tagger = Tagger(path, device="cpu", dtype="fp32", compile=True)
    tagger.predict_samples(_samples(tagger))
    bad = [dict(s, patches=s["patches"][:, :5]) for s in _samples(tagger)]
    with pytest.raises(RuntimeError):
        tagger.predict_samples(bad)


def test_compile_flag_reaches_the_tagger(family_models, monkeypatch):
    import inference

    path, _ = family_models["jtp3"]
    args = inference.build_parser().parse_args(["-c", "-M", path, "-d", "cpu", "x.png"])
    assert args.compile is True
    assert inference.build_parser().parse_args(["x.png"]).compile is False
    monkeypatch.setattr(torch, "compile", lambda fn, **k: fn)
    ns = argparse.Namespace(model=path, device="cpu", dtype="fp32", compile=True)
    assert cli.tagger_from_args(ns, path, cli.resolve_model(path)[1], ()).compile


@pytest.mark.slow
def test_real_compile_matches_eager_without_recompiling_per_length(family_models):
    """A real torch.compile (~15-30 s on CPU for the tiny model): eager's numbers, and variable NaFlex lengths
    and batch sizes reuse the dynamic graphs (a few at the start: padded, unpadded) instead of compiling per
    length."""
    from torch._dynamo.utils import counters

    path, _ = family_models["jtp3"]
    eager = Tagger(path, device="cpu", dtype="fp32", size=256)
    tagger = Tagger(path, device="cpu", dtype="fp32", size=256, compile=True)
    counters.clear()
    samples = _samples(eager, SIZES)
    lengths = set()

    def check(batch):
        lengths.update(eager.sample_tokens(s) for s in batch)
        np.testing.assert_allclose(tagger.predict_samples(batch), eager.predict_samples(batch), atol=1e-4)

    check(samples[0:2])  # padded batches: the first one compiles, the next batch size once more (measured)
    check(samples[0:3])
    check(samples[3:4])  # an unpadded single image: its own graph (no mask)
    warm = counters["frames"]["total"]
    assert warm > 0  # it really compiled
    for i in range(4, len(samples)):
        check(samples[i:i + 1])
        check(samples[i - 3:i + 1])
        check(samples[i - 2:i + 1])
    assert len(lengths) >= 7
    assert counters["frames"]["total"] == warm, "recompiled for a new sequence length or batch size"
