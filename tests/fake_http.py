"""What the tests' fake HTTP servers share: a quiet threading server, a handler with the wire
plumbing (JSON answers; SSE frames in HTTP/1.1 chunks), and a base for a fake's state that serves
its handler on a free loopback port."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MB = 1024 * 1024
HUGE = 100 * MB  # what the "huge" modes of the fakes send: far past every bound aigate reads to


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the default listen backlog of 5 resets bursts of connections

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up mid-stream are what several tests do on purpose


class FakeServer:
    """Base of a fake's state: ``serve`` starts ``handler``, which sees the fake as ``self.state``."""

    httpd: QuietServer

    def serve(self, handler: type[WireHandler]) -> None:
        self.httpd = QuietServer(("127.0.0.1", 0), type("Handler", (handler,), {"state": self}))
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]


class WireHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle's algorithm and the
        # client's delayed ACK add 40 ms to every small answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def start_sse(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def frame(self, obj: Any) -> None:
        self.chunk(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

    def end_chunks(self) -> None:
        self.chunk(b"")

    def redirect(self, status: int, location: str) -> None:
        """A 3xx to ``location`` (a client that follows it sends its request there)."""
        self.send_response(status)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def huge_chunk(self, head: bytes, size: int = HUGE) -> None:
        """One HTTP chunk of ``size`` bytes, ``head`` then "x" (one SSE line without end, say), written a
        megabyte at a time: a reader that stops at its bound closes the connection long before the end."""
        self.wfile.write(b"%x\r\n" % size + head)
        self.fill(size - len(head))
        self.wfile.write(b"\r\n")

    def huge_body(self, status: int, head: bytes, tail: bytes, size: int = HUGE) -> None:
        """A JSON body of ``size`` bytes: ``head``, "x" to fill it, ``tail``."""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        self.wfile.write(head)
        self.fill(size - len(head) - len(tail))
        self.wfile.write(tail)

    def fill(self, size: int) -> None:
        piece = b"x" * MB
        while size > 0:
            self.wfile.write(piece[:size])
            size -= MB
