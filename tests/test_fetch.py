"""hydra.fetch: http(s)-only URL fetching with a deadline, a size cap, re-checked redirects and refused
private addresses.

A tiny HTTP server on 127.0.0.1 (a thread in the test process) plays every kind of misbehaving host; the
tests that use it pass `allow_private=True` (the trusted-LAN flag), the others check that loopback, private,
link-local ... addresses in every written form are refused by default. Public names are simulated: the
resolver (`socket.getaddrinfo`) is monkeypatched to answer a public address for `public.example`, and
urllib3's `create_connection` to route that address to the local server, recording where it was asked to
connect. No internet. Run: venv/bin/python -m pytest tests/test_fetch.py -q
"""

from __future__ import annotations

import functools
import http.server
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse

import pytest
import urllib3.util.connection

import hydra.fetch
from hydra.fetch import FetchError, check_url, refused_reason

fetch_url = functools.partial(hydra.fetch.fetch_url, allow_private=True)  # the local test server is loopback
PUBLIC_IP = "93.184.215.14"  # a public address (not this machine's), never really contacted

BODY = b"\x89PNG fake image body" * 10


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None, length: bool = True):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        path = self.path
        self.server.seen.append((path, self.headers.get("Host")))
        if path.startswith("/to?"):  # redirect to the URL in the query
            self._send(302, headers={"Location": urllib.parse.unquote(path[4:])})
        elif path == "/image.png":
            self._send(200, BODY, {"Content-Type": "image/png"})
        elif path == "/redirect":
            self._send(302, headers={"Location": "/image.png"})
        elif path == "/redirect-chain":
            self._send(301, headers={"Location": "/redirect"})
        elif path == "/redirect-file":
            self._send(302, headers={"Location": "file:///etc/passwd"})
        elif path == "/redirect-ftp":
            self._send(307, headers={"Location": "ftp://example.com/x.png"})
        elif path == "/loop":
            self._send(302, headers={"Location": "/loop"})
        elif path == "/no-location":
            self._send(302)
        elif path == "/big-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(10 * 1024 * 1024))
            self.end_headers()
            self.wfile.write(b"x" * 1024)
        elif path == "/big-undeclared":
            self._send(200, b"y" * 300_000, length=False)  # no Content-Length: the cap must bite while reading
        elif path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(100):  # drip one byte every 50 ms: each read is quick, the whole is slow
                self.wfile.write(b"z")
                self.wfile.flush()
                time.sleep(0.05)
        elif path == "/hang":
            time.sleep(3)
            self._send(200, BODY)
        else:
            self._send(404, b"not found")


class QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # clients hanging up early is the point of some tests
        pass


class Server:
    seen: list = []  # (path, Host header) of every request the local server received


@pytest.fixture(scope="module")
def server():
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    httpd.seen = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    Server.seen = httpd.seen
    yield base
    httpd.shutdown()
    httpd.server_close()


def test_fetches_a_body(server):
    assert fetch_url(server + "/image.png") == BODY


def test_follows_relative_redirects(server):
    assert fetch_url(server + "/redirect-chain") == BODY


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.png", "data:image/png;base64,AAAA",
                                 "javascript:alert(1)", "example.com/a.png", "/etc/passwd", "", "   ",
                                 "http://", "http:///path-only"])
def test_refuses_other_schemes_and_malformed_urls(url):
    with pytest.raises(FetchError):
        check_url(url)
    with pytest.raises(FetchError):
        fetch_url(url)


def test_scheme_check_is_case_insensitive_and_strips_spaces():
    assert check_url("  HTTPS://Example.com/x.png ") == "HTTPS://Example.com/x.png"


@pytest.mark.parametrize("path", ["/redirect-file", "/redirect-ftp"])
def test_refuses_redirects_to_other_schemes(server, path):
    with pytest.raises(FetchError, match="only http"):
        fetch_url(server + path)


def test_redirect_loop_and_missing_location(server):
    with pytest.raises(FetchError, match="too many redirects"):
        fetch_url(server + "/loop", max_redirects=3)
    with pytest.raises(FetchError, match="without a Location"):
        fetch_url(server + "/no-location")


def test_http_errors_are_reported(server):
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_url(server + "/missing.png")


def test_size_cap_from_header_and_while_streaming(server):
    with pytest.raises(FetchError, match="limit"):
        fetch_url(server + "/big-declared", max_bytes=1024 * 1024)
    with pytest.raises(FetchError, match="limit"):
        fetch_url(server + "/big-undeclared", max_bytes=100_000)
    assert len(fetch_url(server + "/big-undeclared", max_bytes=400_000)) == 300_000


def test_total_deadline_covers_slow_drip_and_hung_servers(server):
    start = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        fetch_url(server + "/slow", timeout=0.5)
    with pytest.raises(FetchError, match="timed out"):
        fetch_url(server + "/hang", timeout=0.5)
    assert time.monotonic() - start < 3.0


def test_connection_refused_is_a_fetch_error():
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FetchError, match="cannot fetch"):
        fetch_url(f"http://127.0.0.1:{port}/x.png", timeout=2)


# -- refused addresses ------------------------------------------------------------------------------------


@pytest.fixture
def no_connections(monkeypatch):
    """Fail the test if anything tries to connect."""
    def connect(address, *args, **kwargs):
        raise AssertionError(f"connected to {address}")

    monkeypatch.setattr(urllib3.util.connection, "create_connection", connect)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/", "http://127.1/", "http://0x7f.1/", "http://0x7f000001/", "http://2130706433/",
    "http://0177.0.0.1/", "http://127.255.255.254:8080/x.png", "http://localhost/", "http://LOCALHOST/",
    "http://[::1]/", "http://[0:0:0:0:0:0:0:1]/", "http://[::ffff:127.0.0.1]/", "http://[::ffff:7f00:1]/",
    "http://0.0.0.0/", "http://0/", "http://[::]/", "http://169.254.169.254/latest/meta-data/",
    "http://[fe80::1]/", "http://10.0.0.1/", "http://172.16.5.4/", "http://192.168.1.1/", "http://100.64.0.1/",
    "http://[fc00::1]/", "http://[fd12:3456::1]/", "http://224.0.0.1/", "http://[ff02::1]/",
    "http://255.255.255.255/", "http://192.0.2.1/", "http://[2002:7f00:1::1]/", "http://[64:ff9b::7f00:1]/",
    "http://[::ffff:10.0.0.1]/", "https://127.0.0.1:443/", "http://user:pw@127.0.0.1/",
])
def test_private_addresses_are_refused_in_every_form(url, no_connections):
    with pytest.raises(FetchError, match="refused"):
        hydra.fetch.fetch_url(url, timeout=2)


@pytest.mark.parametrize("address, reason", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"), ("0.0.0.0", "unspecified"),
    ("::", "unspecified"), ("169.254.1.1", "link-local"), ("fe80::1%1", "link-local"), ("224.0.0.251", "multicast"),
    ("ff02::fb", "multicast"), ("10.1.2.3", "private"), ("fc00::1", "private"), ("2002:a00:1::", "private"),
])
def test_refused_reasons(address, reason):
    assert reason in refused_reason(address)


def test_public_addresses_pass_and_own_addresses_are_refused(monkeypatch):
    for address in (PUBLIC_IP, "8.8.8.8", "2606:4700:4700::1111", "2002:5db8:d70e::1"):
        assert refused_reason(address) is None, address
    # this machine's addresses: found by binding a socket to them (loopback is one, a public one is not)
    assert hydra.fetch._is_own_address(hydra.fetch.ipaddress.ip_address("127.0.0.1"))
    assert not hydra.fetch._is_own_address(hydra.fetch.ipaddress.ip_address(PUBLIC_IP))
    monkeypatch.setattr(hydra.fetch, "_is_own_address", lambda ip: str(ip) == PUBLIC_IP)  # a server on it
    assert refused_reason(PUBLIC_IP) == "this server's own"


@pytest.fixture
def public_dns(monkeypatch, server):
    """`public.example` resolves to PUBLIC_IP (and `lan.example` to 10.0.0.5); connections to PUBLIC_IP:80
    reach the local server. Returns the list of addresses connections were asked for."""
    port = int(server.rsplit(":", 1)[1])
    real_getaddrinfo, real_connect = socket.getaddrinfo, urllib3.util.connection.create_connection
    fake = {"public.example": PUBLIC_IP, "lan.example": "10.0.0.5"}
    connections = []

    def getaddrinfo(host, port_, *args, **kwargs):
        if host in fake:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (fake[host], port_))]
        return real_getaddrinfo(host, port_, *args, **kwargs)

    def connect(address, *args, **kwargs):
        connections.append(address)
        if address[0] == PUBLIC_IP:
            address = ("127.0.0.1", port)
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(urllib3.util.connection, "create_connection", connect)
    Server.seen.clear()
    return connections, fake


def test_public_name_is_fetched_with_its_host_header(public_dns):
    connections, _ = public_dns
    assert hydra.fetch.fetch_url("http://public.example/image.png") == BODY
    assert connections == [(PUBLIC_IP, 80)]
    assert Server.seen == [("/image.png", "public.example")]


@pytest.mark.parametrize("target", ["http://127.0.0.1:{port}/secret", "http://localhost:{port}/secret",
                                    "http://[::1]:{port}/secret", "http://0x7f.1:{port}/secret",
                                    "http://lan.example/secret", "http://[::ffff:127.0.0.1]:{port}/secret"])
def test_redirect_from_a_public_name_to_a_private_address_is_refused(public_dns, server, target):
    connections, _ = public_dns
    target = target.format(port=server.rsplit(":", 1)[1])
    with pytest.raises(FetchError, match="refused"):
        hydra.fetch.fetch_url(f"http://public.example/to?{target}")
    assert connections == [(PUBLIC_IP, 80)]  # the first hop only
    assert not any("secret" in path for path, _ in Server.seen[1:]) and len(Server.seen) == 1


def test_dns_rebinding_connects_to_the_checked_address(public_dns):
    """The name answers a public address for the check, then 127.0.0.1: the connection still goes to the
    checked address (the name is resolved once per hop, and the pool connects to the address)."""
    connections, fake = public_dns
    real = socket.getaddrinfo
    calls = []

    def rebinding(host, port, *args, **kwargs):
        if host == "public.example":
            calls.append(host)
            fake[host] = "127.0.0.1"  # the next answer would be loopback
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC_IP, port))]
        return real(host, port, *args, **kwargs)

    socket.getaddrinfo = rebinding  # restored by the public_dns fixture's monkeypatch
    assert hydra.fetch.fetch_url("http://public.example/image.png") == BODY
    assert calls == ["public.example"] and connections == [(PUBLIC_IP, 80)]


def test_allow_private_fetches_lan_addresses(server):
    assert hydra.fetch.fetch_url(server + "/image.png", allow_private=True) == BODY
    with pytest.raises(FetchError, match="refused"):
        hydra.fetch.fetch_url(server + "/image.png")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 with a self-signed certificate for public.example; records the SNI."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=public.example", "-addext", "subjectAltName=DNS:public.example", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    names = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    httpd.seen = []
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], cert, names, httpd.seen
    httpd.shutdown()
    httpd.server_close()


def test_https_keeps_sni_and_certificate_check_on_the_name(tls_server, monkeypatch):
    port, cert, names, seen = tls_server
    real_getaddrinfo, real_connect = socket.getaddrinfo, urllib3.util.connection.create_connection
    connections = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, p, *a, **k: (
        [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC_IP, p))] if host.endswith(".example")
        else real_getaddrinfo(host, p, *a, **k)))

    def connect(address, *args, **kwargs):
        connections.append(address)
        return real_connect(("127.0.0.1", port), *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", connect)
    monkeypatch.setattr(hydra.fetch, "_ssl_context", lambda: ssl.create_default_context(cafile=str(cert)))
    assert hydra.fetch.fetch_url("https://public.example/image.png") == BODY
    assert connections == [(PUBLIC_IP, 443)] and names == ["public.example"]
    assert seen[-1] == ("/image.png", "public.example")
    with pytest.raises(FetchError, match="TLS"):  # the certificate is for public.example only
        hydra.fetch.fetch_url("https://other.example/image.png")
