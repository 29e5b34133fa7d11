"""What access control adds per request: API-key authentication (with RBAC's endpoint check)
and JWT authentication (RS256, JWKS cached) against auth off, and the rate-limit check (admit + settle over local leases) against the
limiter switched off. Same method as gateway_overhead.py: both sides in one process, in the same
run, in alternating blocks; the figures are differences of percentiles (added latency).

    .venv/bin/python benchmarks/access_overhead.py [--requests 5000]

The authentication side sends real ASGI requests through an `http_app` (the HTTP layer every app
uses) with the bearer key in the header; the key store is the real `KeyStore` called in this
process (a replica pays one actor hop per key per auth.key_cache_s, which the cache then hides;
what is measured is the per-request cost after it). The rate-limit side runs `Limiter.admit` and
`Admission.settle` with per-key and per-team limits over the real `RateLimitCounters`, called
in-process for the lease rounds (one in every lease_fraction x limit requests).

Writes benchmarks/results/access_overhead.json and prints a markdown table for docs/benchmarks.md.
The JWT side sends an RS256 token (a key pair made here) through the same app with an
`auth.oidc` issuer whose JWKS a loopback HTTP server started here publishes: the real
`TokenVerifier` fetches it once in the warm-up and then serves it from its cache. Two JWT rows:
the verified-token cache on (the default: the same token is verified once, then found by its
hash) and off (`auth.jwt_cache_entries: 0`: full signature and claim verification per request).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from fastapi import Depends

RESULTS = Path(__file__).resolve().parent / "results"
ROUNDS = 5


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class InProcess:
    """An object's methods called as a replica calls an actor's (`.m.remote(...)` awaited)."""

    def __init__(self, obj):
        self._obj = obj

    def __getattr__(self, name):
        method = getattr(self._obj, name)

        class _M:
            @staticmethod
            def remote(*args, **kwargs):
                fut = asyncio.get_running_loop().create_future()
                fut.set_result(method(*args, **kwargs))
                return fut

        return _M()


ISSUER, AUDIENCE = "https://idp.bench.invalid", "orfeas-bench"


class JwksServer:
    """One RSA key pair, its public half published as a JWKS on 127.0.0.1 (a thread)."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import jwt
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key()))
        body = json.dumps({"keys": [{**jwk, "kid": "bench-1", "use": "sig", "alg": "RS256"}]}).encode()
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                outer.fetches += 1
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"

    def token(self) -> str:
        import jwt

        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "bench-user", "roles": ["user"], "iat": now, "nbf": now,
                  "exp": now + 3600}
        return jwt.encode(claims, self.private, algorithm="RS256", headers={"kid": "bench-1"})

    def close(self) -> None:
        self.server.shutdown()


def auth_app(enabled: bool, data_dir: Path, oidc: list[dict] | None = None, jwt_cache_entries: int = 10_000):
    from config import Settings
    from security.auth import Authenticator, Principal
    from serve.http import authenticated, http_app

    app = http_app(f"ORFEAS bench {uuid.uuid4().hex[:8]}", name="bench")

    @app.get("/v1/ping")
    async def ping(principal: Principal = Depends(authenticated)) -> dict:
        return {"ok": True}

    settings = Settings(data_dir=data_dir, auth={"enabled": enabled, "key_cache_s": 3600, "oidc": oidc or [],
                                                 "jwks_cache_s": 3600, "jwt_cache_entries": jwt_cache_entries})
    auth = Authenticator(settings)
    from security.keys import KeyStore

    store = KeyStore(str(data_dir / "auth" / "keys.json"))
    auth.__dict__["store"] = InProcess(store)  # the cached_property's slot
    app.state.configure(settings, authenticator=auth, behind_serve=False)
    _, key = store.create("user", ["m"], "bench", endpoints=["/v1/*"])
    return app, key


async def time_requests(client: httpx.AsyncClient, n: int, headers: dict) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = await client.get("/v1/ping", headers=headers)
        out.append(time.perf_counter() - t)
        assert r.status_code == 200, r.text
    return out


async def bench_auth(n: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="orfeas-bench-"))
    off_app, _ = auth_app(False, tmp / "off")
    on_app, key = auth_app(True, tmp / "on")
    off, on = [], []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=off_app), base_url="http://b") as c_off, \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=on_app), base_url="http://b") as c_on:
        hdr = {"Authorization": f"Bearer {key}"}
        await time_requests(c_off, 200, {})
        await time_requests(c_on, 200, hdr)  # warm: the key is cached after the first
        for _ in range(ROUNDS):
            off += await time_requests(c_off, n // ROUNDS, {})
            on += await time_requests(c_on, n // ROUNDS, hdr)
    return summary(off, on)


async def bench_jwt(n: int, cache: bool = True) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="orfeas-bench-"))
    idp = JwksServer()
    try:
        off_app, _ = auth_app(False, tmp / "off")
        on_app, _ = auth_app(True, tmp / "on", oidc=[{"issuer": ISSUER, "audience": [AUDIENCE], "jwks_url": idp.url,
                                                     "algorithms": ["RS256"]}], jwt_cache_entries=10_000 if cache else 0)
        off, on = [], []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=off_app), base_url="http://b") as c_off, \
                httpx.AsyncClient(transport=httpx.ASGITransport(app=on_app), base_url="http://b") as c_on:
            hdr = {"Authorization": f"Bearer {idp.token()}"}
            await time_requests(c_off, 200, {})
            await time_requests(c_on, 200, hdr)  # warm: the first request fetches the JWKS
            for _ in range(ROUNDS):
                off += await time_requests(c_off, n // ROUNDS, {})
                on += await time_requests(c_on, n // ROUNDS, hdr)
        assert idp.fetches == 1, f"the JWKS was fetched {idp.fetches} times: the cache did not hold"
    finally:
        idp.close()
    return {**summary(off, on), "jwks_fetches": idp.fetches}


async def bench_ratelimit(n: int) -> dict:
    from config import Settings
    from security.auth import Principal
    from security.ratelimit import Limiter, RateLimitCounters

    limits = {"requests_per_minute": 10_000_000, "tokens_per_minute": 10_000_000_000, "concurrent": 10_000}
    on_settings = Settings(rate_limits={"key": limits, "team": limits})
    off_settings = Settings(rate_limits={"enabled": False})
    on = Limiter(on_settings, actor=InProcess(RateLimitCounters()))
    off = Limiter(off_settings, actor=InProcess(RateLimitCounters()))
    p = Principal("k1", "user", None, team="red")

    async def run(lim: Limiter, count: int) -> list[float]:
        out = []
        for _ in range(count):
            t = time.perf_counter()
            adm = await lim.admit(p, "m", 300)
            adm.settle(120)
            out.append(time.perf_counter() - t)
        return out

    await run(on, 500)
    await run(off, 500)
    a, b = [], []
    for _ in range(ROUNDS):
        a += await run(off, n // ROUNDS)
        b += await run(on, n // ROUNDS)
    return summary(a, b)


def summary(base: list[float], with_: list[float]) -> dict:
    return {"requests": len(with_),
            "baseline_p50_ms": statistics.median(base) * 1e3, "baseline_p99_ms": pct(base, 99) * 1e3,
            "p50_ms": statistics.median(with_) * 1e3, "p99_ms": pct(with_, 99) * 1e3,
            "added_p50_ms": (statistics.median(with_) - statistics.median(base)) * 1e3,
            "added_p99_ms": (pct(with_, 99) - pct(base, 99)) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=5000)
    args = ap.parse_args()
    load_before = os.getloadavg()  # whether the machine was quiet: part of the result
    auth = asyncio.run(bench_auth(args.requests))
    token = asyncio.run(bench_jwt(args.requests))
    token_uncached = asyncio.run(bench_jwt(args.requests, cache=False))
    limit = asyncio.run(bench_ratelimit(args.requests * 4))
    result = {"machine": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "api_key_auth": auth,
              "jwt_auth": token, "jwt_auth_uncached": token_uncached, "rate_limit_check": limit,
              "targets_ms": {"api_key_auth_added_p99": 0.5, "jwt_auth_added_p99": 0.5, "rate_limit_added_p99": 0.2}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "access_overhead.json").write_text(json.dumps(result, indent=1))
    print(f"load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
          f"after {result['load_average_after'][0]:.2f}, on {os.cpu_count()} CPUs")
    print("| what | baseline p50 / p99 (ms) | with p50 / p99 (ms) | added p50 / p99 (ms) | target p99 added |")
    print("| --- | --- | --- | --- | --- |")
    for name, r, target in (("API-key auth vs auth off (ASGI request)", auth, 0.5),
                            ("JWT auth (RS256, JWKS cached, verified-token cache) vs auth off", token, 0.5),
                            ("JWT auth, verified-token cache off (full verification) vs auth off", token_uncached, 0.5),
                            ("rate-limit check vs limiter off", limit, 0.2)):
        print(f"| {name} | {r['baseline_p50_ms']:.3f} / {r['baseline_p99_ms']:.3f} | {r['p50_ms']:.3f} / "
              f"{r['p99_ms']:.3f} | {r['added_p50_ms']:.3f} / {r['added_p99_ms']:.3f} | {target} ms |")


if __name__ == "__main__":
    main()
