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
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(DownloadError, match=r"Could not download the model \(Name or service not known\)"):
        ensure_file(tmp_path / "m", "m", sha256=SHA, size=1, what="model")
