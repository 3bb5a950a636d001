"""First-use downloads (never touching the network): the file appears only after its checksum matches.

    venv/bin/python -m pytest tests/test_hub.py -q
"""

from __future__ import annotations

import hashlib

import huggingface_hub
import pytest

from hydra.hub import DownloadError, ensure_file

PAYLOAD = b"pretend weights"
SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []

    def download(repo_id, filename, local_dir):
        calls.append((repo_id, filename))
        path = f"{local_dir}/{filename}"
        import os

        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(calls_payload[0])
        return path

    calls_payload = [PAYLOAD]
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda url, **kw: None)  # the Hub is reachable
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls, calls_payload


def test_downloads_verifies_and_places_the_file(tmp_path, fake_hub):
    calls, _ = fake_hub
    dest = tmp_path / "models" / "m.safetensors"
    assert ensure_file(dest, "models/m.safetensors", sha256=SHA, size=len(PAYLOAD), what="model") == dest
    assert dest.read_bytes() == PAYLOAD and calls == [("RedRocket/JTP-3", "models/m.safetensors")]
    ensure_file(dest, "models/m.safetensors", sha256=SHA, size=len(PAYLOAD), what="model")
    assert len(calls) == 1  # present: not fetched again
    assert [p.name for p in dest.parent.iterdir()] == ["m.safetensors"]  # no temporary debris


def test_checksum_mismatch_discards_the_download(tmp_path, fake_hub):
    _, payload = fake_hub
    payload[0] = b"tampered weights"
    dest = tmp_path / "m.safetensors"
    with pytest.raises(DownloadError, match="does not match the published checksum"):
        ensure_file(dest, "m.safetensors", sha256=SHA, size=len(PAYLOAD) + 1, what="model")
    assert list(tmp_path.iterdir()) == []


def test_offline_gives_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match=r"HF_HUB_OFFLINE is set\. Download x\.csv from https://huggingface"):
        ensure_file(tmp_path / "x.csv", "x.csv", sha256=SHA, size=1, what="tag metadata")


def test_network_failure_is_one_message(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", boom)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda url, **kw: None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(DownloadError, match=r"Could not download the model \(Name or service not known\)"):
        ensure_file(tmp_path / "m", "m", sha256=SHA, size=1, what="model")


def test_an_unreachable_hub_fails_at_once_without_retries(tmp_path):
    """A refused endpoint (nothing listens on port 9), HF_HUB_OFFLINE unset: one metadata request, no
    retry lines, one message, nothing left behind (huggingface_hub alone retries for ~25 s)."""
    import os
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    code = ("import sys\nfrom hydra.hub import DownloadError, ensure_file\n"
            "try:\n    ensure_file(sys.argv[1], 'data/x.csv', sha256='0' * 64, size=1, what='tag metadata')\n"
            "except DownloadError as e:\n    print(e, file=sys.stderr)\n    sys.exit(2)\n")
    dest = tmp_path / "data" / "x.csv"
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-c", code, str(dest)], capture_output=True, text=True, env=env,
                         stdin=subprocess.DEVNULL, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    elapsed = time.monotonic() - start
    assert run.returncode == 2, run.stderr
    assert "Retry" not in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert "tag metadata" in run.stderr and "http://127.0.0.1:9 cannot be reached" in run.stderr
    assert "Download data/x.csv from https://huggingface.co/RedRocket/JTP-3 yourself" in run.stderr
    assert elapsed < 20  # generous: the retries alone take 23 s
    assert not dest.exists() and not (tmp_path / "data").exists()


# -- `-M` names: published models are fetched from their own repos -----------------------------------------


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A scratch project folder, with Hydra 3.5's published file checked against the fake payload."""
    import dataclasses

    from hydra.models import get, resources

    monkeypatch.setattr(resources, "ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    family = type(get("hydra35"))
    monkeypatch.setattr(family, "model_file", dataclasses.replace(family.model_file, sha256=(SHA,),
                                                                  size=(len(PAYLOAD),)))
    return tmp_path


def test_the_published_hydra35_file_is_the_one_redrocket_publishes():
    from hydra.models import get

    published = get("hydra35").model_file
    assert (published.repo_id, published.repo_file, published.path) == (
        "RedRocket/Hydra", "models/hydra-3.5.safetensors", "models/hydra-3.5.safetensors")
    assert published.size == (1_064_526_448,)
    assert published.sha256 == ("5e9337c21019c51f2bb5b33d053ea3e2c0412e5ca972b5ea3c4c21e6987452ca",)


@pytest.mark.parametrize("name", ["hydra-3.5", "Hydra-3.5", "models/hydra-3.5.safetensors"])
def test_a_short_name_or_the_project_path_downloads_hydra35(project, fake_hub, name):
    from hydra.models.resources import resolve_model

    calls, _ = fake_hub
    path = resolve_model(name)
    assert (project / path).read_bytes() == PAYLOAD
    assert calls == [("RedRocket/Hydra", "models/hydra-3.5.safetensors")]
    assert resolve_model("hydra-3.5") == path and len(calls) == 1  # present: not fetched again


def test_a_file_the_user_has_wins_over_a_short_name(project, fake_hub):
    from hydra.models.resources import resolve_model

    (project / "hydra-3.5").write_bytes(b"mine")
    assert resolve_model("hydra-3.5") == "hydra-3.5" and fake_hub[0] == []


def test_an_unknown_model_name_lists_the_published_ones(project, fake_hub):
    from hydra.models.resources import resolve_model

    with pytest.raises(FileNotFoundError, match=r"model file 'hydra-4' does not exist \(published models.*hydra-3\.5"):
        resolve_model("hydra-4")
    assert fake_hub[0] == []
