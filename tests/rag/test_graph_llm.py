"""The LLM-based graph extractor against a small real OpenAI-compatible server on 127.0.0.1."""
from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from config.settings import RagGraphSettings
from rag import graph, graph_llm

REPLY = {"content": json.dumps({"entities": [{"name": "Interleukin 6", "kind": "protein"},
                                             {"name": "Insulin resistance", "kind": "condition"}],
                                "relations": [{"source": "Interleukin 6", "relation": "Raises",
                                               "target": "Insulin resistance"}]})}


AUTH: list[str | None] = []  # each request's Authorization header


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        AUTH.append(self.headers.get("Authorization"))
        body = json.dumps({"id": "x", "object": "chat.completion", "model": "m",
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": REPLY["content"]}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


TEXT = "Interleukin 6 raises insulin resistance in adipose tissue. BM25 is unrelated."


def test_typed_edges_in_built_graph(server):
    data = graph_llm.extract_llm(TEXT, url=server, model="m", timeout=5)
    kg = graph.KnowledgeGraph.build([("c1", "d1", json.dumps(data))])
    e = kg.edge(graph.normal("Interleukin 6"), graph.normal("Insulin resistance"))
    assert e is not None and e.type == "raises" and e.evidence == {"c1"}
    assert kg.find("BM25") is not None  # the rules' entities are kept
    assert graph_llm.llm_extractor_name("m") != graph.EXTRACTOR


def test_malformed_reply_falls_back_to_rules(server):
    good = REPLY["content"]
    REPLY["content"] = '{"entities": [{"name": ' # partial JSON
    try:
        before = graph_llm.LLM_FALLBACKS["json"]
        assert graph_llm.extract_llm(TEXT, url=server, model="m", timeout=5) == {**graph.extract(TEXT),
                                                                                 "fallback": "json"}
        assert graph_llm.LLM_FALLBACKS["json"] == before + 1
    finally:
        REPLY["content"] = good


def test_down_endpoint_falls_back(caplog):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    before = graph_llm.LLM_FALLBACKS["http"]
    assert graph_llm.extract_llm(TEXT, url=f"http://127.0.0.1:{port}/v1", model="m", timeout=2) == {
        **graph.extract(TEXT), "fallback": "http"}
    assert graph_llm.LLM_FALLBACKS["http"] == before + 1
    assert "rule-based extraction" in caplog.text


def test_settings_validation():
    assert RagGraphSettings().extractor == "rules"
    RagGraphSettings(extractor="llm", llm_url="http://127.0.0.1:1/v1", llm_model="m")
    with pytest.raises(ValidationError, match="llm_url"):
        RagGraphSettings(extractor="llm")
    with pytest.raises(ValidationError):
        RagGraphSettings(extractor="gpt")


def test_ingest_uses_the_configured_extractor(server, monkeypatch):
    """What ingest and the edge sync call per chunk (`chunk_extractor` of `rag.graph`), and the
    indexing parameters, which re-write documents when the extractor changes."""
    from config import Settings
    from rag.ingest import indexing_params

    settings = Settings()
    rules = indexing_params(settings)
    assert json.loads(graph_llm.chunk_extractor(settings.rag.graph.model_dump())(TEXT)) == graph.extract(TEXT)
    monkeypatch.setenv("GRAPH_LLM_KEY", "sk-test")
    settings.rag.graph = RagGraphSettings(extractor="llm", llm_url=server, llm_model="m", llm_timeout=5,
                                          llm_api_key_env="GRAPH_LLM_KEY")
    out = json.loads(graph_llm.chunk_extractor(settings.rag.graph.model_dump())(TEXT))
    assert AUTH[-1] == "Bearer sk-test"
    assert ["raises"] == [p[2] for p in out["r"] if len(p) == 3]
    assert indexing_params(settings) != rules and "graph=llm-1:m" in indexing_params(settings)


def test_ingest_counts_the_chunks_that_fell_back_in_its_summary(ray_cluster, settings, tmp_path):
    """The fallback counter above is per worker process (Ray Data's); the job's summary counts the
    chunks whose payload says they fell back, so an operator sees it after `orfeas ingest`."""
    from rag.ingest import format_summary, run_ingest
    from rag.store import open_store

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()
    src = tmp_path / "docs"
    src.mkdir()
    (src / "a.md").write_text("# IL-6\n\n" + TEXT)
    (src / "b.md").write_text("# Insulin\n\nInsulin resistance follows Interleukin 6 in adipose tissue.")
    settings.rag.graph = RagGraphSettings(extractor="llm", llm_url=f"http://127.0.0.1:{dead}/v1", llm_model="m",
                                          llm_timeout=2)
    store = open_store(settings)
    summary = run_ingest(str(src), "kg", settings=settings, store=store)
    assert summary.chunks >= 2 and summary.graph_fallbacks == {"http": summary.chunks}
    assert f"{summary.chunks} chunk(s) (http)" in format_summary(summary)
    stored = [json.loads(p["graph"]) for p in store.scroll_payloads(store.resolve("kg"), ["graph"])]
    assert len(stored) == summary.chunks  # nothing lost: each chunk kept the rules' extraction, marked
    assert all(g["fallback"] == "http" and g["e"] for g in stored)
