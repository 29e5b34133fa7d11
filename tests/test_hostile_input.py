"""Hostile request bodies on the one HTTP layer (no Ray: a FastAPI app over httpx's ASGI
transport): deep nesting, invalid UTF-8 and lone surrogates get a 400 that names the problem,
never a 500 or a parser's internals; and the OpenAI types refuse what OpenAI refuses."""

import asyncio
import json
import uuid

import httpx
import pytest
from pydantic import BaseModel, ValidationError

from config import Settings
from models.protocol import ChatCompletionRequest, CompletionRequest
from serve.http import http_app
from serve.http.json_guard import check_json_body, json_depth


class Anything(BaseModel):
    model_config = {"extra": "allow"}


def guarded_app(depth: int = 16):
    app = http_app(f"ORFEAS hostile {uuid.uuid4().hex[:8]}", name="hostile")

    @app.post("/echo")
    async def echo(body: Anything) -> dict:
        return {"ok": True, "keys": sorted(body.model_dump())}

    @app.post("/chat")
    async def chat(req: ChatCompletionRequest) -> dict:
        return {"stream": req.stream}

    app.state.configure(Settings(auth={"enabled": False}, limits={"max_json_depth": depth}), behind_serve=False)
    return app


def call(app, body: bytes, path: str = "/echo", ctype: str = "application/json") -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://unit") as c:
            return await c.post(path, content=body, headers={"content-type": ctype})

    return asyncio.run(go())


def error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_json_nested_ten_thousand_levels_is_a_400_naming_the_limit():
    app = guarded_app(depth=16)
    for deep in (b'{"a": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", b'{"a": ' + b'{"b": ' * 10_000 + b"1" + b"}" * 10_001):
        err = error(call(app, deep))
        assert "16" in err["message"] and "max_json_depth" in err["message"] and err["code"] == "json_too_deep"
    # the same through a form content type (read as JSON by the layer) and chunked
    err = error(call(app, b"[" * 5000 + b"]" * 5000, ctype="text/plain"))
    assert err["code"] == "json_too_deep"
    # brackets inside strings are text, not nesting; 16 levels is allowed
    assert call(app, json.dumps({"a": "[" * 5000}).encode()).status_code == 200
    assert call(app, b'{"a": ' + b"[" * 15 + b"]" * 15 + b"}").status_code == 200


def test_depth_scan_counts_structure_only():
    assert json_depth(b'{"a": [[1], {"b": "]]]]"}]}', 3) == 3
    assert json_depth(b'"\\"[[[["', 1) == 0
    assert json_depth(b"[" * 100, 10) == 11  # stops counting past the limit


@pytest.mark.parametrize("body,where", [
    (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages.0.content"),
    (b'{"input": ["ok", "\\udc00"]}', "input.1"),
    (b'{"query": "x", "\\uDBFF": 1}', "\\udbff"),
])
def test_lone_surrogates_are_refused_naming_the_parameter(body, where):
    err = error(call(guarded_app(), body))
    assert err["code"] == "invalid_unicode" and "surrogate" in err["message"]
    assert err["param"] == where


def test_paired_surrogates_and_escaped_backslashes_are_text():
    app = guarded_app()
    assert call(app, b'{"q": "\\ud83d\\ude00"}').status_code == 200  # an emoji as a surrogate pair
    assert call(app, b'{"q": "\\\\ud800"}').status_code == 200  # a backslash, then "ud800"


def test_invalid_utf8_is_a_400():
    err = error(call(guarded_app(), b'{"q": "\xff\xfe"}'))
    assert err["code"] == "invalid_unicode" and "UTF-8" in err["message"]
    check_json_body(b'{"q": "\xc3\xa9"}', 8)  # valid UTF-8 passes


def test_stream_must_be_a_json_boolean():
    app = guarded_app()
    msgs = [{"role": "user", "content": "hi"}]
    for bad in ("yes", "true", 1, None):
        err = error(call(app, json.dumps({"model": "m", "messages": msgs, "stream": bad}).encode(), "/chat"))
        assert err["param"] == "stream", err
    assert call(app, json.dumps({"model": "m", "messages": msgs, "stream": True}).encode(), "/chat").json() == \
        {"stream": True}
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="p", stream="yes")


def test_content_null_is_refused_on_user_messages_only():
    app = guarded_app()
    body = {"model": "m", "messages": [{"role": "user", "content": None}]}
    err = error(call(app, json.dumps(body).encode(), "/chat"))
    assert err["param"] == "messages.0" and "needs content" in err["message"], err
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[{"role": "system", "content": None}])
    ok = ChatCompletionRequest(model="m", messages=[
        {"role": "user", "content": "add"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                              "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "3", "tool_call_id": "c"}])
    assert ok.messages[1].content is None


def test_405_allow_names_every_method_of_the_path():
    app = http_app(f"ORFEAS allow {uuid.uuid4().hex[:8]}", name="allow")

    @app.post("/runs")
    async def start() -> dict:
        return {}

    @app.get("/runs")
    async def listing() -> dict:
        return {}

    app.state.configure(Settings(auth={"enabled": False}), behind_serve=False)

    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://unit") as c:
            return await c.request("DELETE", "/runs")

    r = asyncio.run(go())
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"  # Starlette alone said "POST"
    assert r.json()["error"]["type"] == "invalid_request_error"
