"""The model-family interface: detection, declarations, and a made-up third family registered from this file
alone that tags a folder through inference.py, the web API and the REPL without any product code knowing it.

The fake family ("colour-mean") is a file format of its own: a safetensors file whose metadata names the
architecture `test+colour-mean` and its labels, with a (T, 3) weight and (T,) bias; an image's logits are
weight @ (mean RGB in [0, 1]) + bias. Its preprocessor is a picklable dataclass defined here, so the loader
workers (spawned processes) import this module to run it.

Run: venv/bin/python -m pytest tests/test_families.py -q
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import app
import inference
from hydra import cli, models
from hydra.bulk import interactive
from hydra.images.decode import open_image
from hydra.models.checkpoint import CheckpointError, read_metadata
from hydra.models.dinov3 import DINOV3
from hydra.models.family import MAX_SIZE, SEQLEN, Family, ModelOptions
from hydra.models.hydra35 import HYDRA35
from hydra.models.jtp3 import JTP3
from hydra.tagger import Tagger
from hydra.testing.dinov3 import write_dinov3_checkpoint
from hydra.testing.hydra35 import write_hydra35_model
from hydra.testing.jtp3 import write_model

ARCH = "test+colour-mean"
LABELS = ["red", "green", "blue", "bright", "dark"]
# logit = W @ mean_rgb + b: each colour tag fires for its channel, bright/dark for the mean brightness
W = torch.tensor([[8.0, -4, -4], [-4, 8, -4], [-4, -4, 8], [4, 4, 4], [-4, -4, -4]])
B = torch.tensor([-2.0, -2, -2, -6, 4])


@dataclass(frozen=True)
class ColourPreprocess:
    """The made-up family's preprocessing: the image's mean RGB in [0, 1] (picklable, torch-free)."""

    max_size: int = 64
    max_pixels: int | None = None

    def __call__(self, source) -> dict[str, np.ndarray]:
        img = open_image(source, self.max_pixels).convert("RGB")
        img.thumbnail((self.max_size, self.max_size))
        return {"rgb": np.asarray(img, np.float32).reshape(-1, 3).mean(0) / 255}

    @staticmethod
    def tokens(sample: dict[str, np.ndarray]) -> int:
        return 1


@dataclass
class ColourModel:
    w: torch.Tensor
    b: torch.Tensor
    labels: list[str]
    path: str
    title: str | None = "colour-mean test model"
    extensions: tuple = ()
    tag_metadata = None
    cam_depth = None
    validation = None
    info = ("A made-up architecture, registered by tests/test_families.py",)

    def sample_logits(self, samples, tags=None, pad_to=None) -> torch.Tensor:
        x = torch.from_numpy(np.stack([s["rgb"] for s in samples]))  # (B, 3)
        logits = x @ self.w.T + self.b  # (B, T)
        return logits if tags is None else logits[:, tags.cpu()]


class ColourFamily(Family):
    name = "colour-mean"
    title = "Colour-mean test model"
    files = f"modelspec.architecture {ARCH!r}"
    size = MAX_SIZE
    default_topk = 2  # uncalibrated: the two best by default

    def recognises_metadata(self, metadata) -> bool:
        return metadata.get("modelspec.architecture") == ARCH

    def load(self, path, options: ModelOptions, device, dtype) -> ColourModel:
        from safetensors.torch import load_file

        tensors, meta = load_file(path), read_metadata(path)
        return ColourModel(tensors["w"], tensors["b"], meta["classifier.labels"].split("\n"), path)

    def preprocessor(self, model, size, options: ModelOptions) -> ColourPreprocess:
        return ColourPreprocess(size, options.max_pixels)


COLOUR = ColourFamily()


@pytest.fixture
def colour_family():
    models.register(COLOUR)
    try:
        yield COLOUR
    finally:
        models.unregister(COLOUR.name)


def write_colour_model(path: Path) -> Path:
    save_file({"w": W.contiguous(), "b": B.contiguous()}, str(path),
              metadata={"modelspec.architecture": ARCH, "classifier.labels": "\n".join(LABELS)})
    return path


COLOURS = {"red": (230, 20, 20), "green": (20, 220, 30), "blue": (10, 30, 240), "white": (250, 250, 250)}


@pytest.fixture
def colour_folder(tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (40, 30), rgb).save(folder / f"{name}.png")
    return folder


def expected_top2(rgb) -> list[str]:
    p = torch.sigmoid(W @ (torch.tensor(rgb, dtype=torch.float32) / 255) + B)
    return [LABELS[i] for i in torch.argsort(-p, stable=True)[:2].tolist()]


# ---------------------------------------------------------------------------------------------------------
# The built-in families


def test_detection_reads_metadata_then_key_names(tmp_path):
    assert models.detect(write_model(tmp_path / "j.safetensors", ["a", "b"])) is JTP3
    assert models.detect(write_hydra35_model(tmp_path / "h.safetensors", ["a", "b"])) is HYDRA35
    write_dinov3_checkpoint(tmp_path / "d.safetensors", ["a", "b"])
    assert models.detect(tmp_path / "d.safetensors") is DINOV3
    (tmp_path / "d.pt").write_bytes(b"")  # torch state dicts are known by their suffix
    assert models.detect(tmp_path / "d.pt") is DINOV3
    # a JTP-3 file without metadata is still recognised from its head's tensor names
    from safetensors.torch import load_file

    bare = tmp_path / "bare.safetensors"
    save_file(load_file(tmp_path / "j.safetensors"), str(bare))
    assert models.detect(bare) is JTP3


def test_unknown_files_are_one_clear_error(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"),
              metadata={"modelspec.architecture": "something+else"})
    with pytest.raises(CheckpointError, match=r"unsupported architecture 'something\+else'; this toolkit runs"):
        models.detect(tmp_path / "other.safetensors")
    save_file({"weird.key": torch.zeros(2)}, str(tmp_path / "keys.safetensors"))
    with pytest.raises(CheckpointError, match=r"no model this toolkit knows \(tensors such as 'weird.key'\).*JTP-3"):
        models.detect(tmp_path / "keys.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        models.detect(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        models.detect(tmp_path / "missing.safetensors")


def test_declarations_of_the_shipped_families():
    assert (JTP3.size, HYDRA35.size, DINOV3.size) == (SEQLEN, SEQLEN, MAX_SIZE)
    assert (SEQLEN.minimum, SEQLEN.maximum, SEQLEN.default) == (64, 2048, 1024)
    assert (MAX_SIZE.minimum, MAX_SIZE.maximum, MAX_SIZE.default) == (64, 4096, 1024)
    assert (JTP3.calibration, HYDRA35.calibration, DINOV3.calibration) == ("csv", "embedded", "none")
    assert (JTP3.default_topk, HYDRA35.default_topk, DINOV3.default_topk) == (None, None, 30)
    assert JTP3.rename(False)("spread_vulva") == "spread_pussy" and JTP3.rename(True)("vulva") == "vulva"
    assert HYDRA35.rename(False)("vulva") == "vulva" and DINOV3.rename(False)("vulva") == "vulva"
    assert len(HYDRA35.implication_modes) == 10 and len(JTP3.implication_modes) == 5
    with pytest.raises(ValueError, match="Sequence length must be between 64 and 2048"):
        SEQLEN.check(32)
    with pytest.raises(ValueError, match="take no extensions"):
        DINOV3.read_extensions(["x.safetensors"])


def test_tagger_has_one_size_setting(tiny_model):
    tagger = Tagger(tiny_model, device="cpu", dtype="fp32", seqlen=128)
    assert tagger.size == 128 and tagger.preprocess.seqlen == 128
    tagger.size = 256
    assert tagger.preprocess.seqlen == 256 and tagger.preprocessor(64).seqlen == 64
    assert not hasattr(tagger, "seqlen") and not hasattr(tagger, "max_size")
    with pytest.raises(ValueError, match="between 64 and 2048"):
        tagger.size = 4096
    spec = tagger.spec  # picklable: what Ray actors and caches receive
    import pickle

    again = pickle.loads(pickle.dumps(spec)).load()
    assert again.labels == tagger.labels and again.size == 256


# ---------------------------------------------------------------------------------------------------------
# A made-up third family, registered from this file only


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_new_family_captions_a_folder_through_inference_py(colour_family, colour_folder, tmp_path, workers,
                                                            capsys):
    model = write_colour_model(tmp_path / "colour.safetensors")
    args = inference.build_parser().parse_args(["-M", str(model), "-w", workers, "--max-size", "64",
                                                str(colour_folder)])
    assert inference.main(args) == 0
    err = capsys.readouterr().err
    assert "5 tags" in err and "Tagged 4 images, 0 failed." in err
    for name, rgb in COLOURS.items():
        caption = (colour_folder / f"{name}.txt").read_text(encoding="utf-8")
        assert caption == ", ".join(expected_top2(rgb)), name  # the family's default: the top 2


def test_a_new_family_through_the_web_api_and_the_repl(colour_family, colour_folder, tmp_path):
    model = write_colour_model(tmp_path / "colour.safetensors")
    web = app.make_web(app.build_parser().parse_args(["-M", str(model)]))
    try:
        health = web.health()
        assert health["family"] == "colour-mean" and health["tags"] == 5 and health["max_size"] == 1024
        assert health["cam"] is False and health["title"] == "colour-mean test model"
        data = (colour_folder / "blue.png").read_bytes()
        out = web.tag_request({}, data)
        assert [t["tag"] for t in out["tags"]] == expected_top2(COLOURS["blue"])
        assert out["caption"] == ", ".join(expected_top2(COLOURS["blue"]))
        everything = web.tag_request({"threshold": "-1"}, data)
        assert len(everything["tags"]) == 5
    finally:
        web.close()

    tagger, settings = cli.load_run(argparse.Namespace(model=str(model), device="cpu", dtype="fp32"))
    stdin = io.StringIO(f"h\nmax_size 8\nmax_size 16\n{colour_folder / 'red.png'}\nq\n")
    stdout = io.StringIO()
    interactive.run(tagger, settings, stdin, stdout)
    out = stdout.getvalue()
    assert out.startswith("Colour-mean test model Interactive Classifier")
    assert "max_size PX (64 to 4096, 1024 recommended)" in out
    assert "Max size must be between 64 and 4096." in out
    shown = [line.split("% ")[1] for line in out.splitlines() if "% " in line]
    assert shown == expected_top2(COLOURS["red"])


def test_a_new_family_reaches_calibration_and_json_output(colour_family, colour_folder, tmp_path, capsys):
    model = write_colour_model(tmp_path / "colour.safetensors")
    args = inference.build_parser().parse_args(["-M", str(model), "-w", "0", "--format", "jsonl", "-t", "0",
                                                str(colour_folder / "green.png")])
    assert inference.main(args) == 0
    item = json.loads(capsys.readouterr().out)
    p = torch.sigmoid(W @ (torch.tensor(COLOURS["green"], dtype=torch.float32) / 255) + B)
    assert {t["tag"] for t in item["tags"]} == {LABELS[i] for i in range(5) if p[i] >= 0.5}
