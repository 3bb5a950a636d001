"""First-use downloads from RedRocket's Hugging Face repos (RedRocket/JTP-3, RedRocket/Hydra), checked by size
and sha256.

Only the default files are fetched (a path the user gave explicitly is never replaced). The download goes
to a hidden temporary file beside the destination and is renamed into place only after the checksum
matches, so an interrupted or corrupted download never leaves a file that looks valid.

Offline, a download fails at once with one message: `HF_HUB_OFFLINE=1` skips the network entirely, and
otherwise one metadata request without retries (huggingface_hub's `get_hf_file_metadata`) checks that the Hub
can be reached before the download starts, instead of huggingface_hub's ~25 s of retries.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from hydra.common import log

REPO_ID = "RedRocket/JTP-3"


class DownloadError(RuntimeError):
    """A needed file is missing and could not be fetched; the message says what to do."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _confirm(question: str) -> bool:
    """Ask on the terminal; without one (scripts, CI), go ahead: the user ran a command that needs the file."""
    if not sys.stdin or not sys.stdin.isatty():
        return True
    try:
        answer = input(f"{question} [Y/n] ").strip().lower()
    except EOFError:
        return False
    return answer in ("", "y", "yes")


def ensure_file(path: str | os.PathLike, repo_file: str, *, sha256: str | tuple[str, ...], size: int | tuple[int, ...],
                what: str, repo_id: str = REPO_ID) -> Path:
    """Return `path`, downloading `repo_file` from the Hub to it first if it does not exist.

    `sha256` and `size` may list several accepted versions (e.g. the same CSV with LF or CRLF endings).

    Raises:
        DownloadError: declined, offline, or the downloaded file has the wrong size or checksum.
    """
    path = Path(path)
    if path.exists():
        return path
    hashes = (sha256,) if isinstance(sha256, str) else tuple(sha256)
    sizes = (size,) if isinstance(size, int) else tuple(size)
    url = f"https://huggingface.co/{repo_id}"
    manual = f"Download {repo_file} from {url} yourself and save it as '{path}'"
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise DownloadError(f"{what} '{path}' is missing and HF_HUB_OFFLINE is set. {manual}.")
    try:
        import huggingface_hub
    except ImportError:
        raise DownloadError(f"{what} '{path}' is missing and huggingface_hub is not installed. {manual}.") from None
    _check_reachable(huggingface_hub, repo_id, repo_file, what, path, manual)
    if not _confirm(f"The {what} '{path}' is missing. Download it from {url} ({max(sizes) / 1e6:,.1f} MB)?"):
        raise DownloadError(f"{what} '{path}' is missing. {manual}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"Downloading {what} from {url} ...")
    with tempfile.TemporaryDirectory(prefix=".download-", dir=path.parent) as tmp:
        try:
            fetched = Path(huggingface_hub.hf_hub_download(repo_id, repo_file, local_dir=tmp))
        except Exception as e:  # network, auth, missing file: one message covers them
            reason = " ".join(str(e).split())[:200] or type(e).__name__
            raise DownloadError(f"Could not download the {what} ({reason}). {manual}.") from None
        got_size = fetched.stat().st_size
        if got_size not in sizes or sha256_file(fetched) not in hashes:
            raise DownloadError(f"The downloaded {what} does not match the published checksum "
                                f"({got_size:,} bytes). It was discarded. {manual}.")
        shutil.move(os.fspath(fetched), os.fspath(path))
    log(f"Saved '{path}' (sha256 verified).")
    return path


def _check_reachable(huggingface_hub, repo_id: str, repo_file: str, what: str, path: Path, manual: str) -> None:
    """One HEAD request for the file, without retries: offline (refused, unroutable, no DNS) fails here within
    the metadata timeout instead of after huggingface_hub's retries.

    Raises:
        DownloadError: the Hub cannot be reached or does not have the file.
    """
    from huggingface_hub import constants

    try:
        huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(repo_id, repo_file),
                                             timeout=constants.HF_HUB_ETAG_TIMEOUT, retry_on_errors=False)
    except Exception as e:  # connection refused or timed out, DNS, HTTP errors: one message covers them
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise DownloadError(f"{what} '{path}' is missing and {constants.ENDPOINT} cannot be reached ({reason}). "
                            f"{manual}.") from None
