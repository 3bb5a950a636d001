"""A selection of no model tag (a calibration naming none of the model's tags, `-x` of every category) gives empty
captions and one warning on stderr, for every family, through inference.py and through the Python API; the model
forwards accept an empty tag index (issue 15 item 6: it crashed every image with "torch.cat(): expected a
non-empty list of Tensors").

    venv/bin/python -m pytest tests/test_empty_selection.py -q
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, noise_image

from hydra.tagger import Tagger
from hydra.testing.dinov3 import write_dinov3_checkpoint, write_vocab
from hydra.testing.hydra35 import write_hydra35_model
from hydra.testing.jtp3 import write_model

TAGS = [f"tag_{i:02d}" for i in range(12)]
CATEGORY = {t: (0 if i % 2 else 5) for i, t in enumerate(TAGS)}  # e621 ids: general / species
WARNING = "leave none of the model's tags selectable"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("empty")
    (d / "jtp3").mkdir()
    (d / "dinov3").mkdir()
    jtp3 = write_model(d / "jtp3" / "model.safetensors", TAGS)
    meta = d / "jtp3" / "tags.csv"
    meta.write_text("tag,category,implications\n" + "".join(f"{t},{c},\n" for t, c in CATEGORY.items()))
    hydra35 = write_hydra35_model(d / "hydra35.safetensors", TAGS,
                                  categories=["general" if c == 0 else "species" for c in CATEGORY.values()])
    dinov3 = d / "dinov3" / "model.safetensors"
    write_dinov3_checkpoint(dinov3, TAGS)
    write_vocab(d / "dinov3" / "tagger_vocab.json", TAGS, CATEGORY)
    calibration = d / "calibration.csv"
    calibration.write_text("tag,threshold\nnot_a_tag_of_the_model,0.5\n")
    return {"jtp3": (jtp3, ["-m", str(meta)]), "hydra35": (str(hydra35), []), "dinov3": (str(dinov3), [])}, calibration


def images(folder):
    folder.mkdir()
    noise_image(120, 80, 1).save(folder / "a.png")
    noise_image(64, 200, 2).save(folder / "b.jpg")
    return folder


@pytest.mark.parametrize("family", ["jtp3", "hydra35", "dinov3"])
@pytest.mark.parametrize("selection", ["calibration", "exclude every category"])
def test_cli_gives_empty_captions_and_one_warning(models, family, selection, tmp_path):
    files, calibration = models
    model, extra = files[family]
    if selection == "calibration":
        extra = [*extra, "-t", str(calibration)]
    else:
        extra = [*extra, "-x", "general", "-x", "species"]
    folder = images(tmp_path / "imgs")
    proc = subprocess.run([sys.executable, str(ROOT / "inference.py"), "-M", model, "-E", "-w", "0", *extra,
                           str(folder)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "torch.cat" not in proc.stderr
    assert proc.stderr.count(WARNING) == 1, proc.stderr
    assert (folder / "a.txt").read_text() == "" and (folder / "b.txt").read_text() == ""
    assert "Tagged 2 images, 0 failed" in proc.stderr, proc.stderr


@pytest.mark.parametrize("family", ["jtp3", "hydra35", "dinov3"])
def test_python_api_empty_selection(models, family, capfd):
    model, _ = models[0][family]
    tagger = Tagger(model, device="cpu", dtype="fp32")
    batch = [tagger.preprocess(noise_image(100, 70, 3)), tagger.preprocess(noise_image(50, 90, 4))]
    capfd.readouterr()
    none = np.zeros(len(tagger.labels), dtype=bool)
    for _ in range(2):
        probs = tagger.predict_samples(batch, none)
        assert probs.shape == (2, len(TAGS)) and probs.dtype == np.float32 and np.isnan(probs).all()
    assert capfd.readouterr().err.count(WARNING) == 1
    # a selection of some tags still runs (and warns nothing)
    some = none.copy()
    some[[1, 4]] = True
    probs = tagger.predict_samples(batch, some)
    assert np.isfinite(probs[:, [1, 4]]).all() and np.isnan(np.delete(probs, [1, 4], axis=1)).all()
    assert WARNING not in capfd.readouterr().err
    # the forward itself takes an empty index: (B, 0) logits, no error
    with torch.inference_mode():
        logits = tagger.model.sample_logits(batch, torch.zeros(0, dtype=torch.long))
    assert tuple(logits.shape) == (2, 0)
