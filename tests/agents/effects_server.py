"""A real loopback HTTP server that agents' http_get tool calls in the tests: it counts hits and
distinct effects (by the Idempotency-Key header), and holds `/gate/<name>` requests until the
test releases that gate, so a test can act while a step is in flight."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict

import uvicorn
from fastapi import FastAPI, Request


class EffectsServer:
    def __init__(self, port: int):
        self.port = port
        self.hits: dict[str, int] = defaultdict(int)
        self.effects: dict[str, set[str]] = defaultdict(set)
        self.gates: dict[str, threading.Event] = defaultdict(threading.Event)
        app = FastAPI()

        def record(name: str, request: Request) -> None:
            self.hits[name] += 1
            self.effects[name].add(request.headers.get("idempotency-key", f"anon-{self.hits[name]}"))

        @app.get("/count/{name}")
        async def count(name: str, request: Request):
            record(name, request)
            return {"name": name, "hits": self.hits[name]}

        @app.get("/gate/{name}")
        async def gate(name: str, request: Request):
            record(name, request)
            await asyncio.to_thread(self.gates[name].wait, 120)
            return {"name": name, "released": self.gates[name].is_set()}

        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "EffectsServer":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("effects server did not start")
            time.sleep(0.05)
        return self

    def release(self, name: str) -> None:
        self.gates[name].set()

    def wait_hits(self, name: str, n: int, timeout_s: float = 120) -> None:
        """Block until `name` has been hit n times (a wait for an event, not a timing assertion)."""
        deadline = time.monotonic() + timeout_s
        while self.hits[name] < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} was hit {self.hits[name]} times, waiting for {n}")
            time.sleep(0.05)

    def stop(self) -> None:
        for ev in self.gates.values():
            ev.set()
        self._server.should_exit = True
        self._thread.join(timeout=10)
