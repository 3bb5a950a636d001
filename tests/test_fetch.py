"""hydra.fetch: http(s)-only URL fetching with a deadline, a size cap and re-checked redirects.

A tiny HTTP server on 127.0.0.1 (a thread in the test process) plays every kind of misbehaving host.
No internet. Run: venv/bin/python -m pytest tests/test_fetch.py -q
"""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from hydra.fetch import FetchError, check_url, fetch_url

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
        if path == "/image.png":
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


@pytest.fixture(scope="module")
def server():
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
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
