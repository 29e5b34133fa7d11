"""Loopback stand-ins for Slack's incoming webhooks and PagerDuty's Events API v2: a real HTTP
server that keeps every JSON body POSTed to it, by path (Slack answers "ok", PagerDuty 202)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class WebhookSink:
    def __init__(self, port: int):
        self.port = port
        self.received: list[tuple[str, dict]] = []
        self.on_post = None  # optional (path, body) -> None, called as a body arrives, before it is kept
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                if sink.on_post is not None:
                    sink.on_post(self.path, body)
                with sink._lock:
                    sink.received.append((self.path, body))
                if self.path.startswith("/pagerduty"):
                    out = json.dumps({"status": "success", "message": "Event processed",
                                      "dedup_key": body.get("dedup_key")}).encode()
                    self.send_response(202)
                    self.send_header("content-type", "application/json")
                else:
                    out = b"ok"
                    self.send_response(200)
                    self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def bodies(self, path: str) -> list[dict]:
        with self._lock:
            return [b for p, b in self.received if p == path]

    def wait(self, path: str, n: int = 1, timeout_s: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while len(self.bodies(path)) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.bodies(path)

    def start(self) -> "WebhookSink":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
