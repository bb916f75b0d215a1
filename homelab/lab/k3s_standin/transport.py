"""HTTP(S) serving for the API on the standard library: ThreadingHTTPServer, TLS per connection."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .api import Request, Response

Handler = Callable[[Request], Response]
MAX_BODY = 64 * 1024 * 1024


class _TLSServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: Handler, context: ssl.SSLContext) -> None:
        self.api_handler = handler
        self.context = context
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, _RequestHandler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(30)
        with contextlib.suppress(OSError):  # headers and body go out in separate writes: no Nagle delay
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        with self.connections_lock:
            self.connections.add(tls)
        try:
            tls.settimeout(None)
            _RequestHandler(tls, client_address, self)
        finally:
            with self.connections_lock:
                self.connections.discard(tls)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away mid-request

    def close_connections(self) -> None:
        with self.connections_lock:
            conns = list(self.connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TLSServer
    server_version = "k3s-standin"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.send_error(413)
            return
        body = self.rfile.read(length) if length else b""
        req = Request(method=self.command, path=parsed.path, query=urllib.parse.parse_qs(parsed.query,
                                                                                         keep_blank_values=True),
                      headers=dict(self.headers.items()), body=body)
        resp = self.server.api_handler(req)
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Cache-Control", "no-cache, private")
        for key, value in resp.headers:
            self.send_header(key, value)
        if resp.stream is None:
            self.send_header("Content-Length", str(len(resp.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(resp.body)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            for chunk in resp.stream:
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (OSError, ssl.SSLError):
            pass

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _serve


class HttpsServer:
    """The API on host:port (port 0: any free port), in background threads."""

    def __init__(self, host: str, port: int, handler: Handler, certfile: str, keyfile: str) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(certfile, keyfile)
        self._httpd = _TLSServer((host, port), handler, context)
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="k3s-standin-https", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.close_connections()
        self._httpd.server_close()
        self._thread.join(timeout=5)
