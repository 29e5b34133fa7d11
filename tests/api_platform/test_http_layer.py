"""The one HTTP layer (serve/http): first on its own (a FastAPI app over httpx's ASGI transport, no
Ray), then live in the RAG, workflows and agents apps (and the gateway once it is on the layer)
on the session's Ray cluster, over real HTTP on 127.0.0.1, metrics read from Ray's Prometheus export."""

import asyncio
import logging
import re
import time
import uuid
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

from config import ModelSpec, Settings
from models.errors import ModelNotFound
from security.auth import Principal
from serve.http import (
    authenticated,
    catalog_label,
    current_request_id,
    http_app,
    label_model,
    unwrap,
)
from serve.http.metrics import route_label

from . import EMB, LIMIT

HEX_ID = re.compile(r"[0-9a-f]{32}")


# ------------------------------------------------------------------ the layer on its own


class Ask(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str
    model: str | None = None


class Answer(BaseModel):
    request_id: str


def unit_app(auth: bool = False, behind_serve: bool = False):
    """A small app on the layer; each call builds a fresh one (its own title: its own state)."""
    app = http_app(f"ORFEAS unit {uuid.uuid4().hex[:8]}", name="unit")
    log = logging.getLogger("tests.http_layer")

    @app.post("/ask", response_model=Answer)
    async def ask(req: Ask, request: Request, principal: Principal = Depends(authenticated)) -> Answer:
        label_model(request, req.model)
        log.warning("asked %s", req.query)
        if req.query == "ray":  # a typed error the way a handle or actor call raises it
            raise RayTaskError("coordinator.get_run", "Traceback ...", ModelNotFound("no model 'x'", "model")) \
                .as_instanceof_cause()
        if req.query == "boom":
            raise ValueError("a bug")
        if req.query == "lost":  # a detached actor died under the call (or under the actor it called)
            raise ActorDiedError()
        if req.query == "lost-inside":
            raise RayTaskError("coordinator.get_run", "Traceback ...", ActorUnavailableError("gone", None)) \
                .as_instanceof_cause()
        return Answer(request_id=current_request_id())

    @app.get("/runs")
    async def runs(limit: int = 10) -> dict:
        return {"limit": limit}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def gen():
            yield "a"
            yield current_request_id() or ""

        return StreamingResponse(gen(), media_type="text/plain")

    app.state.configure(Settings(auth={"enabled": auth}, limits={"max_body_bytes": 2048}), behind_serve=behind_serve)
    return app


def call(app, method: str, path: str, **kw) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://unit") as c:
            return await c.request(method, path, **kw)

    return asyncio.run(go())


def assert_error(r: httpx.Response, status: int, etype: str, param=None, code=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == etype and err["message"] and set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and (code is None or err["code"] == code), err
    return err


def test_request_id_is_taken_when_sane_made_up_otherwise_and_reaches_logs():
    app = unit_app()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep()
    logging.getLogger("tests.http_layer").addHandler(handler)
    try:
        sent = call(app, "POST", "/ask", json={"query": "a"}, headers={"x-request-id": "client-42.a:b"})
        made = call(app, "POST", "/ask", json={"query": "b"})
        bad = call(app, "POST", "/ask", json={"query": "c"}, headers={"x-request-id": "no spaces; " + "x" * 200})
    finally:
        logging.getLogger("tests.http_layer").removeHandler(handler)
    assert sent.headers.get_list("x-request-id") == ["client-42.a:b"] and sent.json()["request_id"] == "client-42.a:b"
    assert HEX_ID.fullmatch(made.headers["x-request-id"]) and made.json()["request_id"] == made.headers["x-request-id"]
    assert HEX_ID.fullmatch(bad.headers["x-request-id"])
    assert [r.request_id for r in records] == ["client-42.a:b", made.headers["x-request-id"],
                                               bad.headers["x-request-id"]]
    assert current_request_id() is None  # reset once the request is over
    streamed = call(app, "GET", "/stream", headers={"x-request-id": "s-1"})
    assert streamed.text == "as-1" and streamed.headers["x-request-id"] == "s-1"  # the stream runs with the id
    # Behind Serve, Serve echoes the id it passed on: the layer adds none unless it replaced it.
    serve_app = unit_app(behind_serve=True)
    assert call(serve_app, "POST", "/ask", json={"query": "a"}, headers={"x-request-id": "r1"}).headers \
        .get_list("x-request-id") == []
    assert HEX_ID.fullmatch(call(serve_app, "POST", "/ask", json={"query": "a"},
                                 headers={"x-request-id": "bad id"}).headers["x-request-id"])


def test_errors_are_openai_style_and_name_the_parameter():
    app = unit_app()
    assert_error(call(app, "POST", "/ask", content=b'{"query": ', headers={"content-type": "application/json"}),
                 400, "invalid_request_error")
    assert "not valid JSON" in call(app, "POST", "/ask", content=b"{nope").json()["error"]["message"]
    assert_error(call(app, "POST", "/ask", json={"query": "x", "surprise": 1}), 400, "invalid_request_error",
                 "surprise")
    assert_error(call(app, "POST", "/ask", json={}), 400, "invalid_request_error", "query")
    assert_error(call(app, "POST", "/ask", json=[1, 2]), 400, "invalid_request_error")
    assert_error(call(app, "POST", "/ask"), 400, "invalid_request_error")
    assert_error(call(app, "GET", "/runs?limit=many"), 400, "invalid_request_error", "limit")
    assert_error(call(app, "POST", "/ask", json={"query": "ray"}), 404, "not_found_error", "model")
    err = assert_error(call(app, "POST", "/ask", json={"query": "boom"}), 500, "api_error")
    assert "bug" not in err["message"]
    assert_error(call(app, "GET", "/nothing"), 404, "not_found_error")
    assert_error(call(app, "DELETE", "/ask"), 405, "invalid_request_error")
    # `curl -d` sends form-urlencoded; every ORFEAS body is JSON, read as such.
    r = call(app, "POST", "/ask", content=b'{"query": "curl"}',
             headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text


def test_a_lost_actor_is_a_503_with_retry_after_not_a_500():
    app = unit_app()
    for query in ("lost", "lost-inside"):
        r = call(app, "POST", "/ask", json={"query": query})
        err = assert_error(r, 503, "service_unavailable", code="service_unavailable")
        assert r.headers["retry-after"].isdigit() and "retry" in err["message"] and "Actor" not in err["message"]


def test_unauthenticated_calls_get_401_with_the_bearer_challenge():
    app = unit_app(auth=True)
    r = call(app, "POST", "/ask", json={"query": "x"})
    assert_error(r, 401, "authentication_error", code="invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer" and HEX_ID.fullmatch(r.headers["x-request-id"])
    assert_error(call(app, "POST", "/ask", json={"query": "x"}, headers={"Authorization": "Basic abc"}), 401,
                 "authentication_error")


def test_body_limit_holds_for_declared_and_chunked_bodies():
    app = unit_app()
    big = {"query": "x" * 3000}
    assert_error(call(app, "POST", "/ask", json=big), 413, "invalid_request_error", code="payload_too_large")

    async def chunks():
        yield b'{"query": "'
        for _ in range(4):
            yield b"y" * 1000
        yield b'"}'

    r = call(app, "POST", "/ask", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "invalid_request_error", code="payload_too_large")
    assert call(app, "POST", "/ask", json={"query": "y" * 1000}).status_code == 200


def test_unwrap_finds_the_typed_error_in_rays_wrappers():
    typed = ModelNotFound("no model 'x'", "model")
    wrapped = RayTaskError("f", "tb", typed)
    assert unwrap(wrapped) is typed and unwrap(wrapped.as_instanceof_cause()) is typed
    twice = RayTaskError("outer", "tb", RayTaskError("inner", "tb", typed))  # an actor that called an actor
    assert unwrap(twice) is typed
    plain = RayTaskError("f", "tb", ValueError("x"))
    assert unwrap(plain) is plain and unwrap(typed) is typed


def test_labels_are_bounded():
    label = catalog_label(Settings(models=[ModelSpec(id="m1", engine="transformers", source="/x")]), "extractive")
    assert [label(m) for m in ("m1", "extractive", "made-up", "", None)] == ["m1", "extractive", "other", "-", "-"]
    assert route_label({"root_path": "/v1/workflows"}) == "unmatched"


def test_openapi_documents_bodies_responses_errors_and_the_bearer_scheme():
    spec = call(unit_app(), "GET", "/openapi.json").json()
    op = spec["paths"]["/ask"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Ask"}
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Answer"}
    assert op["responses"]["4XX"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "422" not in op["responses"]  # validation errors are 400s here
    assert op["security"] == [{"bearer": []}] and spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "security" not in spec["paths"]["/runs"]["get"]  # no auth dependency, no scheme


def test_openapi_names_the_bearer_scheme_on_routes_of_included_routers():
    """FastAPI >= 0.137 nests an included router's routes (and Serve's class routes) instead of
    copying them up: their authenticated operations still carry the scheme. Before, only the
    app's own top-level routes did, and the gateway's /v1/chat/completions had no `security`."""
    app = unit_app()
    inner, outer = APIRouter(), APIRouter()

    @inner.post("/echo")
    async def echo(req: Ask, principal: Principal = Depends(authenticated)) -> dict:
        return {}

    @inner.get("/open")
    async def open_route() -> dict:
        return {}

    outer.include_router(inner, prefix="/inner")
    app.include_router(outer, prefix="/v9")
    spec = call(app, "GET", "/openapi.json").json()
    assert spec["paths"]["/v9/inner/echo"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in spec["paths"]["/v9/inner/open"]["get"]
    assert spec["paths"]["/ask"]["post"]["security"] == [{"bearer": []}]


# ------------------------------------------------------------------ live on the cluster

BODYLESS_ACTIONS = {"/runs/{run_id}/cancel", "/runs/{run_id}/resume",  # POSTs that take no input
                    "/v1/auth/logout", "/v1/auth/mfa/enrol"}


def get(live, path, **kw):
    return httpx.get(live["base"] + path, headers={"Authorization": f"Bearer {live['admin']}", **kw.pop("headers", {})},
                     timeout=60, **kw)


def post(live, path, **kw):
    return httpx.post(live["base"] + path, headers={"Authorization": f"Bearer {live['admin']}",
                                                    **kw.pop("headers", {})}, timeout=60, **kw)


def gateway_on_layer() -> bool:
    from serve.gateway import app as gateway
    from serve.http import HttpState

    return isinstance(getattr(getattr(gateway, "app", None), "state", None), HttpState)


GATEWAY = gateway_on_layer()


def layer_apps() -> dict[str, str]:
    """The route prefix of every app on the layer (the gateway once it is switched to it)."""
    apps = {"/v1/rag": "rag", "/v1/workflows": "workflows", "/v1/agents": "agents"}
    if GATEWAY:
        apps[""] = "gateway"
    return apps


def test_openapi_of_every_app_documents_each_routes_body_and_response(live):
    for prefix, name in layer_apps().items():
        r = httpx.get(live["base"] + prefix + "/openapi.json", timeout=30)
        assert r.status_code == 200, (name, r.text)
        spec = r.json()
        assert spec["paths"], name
        for path, ops in spec["paths"].items():
            for method, op in ops.items():
                where = f"{name}: {method.upper()} {path}"
                if method == "post" and path not in BODYLESS_ACTIONS:
                    schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
                    assert schema, f"{where} documents no request body"
                ok = [c for s, c in op["responses"].items() if s.startswith("2")]
                assert ok and all(any("schema" in v for v in c.get("content", {}).values()) for c in ok), \
                    f"{where} documents no response schema: {op['responses']}"
                assert op["responses"]["4XX"]["content"]["application/json"]["schema"]["$ref"].endswith(
                    "/ErrorResponse"), where


def serve_logs() -> list[Path]:
    """Serve's log files of this session (its proxy logs each request with its id)."""
    import ray

    return list((Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve").glob("*.log"))


def test_request_ids_are_echoed_made_up_and_logged(live):
    for path in ["/v1/agents", "/v1/workflows/runs", "/v1/rag/ingest/ingest-nope"] + (["/v1/models"] if GATEWAY else []):
        rid = f"orfeas-{uuid.uuid4().hex}"
        r = get(live, path, headers={"x-request-id": rid})
        assert r.status_code < 500 and r.headers.get_list("x-request-id") == [rid], (path, r.headers)
        made = get(live, path).headers.get_list("x-request-id")
        assert len(made) == 1 and made[0], (path, made)
        deadline = time.monotonic() + 30
        while not any(rid in p.read_text(errors="replace") for p in serve_logs()):
            assert time.monotonic() < deadline, f"request id {rid} in no Serve log line"
            time.sleep(0.5)
    # An id the layer will not take (too long, unsafe characters) is replaced; Serve's proxy still
    # echoes what the client sent, so both come back.
    ids = get(live, "/v1/agents", headers={"x-request-id": "bad id;" + "x" * 300}).headers.get_list("x-request-id")
    assert any(HEX_ID.fullmatch(i) for i in ids), ids


@pytest.mark.parametrize("path", ["/v1/rag/query", "/v1/rag/ingest", "/v1/workflows/runs",
                                  "/v1/workflows/runs/run_x/approve"]
                         + (["/v1/chat/completions", "/v1/embeddings", "/v1/feedback"] if GATEWAY else []))
def test_oversize_bodies_get_413_and_malformed_json_a_400(live, path):
    r = post(live, path, json={"query": "x" * (LIMIT + 10)})
    assert_error(r, 413, "invalid_request_error", code="payload_too_large")

    def chunks():
        yield b'{"query": "'
        for _ in range(LIMIT // 1000 + 1):
            yield b"y" * 1000
        yield b'"}'

    r = post(live, path, content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "invalid_request_error", code="payload_too_large")
    r = post(live, path, content=b'{"query": "x",', headers={"content-type": "application/json"})
    assert "not valid JSON" in assert_error(r, 400, "invalid_request_error")["message"]


def scrape(live, prefix: str) -> list[str]:
    text = httpx.get(live["metrics"], timeout=10).text
    return [ln for ln in text.splitlines() if ln.startswith(prefix)]


def test_every_app_counts_requests_with_bounded_model_labels(live):
    unknown = f"no-such-model-{uuid.uuid4().hex[:8]}"
    assert get(live, "/v1/agents").status_code == 200
    assert get(live, "/v1/workflows/runs").status_code == 200
    r = post(live, "/v1/workflows/runs", json={"definition": {"name": "m", "steps": [
        {"id": "a", "kind": "model", "model": unknown, "prompt": "p"}]}})
    assert_error(r, 404, "not_found_error", "model")
    assert_error(post(live, "/v1/rag/query", json={"query": "x", "model": unknown}), 404, "not_found_error", "model")
    assert get(live, "/v1/agents", headers={"Authorization": "Bearer orf_bad"}).status_code == 401
    gateway = []
    if GATEWAY:
        r = post(live, "/v1/chat/completions", json={"model": unknown, "messages": [{"role": "user", "content": "x"}]})
        assert_error(r, 404, "not_found_error", "model")
        assert post(live, "/v1/embeddings", json={"model": EMB, "input": "x"}).status_code == 200
        gateway = [('ray_orfeas_http_requests_total', 'app="gateway"', 'route="/v1/chat/completions"',
                    'model="other"', 'status="404"'),
                   ('ray_orfeas_http_requests_total', 'app="gateway"', 'route="/v1/embeddings"', f'model="{EMB}"',
                    'status="200"')]
    want = gateway + [
        ('ray_orfeas_http_requests_total', 'app="agents"', 'route="/v1/agents/"', 'status="200"'),
        ('ray_orfeas_http_requests_total', 'app="workflows"', 'route="/v1/workflows/runs"', 'method="GET"'),
        ('ray_orfeas_http_requests_total', 'app="workflows"', 'model="other"', 'status="404"'),
        ('ray_orfeas_http_requests_total', 'app="rag"', 'route="/v1/rag/query"', 'model="other"'),
        ('ray_orfeas_http_errors_total', 'app="agents"', 'type="authentication_error"'),
        ('ray_orfeas_http_errors_total', 'app="workflows"', 'type="not_found_error"'),
        ('ray_orfeas_http_request_latency_seconds_bucket', 'app="workflows"', 'route="/v1/workflows/runs"'),
    ]
    deadline = time.monotonic() + 90
    missing = want
    while missing and time.monotonic() < deadline:
        lines = scrape(live, "ray_orfeas_http")
        missing = [w for w in want if not any(ln.startswith(w[0]) and all(t in ln for t in w[1:]) for ln in lines)]
        if missing:
            time.sleep(2)
    assert not missing, f"metrics not exported: {missing}"
    assert not [ln for ln in lines if unknown in ln]  # a made-up name is never a label value


@pytest.fixture(scope="module")
def probe(live, tmp_path_factory):
    """A small app on the layer, deployed like ORFEAS's: a stream that takes ~1.5 s, and a route
    that logs through a handler formatting `%(request_id)s` into a file."""
    from ray import serve

    app = http_app("ORFEAS probe", name="probe")
    log_file = tmp_path_factory.mktemp("probe") / "probe.log"

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class Probe:
        def __init__(self, settings: dict, log_path: str):
            from config import settings_from_dict
            from serve.http import RequestIdFilter

            app.state.configure(settings_from_dict(settings))
            handler = logging.FileHandler(log_path)
            handler.addFilter(RequestIdFilter())
            handler.setFormatter(logging.Formatter("%(request_id)s %(message)s"))
            self.log = logging.getLogger("tests.probe")
            self.log.addHandler(handler)
            self.log.setLevel(logging.INFO)

        @app.get("/slow", response_class=StreamingResponse, responses={200: {"content": {"text/plain": {}}}})
        async def slow(self) -> StreamingResponse:
            async def gen():
                yield "a"
                await asyncio.sleep(1.5)
                yield "b"

            return StreamingResponse(gen(), media_type="text/plain")

        @app.get("/log")
        async def log_line(self) -> dict:
            self.log.info("probe handled")
            return {}

    serve.run(Probe.bind(live["settings"].to_dict(), str(log_file)), name="probe", route_prefix="/test-probe")
    yield live["base"] + "/test-probe", log_file
    serve.delete("probe")


def test_request_ids_reach_log_records_in_a_replica(probe):
    base, log_file = probe
    sent = f"probe-{uuid.uuid4().hex}"
    assert httpx.get(base + "/log", headers={"x-request-id": sent}, timeout=30).status_code == 200
    made = httpx.get(base + "/log", headers={"x-request-id": "bad id;" + "x" * 300}, timeout=30)
    ours = [i for i in made.headers.get_list("x-request-id") if HEX_ID.fullmatch(i)]
    assert len(ours) == 1, made.headers
    lines = log_file.read_text().splitlines()
    assert f"{sent} probe handled" in lines and f"{ours[0]} probe handled" in lines, lines


def test_a_stream_is_timed_to_its_last_byte(live, probe):
    base, _ = probe
    assert httpx.get(base + "/slow", timeout=30).text == "ab"
    deadline = time.monotonic() + 90
    buckets: dict[float, float] = {}
    while time.monotonic() < deadline:
        buckets = {}
        for ln in scrape(live, "ray_orfeas_http_request_latency_seconds_bucket"):
            if 'app="probe"' in ln and 'route="/test-probe/slow"' in ln:
                le = re.search(r'le="([^"]+)"', ln).group(1)
                buckets[float(le)] = float(ln.rsplit(" ", 1)[1])
        if buckets.get(2.5, 0) >= 1:
            break
        time.sleep(2)
    assert buckets.get(2.5, 0) >= 1 and buckets.get(1.0, 0) == 0, buckets


@pytest.mark.parametrize("path", ["/v1/rag/query", "/v1/workflows/runs"]
                         + (["/v1/chat/completions", "/v1/embeddings"] if GATEWAY else []))
def test_deep_json_and_lone_surrogates_get_a_400_on_every_app(live, path):
    deep = b'{"query": ' + b"[" * 1500 + b"]" * 1500 + b"}"  # under the 4 KiB body limit, past the depth and recursion limits
    r = post(live, path, content=deep, headers={"content-type": "application/json"})
    assert "max_json_depth" in assert_error(r, 400, "invalid_request_error", code="json_too_deep")["message"]
    lone = {"/v1/rag/query": b'{"query": "a\\ud800b"}', "/v1/workflows/runs": b'{"workflow": "w", "inputs": {"x": "\\ud800"}}',
            "/v1/chat/completions": b'{"model": "script", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
            "/v1/embeddings": b'{"model": "' + EMB.encode() + b'", "input": "a\\ud800b"}'}[path]
    r = post(live, path, content=lone, headers={"content-type": "application/json"})
    err = assert_error(r, 400, "invalid_request_error", param=ANY_PARAM, code="invalid_unicode")
    assert "surrogate" in err["message"] and "TextEncodeInput" not in err["message"]


class _Any:
    def __eq__(self, other):
        return True


ANY_PARAM = _Any()
