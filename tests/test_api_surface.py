"""The API surface of every app (serve.http.surface): the version header, deprecation headers on
marked routes, and who may read /docs and /openapi.json (auth.docs). ASGI, no cluster."""

import asyncio
import uuid

import httpx
import pytest

from config import Settings
from serve.http import API_VERSION, deprecate, http_app


def app_with(docs: str = "open", auth: bool = True):
    app = http_app(f"ORFEAS surface {uuid.uuid4().hex[:8]}", name="surface")

    @app.get("/v1/new")
    async def new() -> dict:
        return {"ok": True}

    @app.get("/v1/old")
    async def old() -> dict:
        return {"ok": True}

    deprecate(app, "/v1/old", since="2026-12-01", sunset="2027-06-30", link="/v1/new")
    app.state.configure(Settings(auth={"enabled": auth, "docs": docs}), behind_serve=False)
    return app


def get(app, path: str, **kw) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://unit") as c:
            return await c.get(path, **kw)

    return asyncio.run(go())


def test_every_response_names_the_api_version_and_deprecated_routes_say_so():
    app = app_with()
    for path in ("/v1/new", "/v1/old", "/nope", "/openapi.json"):
        assert get(app, path).headers["x-orfeas-api-version"] == API_VERSION == "v1"
    new, old = get(app, "/v1/new"), get(app, "/v1/old")
    assert "deprecation" not in new.headers and "sunset" not in new.headers
    assert old.status_code == 200 and old.headers["deprecation"] == "@1796083200"  # RFC 9745: @epoch
    assert old.headers["sunset"] == "Wed, 30 Jun 2027 00:00:00 GMT"  # RFC 8594: an HTTP date
    assert old.headers["link"] == '</v1/new>; rel="successor-version"'
    with pytest.raises(ValueError):
        deprecate(app, "/v1/new", sunset="soon")


def test_docs_are_open_by_default_behind_a_key_or_off():
    assert Settings().auth.docs == "open"
    open_ = app_with("open")
    assert get(open_, "/docs").status_code == 200 and get(open_, "/openapi.json").json()["paths"]
    guarded = app_with("auth")
    for path in ("/docs", "/openapi.json"):
        r = get(guarded, path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "API key" in r.json()["error"]["message"] and r.headers["x-orfeas-api-version"] == "v1"
    assert get(guarded, "/v1/new").status_code == 200  # only the documentation is guarded
    off = app_with("off")
    r = get(off, "/openapi.json")
    assert r.status_code == 404 and "auth.docs" in r.json()["error"]["message"]
    # With auth off (on purpose), "auth" has no key to ask for: the documentation is served.
    assert get(app_with("auth", auth=False), "/openapi.json").status_code == 200
