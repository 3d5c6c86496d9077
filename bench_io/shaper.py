"""A shaped object store: an HTTP proxy in front of the loopback S3 server that makes it behave
like a distant one, and counts what it is asked for.

Every request waits ``delay_s`` before it is forwarded (time to first byte), and each response
body is sent at most ``conn_bytes_per_s`` per connection. The proxy counts requests, response
body bytes (counted as they are handed to the connection), and the most requests and requested
bytes (Range lengths) in flight at once, so tests can assert the client's limits. A request is
in flight from its arrival until the proxy hands the last bytes of its response to the
connection: from then on the client may have read them all and sent its next request before
this proxy's thread runs again, so counting it any longer would charge the client for a request
it has already released. What the proxy counts is then never more than what the client holds.

    proxy = ShapedProxy("http://127.0.0.1:PORT", delay_s=0.03, conn_bytes_per_s=100e6).start()
    ... s3fs with endpoint_url=proxy.endpoint ...
    proxy.stop()

A gate holds requests until it is opened, so tests can stop clients at a known point without
depending on how fast they run: :meth:`ShapedProxy.close_gate` holds every ranged GET of at least
``min_bytes`` (smaller requests, such as header reads, pass), :attr:`ShapedProxy.held` names the
client ports of the requests held now, :meth:`ShapedProxy.open_gate` lets them all through.
"""

from __future__ import annotations

import http.client
import re
import threading
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

_RANGE = re.compile(r"bytes=(\d+)-(\d+)$")
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}
#: Body bytes sent per paced write.
CHUNK = 256 << 10


@dataclass
class Counters:
    requests: int = 0
    get_requests: int = 0
    ranged_gets: int = 0
    body_bytes: int = 0
    ranged_bytes: int = 0
    in_flight: int = 0
    bytes_in_flight: int = 0
    max_in_flight: int = 0
    max_bytes_in_flight: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ShapedProxy:
    """See the module docstring. ``delay_s`` and ``conn_bytes_per_s`` may be changed between runs;
    :meth:`reset` zeroes the counters."""

    def __init__(self, upstream: str, delay_s: float = 0.03, conn_bytes_per_s: float = 100e6):
        u = urlsplit(upstream)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.delay_s = delay_s
        self.conn_bytes_per_s = conn_bytes_per_s
        self.counters = Counters()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._open = threading.Event()
        self._open.set()
        self._gate_min_bytes = 0
        self._held: dict[int, int] = {}  # client port -> requests held from it

    def close_gate(self, min_bytes: int = 0) -> None:
        """Hold ranged GETs of at least ``min_bytes`` (every request when 0) until :meth:`open_gate`."""
        self._gate_min_bytes = min_bytes
        self._open.clear()

    def open_gate(self) -> None:
        self._open.set()

    @property
    def held(self) -> set[int]:
        """The client ports (this side's peers) of the requests the gate holds now."""
        with self._lock:
            return {port for port, n in self._held.items() if n}

    def _hold(self, port: int, wanted: int) -> None:
        if self._open.is_set() or (self._gate_min_bytes and wanted < self._gate_min_bytes):
            return
        with self._lock:
            self._held[port] = self._held.get(port, 0) + 1
        try:
            self._open.wait()
        finally:
            with self._lock:
                self._held[port] -= 1

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def reset(self) -> Counters:
        with self._lock:
            old, self.counters = self.counters, Counters()
        return old

    def start(self) -> ShapedProxy:
        proxy = self

        class Handler(_Handler):
            shaper = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="shaper", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _begin(self, method: str, wanted: int) -> _InFlight:
        with self._lock:
            c = self.counters
            c.requests += 1
            c.get_requests += method == "GET"
            c.ranged_gets += method == "GET" and wanted > 0
            c.in_flight += 1
            c.bytes_in_flight += wanted
            c.max_in_flight = max(c.max_in_flight, c.in_flight)
            c.max_bytes_in_flight = max(c.max_bytes_in_flight, c.bytes_in_flight)
            return _InFlight(c, wanted)

    def _handing_over(self, req: _InFlight, n: int, last: bool) -> None:
        """``n`` body bytes are about to be handed to the client (the last ones: the request is
        released). Counted before they go, for the same reason as the release."""
        with self._lock:
            req.counters.body_bytes += n
            req.counters.ranged_bytes += n if req.wanted else 0
        if last:
            self._release(req)

    def _release(self, req: _InFlight) -> None:
        """The request is no longer in flight (once; again does nothing)."""
        with self._lock:
            if not req.released:
                req.released = True
                req.counters.in_flight -= 1
                req.counters.bytes_in_flight -= req.wanted


@dataclass
class _InFlight:
    """One request the proxy counts as in flight (in the counters of when it arrived)."""

    counters: Counters
    wanted: int
    released: bool = False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    shaper: ShapedProxy

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _upstream(self) -> http.client.HTTPConnection:
        conn = getattr(self, "_conn", None)
        if conn is None:
            conn = self._conn = http.client.HTTPConnection(*self.shaper.upstream, timeout=300)
        return conn

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        m = _RANGE.match(self.headers.get("Range", ""))
        wanted = int(m.group(2)) - int(m.group(1)) + 1 if m and self.command == "GET" else 0
        self.shaper._hold(self.client_address[1], wanted)
        req = self.shaper._begin(self.command, wanted)
        try:
            time.sleep(self.shaper.delay_s)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            conn = self._upstream()
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
            except (ConnectionError, http.client.HTTPException):
                conn.close()
                self._conn = None
                conn = self._upstream()
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
            length = resp.getheader("Content-Length")
            data = resp.read() if length is None or self.command == "HEAD" else None
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            # A HEAD answer keeps the object's length (clients read the size from it).
            self.send_header("Content-Length", length if length is not None and (data is None or self.command == "HEAD")
                             else str(len(data or b"")))
            body = self.command != "HEAD" and (length != "0" if data is None else bool(data))
            if not body:
                self.shaper._release(req)  # the headers are the whole response
            self.end_headers()
            if body:
                self._paced(resp, data, req)
        finally:
            self.shaper._release(req)  # after an error

    def _paced(self, resp: http.client.HTTPResponse, data: bytes | None, req: _InFlight) -> None:
        """Send the body (streamed from upstream as it arrives, or ``data``) at no more than the
        connection's bandwidth; the request is released just before its last chunk goes."""
        view = memoryview(data) if data is not None else None
        t0 = time.perf_counter()
        sent = 0
        chunk = view[:CHUNK] if view is not None else resp.read(CHUNK)
        while chunk:
            after = sent + len(chunk)
            # The next chunk is read first, to know whether this one is the last.
            nxt = view[after:after + CHUNK] if view is not None else resp.read(CHUNK)
            self.shaper._handing_over(req, len(chunk), last=not nxt)
            self.wfile.write(chunk)
            sent, chunk = after, nxt
            ahead = t0 + sent / self.shaper.conn_bytes_per_s - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward
