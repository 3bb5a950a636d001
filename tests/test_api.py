"""The Python API: `hydra.load(...).caption(image)` equals inference.py's caption byte for byte, `predict` checks
its arguments, and the package imports from any directory (pyproject metadata valid, without installing).

    venv/bin/python -m pytest tests/test_api.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, noise_image

import hydra


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, (w, h) in enumerate([(80, 60), (64, 96), (50, 50)]):
        path = tmp_path / f"img{i}.png"
        noise_image(w, h, seed=i).save(path)
        paths.append(path)
    return paths


def cli_captions(paths, *args):
    subprocess.run([sys.executable, str(ROOT / "inference.py"), "-w", "0", *map(str, args), *map(str, paths)],
                   check=True, capture_output=True, timeout=300)
    return [p.with_suffix(".txt").read_bytes() for p in paths]


@pytest.mark.parametrize("cli_args, options", [
    (["-t", "0.2"], {"threshold": 0.6}),
    (["-t", "-0.9", "-i", "constrain", "-x", "meta", "-p", "my trigger", "-u"],
     {"threshold": 0.05, "implications": "constrain", "exclude": ["meta"], "prefix": "my trigger",
      "underscores": True}),
    (["--topk", "5", "-a", "tag_01", "renamed", "-P"], {"topk": 5, "aliases": {"tag_01": "renamed"}, "prompt": True}),
])
def test_caption_equals_inference_py(small_model, images, tmp_path, cli_args, options):
    path, names = small_model
    meta = tmp_path / "meta.csv"  # tag_00 implies tag_01; tag_11 is meta
    meta.write_text("tag,category,implications\n" + "".join(
        f"{n},{7 if n == 'tag_11' else 0},{'tag_01' if n == 'tag_00' else ''}\n" for n in names))
    expected = cli_captions(images, "-M", path, "-m", meta, *cli_args)
    tagger = hydra.load(path, metadata=meta, device="cpu", **options)
    got = [tagger.caption(str(p)).encode("utf-8") for p in images]
    assert got == expected and any(expected)


def test_calibration_file_gives_the_cli_caption(small_model, images, tmp_path):
    path, names = small_model
    cal = tmp_path / "cal.csv"
    cal.write_text("tag,threshold,cti\n" + "".join(f"{n},{0.3 + 0.03 * i:.4f},0.5\n" for i, n in enumerate(names)))
    expected = cli_captions(images, "-M", path, "-m", "", "-t", cal)
    tagger = hydra.load(path, calibration=cal, metadata="", device="cpu")
    assert [tagger.caption(p).encode() for p in images] == expected
    tags = tagger.tags(images[0])
    assert [p for _, p in tags] == sorted((p for _, p in tags), reverse=True)


def test_load_refuses_bad_options(small_model):
    path, _ = small_model
    with pytest.raises(ValueError, match="probability from 0 to 1"):
        hydra.load(path, threshold=1.5)
    with pytest.raises(ValueError, match="not both"):
        hydra.load(path, threshold=0.5, calibration="c.csv")
    with pytest.raises(TypeError):
        hydra.load(path, bogus=1)


@pytest.mark.parametrize("bad", [-0.1, 1.01, float("nan"), "0.5"])
def test_predict_rejects_a_threshold_outside_0_to_1(small_model, bad):
    path, _ = small_model
    tagger = hydra.Tagger(path, device="cpu")
    with pytest.raises(ValueError, match="probability from 0 to 1"):
        tagger.predict(noise_image(40, 40), threshold=bad)
    with pytest.raises(ValueError, match="topk"):
        tagger.predict(noise_image(40, 40), topk=0)
    assert all(p >= 0.5 for _, p in tagger.predict(noise_image(40, 40), threshold=0.5))


def test_the_package_imports_from_another_directory(small_model, tmp_path):
    """The README's set-up (`pip install -e .`, or PYTHONPATH) makes the example work outside the project."""
    path, _ = small_model
    code = f"import hydra; t = hydra.load({str(path)!r}, threshold=0.5, device='cpu'); print(type(t).__name__)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Captioner\n"


def test_pyproject_is_a_valid_setuptools_project():
    from setuptools.config.pyprojecttoml import read_configuration

    config = read_configuration(ROOT / "pyproject.toml", expand=True)  # validates against the schema
    project = config["project"]
    assert project["name"] and project["requires-python"] == ">=3.11"
    deps = project["dependencies"]
    assert any(d.startswith("torch") for d in deps) and not any(d.startswith(("#", "-")) for d in deps)
    packages = config["tool"]["setuptools"]["packages"]  # expanded from packages.find
    assert "hydra" in packages and "hydra.models" in packages and "tests" not in packages
