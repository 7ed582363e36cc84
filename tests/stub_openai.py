"""A stand-in OpenAI-compatible streaming server for the load-test client's tests (test scaffolding,
not a leanfm server): ``/v1/completions`` streams ``max_tokens`` one-word chunks, the first after
``ttft`` seconds and the rest ``itl`` seconds apart, then a usage chunk and ``[DONE]``. With
``serial=True`` it serves one request at a time (a lock), like a server without batching."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def start(ttft: float = 0.02, itl: float = 0.005, serial: bool = False):
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            body = json.dumps({"data": [{"id": "stub"}]}).encode()
            self.send_response(200 if self.path in ("/health", "/v1/models") else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v1/completions":
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            n = int(req.get("max_tokens", 16))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def send(obj):
                data = f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            with lock if serial else _null():
                time.sleep(ttft)
                for i in range(n):
                    if i:
                        time.sleep(itl)
                    send({"choices": [{"index": 0, "text": f" w{i}"}]})
                send({"choices": [], "usage": {"prompt_tokens": len(req["prompt"].split()), "completion_tokens": n}})
                send("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.handle_error = lambda *a: None  # a client that hangs up mid-stream (cancelled requests) is expected
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def free_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
