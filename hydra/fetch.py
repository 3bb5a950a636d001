"""Safe fetching of an image URL given by a user (web UI, HTTP API, DINOv3 URL inputs).

A URL typed into a server is untrusted input, so the fetch is fenced in:
- only `http` and `https` (no `file:`, `ftp:`, `data:` ...), checked again on every redirect, which is
  followed by hand (at most `max_redirects`) rather than by urllib, so a redirect to another scheme is
  refused instead of obeyed;
- one deadline for the whole fetch, checked between reads (a slow-drip server cannot hold a request open
  forever; a single stalled read waits at most the remaining time at connection, so the worst case is
  under twice `timeout`);
- a size cap enforced from the `Content-Length` header *and* while streaming (the header may lie or be
  absent), so a huge body is never held in memory.

Every failure raises `FetchError` with a one-line message fit to show the user.
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.parse
import urllib.request

ALLOWED_SCHEMES = ("http", "https")
REDIRECT_CODES = (301, 302, 303, 307, 308)
DEFAULT_TIMEOUT = 10.0               # seconds for the whole fetch, redirects included (the original used 10)
DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # the body cap
USER_AGENT = "jtp3-hydra/1.0 (+https://huggingface.co/RedRocket/JTP-3)"
_CHUNK = 1 << 16


class FetchError(ValueError):
    """A URL was refused or could not be fetched; str(e) is the reason, fit for the user."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError(3xx) and `fetch_url` decides whether to follow


_OPENER = urllib.request.build_opener(_NoRedirect)


def check_url(url: str) -> str:
    """Return `url` stripped if it is an absolute http(s) URL with a host, else raise FetchError."""
    url = (url or "").strip()
    if not url:
        raise FetchError("no URL given")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        shown = f"'{parts.scheme}:'" if parts.scheme else "a missing scheme"
        raise FetchError(f"only http:// and https:// URLs can be fetched, not {shown}")
    if not parts.hostname:
        raise FetchError(f"URL {_short(url)} has no host name")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise FetchError(f"URL {_short(url)} contains spaces or control characters")
    return url


def fetch_url(url: str, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES,
              max_redirects: int = 5) -> bytes:
    """Download the body of an http(s) URL.

    Args:
        url: absolute http or https URL.
        timeout: seconds for the whole download, redirects included.
        max_bytes: refuse bodies larger than this.
        max_redirects: how many redirects to follow (each target is re-checked).

    Returns:
        The response body.

    Raises:
        FetchError: refused scheme or URL, HTTP error status, network error, timeout, too many redirects,
            or a body over `max_bytes`.
    """
    deadline = time.monotonic() + timeout
    url = check_url(url)
    for _ in range(max_redirects + 1):
        location = _get(url, deadline, timeout, max_bytes)
        if isinstance(location, bytes):
            return location
        url = check_url(urllib.parse.urljoin(url, location))
    raise FetchError(f"too many redirects (more than {max_redirects}) fetching {_short(url)}")


def _get(url: str, deadline: float, timeout: float, max_bytes: int) -> bytes | str:
    """One request: the body, or the Location of a redirect."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.5"})
    try:
        response = _OPENER.open(request, timeout=_remaining(deadline, timeout, url))
    except urllib.error.HTTPError as e:
        with e:
            if e.code in REDIRECT_CODES:
                location = e.headers.get("Location")
                if not location:
                    raise FetchError(f"{_short(url)} redirected (HTTP {e.code}) without a Location") from None
                return location
            raise FetchError(f"{_short(url)} answered HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, TimeoutError):
            raise FetchError(f"timed out after {timeout:g} s fetching {_short(url)}") from None
        raise FetchError(f"cannot fetch {_short(url)} ({reason})") from None
    except TimeoutError:
        raise FetchError(f"timed out after {timeout:g} s fetching {_short(url)}") from None
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise FetchError(f"cannot fetch {_short(url)} ({e or type(e).__name__})") from None
    with response:
        return _read_capped(response, url, deadline, timeout, max_bytes)


def _read_capped(response, url: str, deadline: float, timeout: float, max_bytes: int) -> bytes:
    length = response.headers.get("Content-Length")
    if length and length.strip().isdigit() and int(length) > max_bytes:
        raise FetchError(f"{_short(url)} is {int(length) / 2**20:.1f} MiB, over the "
                         f"{max_bytes / 2**20:.1f} MiB limit")
    chunks, size = [], 0
    try:
        while True:
            _remaining(deadline, timeout, url)
            # read1 returns what has arrived (at most _CHUNK): the deadline is checked between arrivals.
            chunk = response.read1(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise FetchError(f"{_short(url)} is larger than the {max_bytes / 2**20:.1f} MiB limit")
            chunks.append(chunk)
    except TimeoutError:
        raise FetchError(f"timed out after {timeout:g} s fetching {_short(url)}") from None
    except (OSError, http.client.HTTPException) as e:
        raise FetchError(f"connection lost fetching {_short(url)} ({e or type(e).__name__})") from None
    return b"".join(chunks)


def _remaining(deadline: float, timeout: float, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError(f"timed out after {timeout:g} s fetching {_short(url)}")
    return left


def _short(url: str, limit: int = 120) -> str:
    return repr(url if len(url) <= limit else url[:limit] + "...")
