"""Safe fetching of an image URL given by a user (web UI, HTTP API, DINOv3 URL inputs).

A URL typed into a server is untrusted input, so the fetch is fenced in:
- only `http` and `https` (no `file:`, `ftp:`, `data:` ...), checked again on every redirect, which is
  followed by hand (at most `max_redirects`), so a redirect to another scheme is refused instead of obeyed;
- the host name is resolved once per hop and every address it resolves to is checked: loopback, private
  (RFC 1918, unique-local, CGNAT, reserved, documentation ...), link-local, multicast, unspecified and this
  machine's own addresses are refused unless `allow_private` (a trusted LAN); IPv4 written in any form the
  resolver accepts (`127.1`, `0x7f.1`, `2130706433`) is checked as the address it names, and IPv6 forms that
  carry an IPv4 address (`::ffff:127.0.0.1`, 6to4, NAT64) are checked for that address too;
- the connection goes to the checked address itself (urllib3 with the address as the pool's host), with the
  URL's name in the `Host` header, the TLS SNI and the certificate check, so a name that resolves to a public
  address for the check and to 127.0.0.1 a moment later (DNS rebinding) cannot slip through;
- one deadline for the whole fetch, checked between reads (a slow-drip server cannot hold a request open
  forever; a single stalled read waits at most the remaining time at connection, so the worst case is
  under twice `timeout`);
- a size cap enforced from the `Content-Length` header *and* while streaming (the header may lie or be
  absent), so a huge body is never held in memory; the body is taken as sent (no decompression).

The connection is direct: proxy environment variables are not used (a proxy would resolve the name itself,
past the address check).

Every failure raises `FetchError` with a one-line reason. The reason is detailed (it names the status, the
refused address, the timeout): right for a local user (the CLI), but a server must not show it to a remote
client, whose error messages would then tell open ports from closed ones; `hydra/web/service.py` shows one
generic text and logs the reason.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
import urllib.parse

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import LocationParseError, NewConnectionError, SSLError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

ALLOWED_SCHEMES = ("http", "https")
REDIRECT_CODES = (301, 302, 303, 307, 308)
DEFAULT_TIMEOUT = 10.0               # seconds for the whole fetch, redirects included (the original used 10)
DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # the body cap
USER_AGENT = "jtp3-hydra/1.0 (+https://huggingface.co/RedRocket/JTP-3)"
_CHUNK = 1 << 16
# IPv6 prefixes that carry an IPv4 address in their last 32 bits, reached through a gateway: NAT64 (RFC 6052,
# RFC 8215). The IPv4-mapped form (::ffff:0:0/96) and 6to4 (2002::/16) are read by `ipaddress` itself.
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


class FetchError(ValueError):
    """A URL was refused or could not be fetched; str(e) is the reason (detailed: see the module docstring)."""


def check_url(url: str) -> str:
    """Return `url` stripped if it is an absolute http(s) URL with a host, else raise FetchError."""
    url = (url or "").strip()
    if not url:
        raise FetchError("no URL given")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        shown = f"'{parts.scheme}:'" if parts.scheme else "a missing scheme"
        raise FetchError(f"only http:// and https:// URLs can be fetched, not {shown}")
    try:
        host, _ = parts.hostname, parts.port  # .port raises ValueError for a bad port
    except ValueError:
        raise FetchError(f"URL {_short(url)} has an invalid port") from None
    if not host:
        raise FetchError(f"URL {_short(url)} has no host name")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise FetchError(f"URL {_short(url)} contains spaces or control characters")
    return url


def refused_reason(address: str) -> str | None:
    """Why an IP address must not be fetched from without `allow_private` (None = it is a public address).

    Args:
        address: an IPv4 or IPv6 address as `getaddrinfo` returns it (an IPv6 scope such as `%eth0` allowed).
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "unparsable"
    candidates = [ip]
    if ip.version == 6:  # the IPv4 address an IPv6 one carries first: it names the host reached
        embedded = [ip.ipv4_mapped, ip.sixtofour]
        embedded += [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) for net in _NAT64 if ip in net]
        if ip.teredo:
            embedded += list(ip.teredo)
        candidates = [e for e in embedded if e is not None] + candidates
    for c in candidates:
        for reason, hit in (("loopback", c.is_loopback), ("unspecified", c.is_unspecified),
                            ("link-local", c.is_link_local), ("multicast", c.is_multicast),
                            ("private or reserved", not c.is_global)):
            if hit:
                return reason
    if _is_own_address(ip):
        return "this server's own"
    return None


def _is_own_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True if `ip` is an address of this machine: binding a socket to it only works then (portable, and
    without listing the interfaces)."""
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((str(ip), 0))
        return True
    except OSError:
        return False


def resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, in the resolver's order, without repeats."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as e:
        raise FetchError(f"cannot resolve {host!r} ({e})") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def fetch_url(url: str, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES,
              max_redirects: int = 5, allow_private: bool = False) -> bytes:
    """Download the body of an http(s) URL.

    Args:
        url: absolute http or https URL.
        timeout: seconds for the whole download, redirects included.
        max_bytes: refuse bodies larger than this.
        max_redirects: how many redirects to follow (each target is re-checked).
        allow_private: also fetch from loopback, private, link-local and this machine's addresses.

    Returns:
        The response body.

    Raises:
        FetchError: refused scheme, URL or address, HTTP error status, network error, timeout, too many
            redirects, or a body over `max_bytes`.
    """
    deadline = time.monotonic() + timeout
    url = check_url(url)
    for _ in range(max_redirects + 1):
        location = _get(url, deadline, timeout, max_bytes, allow_private)
        if isinstance(location, bytes):
            return location
        url = check_url(urllib.parse.urljoin(url, location))
    raise FetchError(f"too many redirects (more than {max_redirects}) fetching {_short(url)}")


def _get(url: str, deadline: float, timeout: float, max_bytes: int, allow_private: bool) -> bytes | str:
    """One request, to a checked address of the URL's host: the body, or the Location of a redirect."""
    parts = urllib.parse.urlsplit(url)
    https = parts.scheme.lower() == "https"
    host, port = parts.hostname, parts.port or (443 if https else 80)
    addresses = resolve(host, port)
    if not allow_private:
        for address in addresses:
            reason = refused_reason(address)
            if reason:
                raise FetchError(f"{_short(url)} resolves to {address}, a {reason} address (refused; "
                                 "app.py --allow-private-urls allows such addresses on a trusted network)")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc.rpartition("@")[2]  # never send the URL's user:password
    headers = {"Host": host_header, "User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.5"}
    last_error: Exception | None = None
    for address in addresses:  # the first address that accepts the connection
        left = _remaining(deadline, timeout, url)
        kwargs = {"server_hostname": host, "assert_hostname": host, "ssl_context": _ssl_context()} if https else {}
        pool_class = urllib3.HTTPSConnectionPool if https else urllib3.HTTPConnectionPool
        pool = pool_class(address, port, timeout=urllib3.Timeout(connect=left, read=left), retries=False,
                          maxsize=1, **kwargs)
        try:
            response = pool.urlopen("GET", target, headers=headers, redirect=False, retries=False,
                                    preload_content=False, decode_content=False, assert_same_host=False)
        except NewConnectionError as e:
            last_error = e
            pool.close()
            continue
        except Urllib3Timeout:
            pool.close()
            raise FetchError(f"timed out after {timeout:g} s fetching {_short(url)}") from None
        except (Urllib3Error, LocationParseError, OSError, ValueError) as e:
            pool.close()
            kind = "TLS error" if isinstance(e, SSLError) else describe(e)
            raise FetchError(f"cannot fetch {_short(url)} ({kind})") from None
        try:
            if response.status in REDIRECT_CODES:
                location = response.headers.get("Location")
                if not location:
                    raise FetchError(f"{_short(url)} redirected (HTTP {response.status}) without a Location")
                return location
            if response.status >= 300:
                raise FetchError(f"{_short(url)} answered HTTP {response.status} {response.reason or ''}".rstrip())
            return _read_capped(response, url, deadline, timeout, max_bytes)
        finally:
            response.release_conn()
            response.close()
            pool.close()
    raise FetchError(f"cannot fetch {_short(url)} ({describe(last_error) if last_error else 'no address'})")


def _ssl_context() -> ssl.SSLContext:
    """The system's trusted certificates (as urllib used), hostname checked by urllib3 against the URL's name."""
    return ssl.create_default_context()


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
    except (Urllib3Timeout, TimeoutError):
        raise FetchError(f"timed out after {timeout:g} s fetching {_short(url)}") from None
    except (Urllib3Error, OSError) as e:
        raise FetchError(f"connection lost fetching {_short(url)} ({describe(e)})") from None
    return b"".join(chunks)


def describe(e: BaseException) -> str:
    """A short reason for a network error (urllib3 wraps the OS error; its text repeats the pool's repr)."""
    inner = e
    while isinstance(inner, Urllib3Error) and inner.__context__ is not None:
        inner = inner.__context__
    if isinstance(inner, OSError) and inner.strerror:
        return inner.strerror
    return type(inner).__name__


def _remaining(deadline: float, timeout: float, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError(f"timed out after {timeout:g} s fetching {_short(url)}")
    return left


def _short(url: str, limit: int = 120) -> str:
    return repr(url if len(url) <= limit else url[:limit] + "...")
