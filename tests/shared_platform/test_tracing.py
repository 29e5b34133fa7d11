"""Tracing end to end: the package's shared platform (conftest.py) exports to a real OTLP/HTTP
receiver on loopback (tests/otlp_receiver.py decodes opentelemetry-proto), and a streamed chat, a
generated RAG answer and a two-step workflow each arrive as one connected trace, every span's
parent in it, across the Serve handle calls (gateway -> model replica, RAG -> gateway) and actor
calls (workflows app -> coordinator -> agent actor, RAG -> Qdrant Edge owner)."""

from __future__ import annotations

import secrets
import time

import httpx
import openai
import pytest

from harness import make_key

from . import CHAT


@pytest.fixture(scope="module")
def traced(shared_platform):
    _, key = make_key(shared_platform.settings, "admin")
    return shared_platform.receiver, shared_platform.base, key


def client_parent() -> tuple[str, str, str]:
    """A client's own span: (trace id, span id, traceparent header)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def check_connected(spans, client_span: str):
    """One tree: a single root, whose parent is the client's span; every other parent in the trace."""
    ids = {s.span_id for s in spans}
    assert len(ids) == len(spans), "span ids repeat"
    roots = [s for s in spans if s.parent_id not in ids]
    assert len(roots) == 1, [(s.name, s.service) for s in roots]
    assert roots[0].parent_id == client_span and roots[0].kind == 2  # SPAN_KIND_SERVER
    return {s.span_id: s for s in spans}


def chain(by_id, span) -> list[str]:
    """The span's name and its ancestors' names, innermost first."""
    out = []
    while span is not None:
        out.append(span.name)
        span = by_id.get(span.parent_id)
    return out


def one(spans, name: str):
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def test_streamed_chat_is_one_trace_from_http_to_the_model_replica(traced):
    receiver, base, key = traced
    trace_id, span_id, header = client_parent()
    client = openai.OpenAI(base_url=base + "/v1", api_key=key)
    with client.chat.completions.with_streaming_response.create(
            model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True,
            extra_headers={"traceparent": header}) as resp:
        returned = resp.headers["traceparent"]
        text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
    assert text
    # The response names the server span of the client's trace.
    assert returned.split("-")[1] == trace_id and returned.split("-")[2] != span_id
    spans = receiver.wait_for(trace_id, {"POST /v1/chat/completions", f"chat {CHAT}", "router.decision",
                                         "backend.attempt", f"generate {CHAT}"})
    by_id = check_connected(spans, span_id)
    server = one(spans, "POST /v1/chat/completions")
    assert server.span_id == returned.split("-")[2] and server.attributes["http.response.status_code"] == 200
    assert server.attributes["http.route"] == "/v1/chat/completions"
    assert server.service == "orfeas-gateway"
    gen = one(spans, f"generate {CHAT}")
    assert chain(by_id, gen) == [f"generate {CHAT}", "backend.attempt", f"chat {CHAT}", "POST /v1/chat/completions"]
    assert gen.service == "orfeas-model"  # the model replica's own process
    assert gen.attributes["gen_ai.request.model"] == CHAT and gen.attributes["gen_ai.usage.output_tokens"] > 0
    assert gen.attributes["gen_ai.server.time_to_first_token"] > 0
    chat = one(spans, f"chat {CHAT}")
    assert chat.attributes["gen_ai.usage.input_tokens"] > 0 and chat.attributes["gen_ai.response.model"] == CHAT
    decision = one(spans, "router.decision")
    assert by_id[decision.parent_id] is chat
    assert decision.attributes["orfeas.router.choice"] == CHAT and decision.attributes["orfeas.router.reason"]
    assert CHAT in decision.attributes["orfeas.router.candidates"]


def test_generated_rag_answer_is_one_trace_through_retrieval_qdrant_and_the_gateway(traced):
    receiver, base, key = traced
    trace_id, span_id, header = client_parent()
    # A question of its own: a RAG replica keeps recent query vectors, and a question another
    # file's test asked would be answered without an embedding.
    r = httpx.post(base + "/v1/rag/query", json={"query": "Through what does KubeRay roll out Serve upgrades?",
                                                  "model": CHAT, "collection": "docs"},
                   headers={"Authorization": f"Bearer {key}", "traceparent": header}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["diagnostics"]["generation"] == "chat"
    spans = receiver.wait_for(trace_id, {"POST /v1/rag/query", "rag.cache.lookup", "rag.query", "rag.retrieve",
                                         "rag.embed", "rag.search", "qdrant.search_resolved", "rag.pack",
                                         "rag.generate", f"chat {CHAT}", f"generate {CHAT}"})
    by_id = check_connected(spans, span_id)
    assert chain(by_id, one(spans, "qdrant.search_resolved")) == [
        "qdrant.search_resolved", "rag.search", "rag.retrieve", "rag.query", "POST /v1/rag/query"]
    assert one(spans, "qdrant.search_resolved").service == "orfeas-qdrant"  # the owner actor
    # The platform's semantic cache embeds the question to look it up; the retrieval of the miss
    # reuses that vector (one embedding per query).
    assert chain(by_id, one(spans, "rag.embed"))[1:] == ["rag.cache.lookup", "POST /v1/rag/query"]
    assert chain(by_id, one(spans, "rag.pack"))[1] == "rag.query"
    assert chain(by_id, one(spans, f"generate {CHAT}")) == [
        f"generate {CHAT}", "backend.attempt", f"chat {CHAT}", "rag.generate", "rag.query", "POST /v1/rag/query"]
    assert one(spans, f"chat {CHAT}").service == "orfeas-gateway"


def test_two_step_workflow_is_one_trace_through_coordinator_and_agent_actor(traced):
    receiver, base, key = traced
    trace_id, span_id, header = client_parent()
    wf = {"name": "traced", "agents": [{"name": "writer", "model": CHAT, "max_tokens": 6}],
          "steps": [{"id": "draft", "kind": "agent", "agent": "writer", "task": "Draft one line."},
                    {"id": "polish", "kind": "model", "model": CHAT, "max_tokens": 6,
                     "prompt": "Polish: ${steps.draft.output.answer}", "needs": ["draft"]}]}
    headers = {"Authorization": f"Bearer {key}", "traceparent": header}
    r = httpx.post(base + "/v1/workflows/runs", json={"definition": wf}, headers=headers, timeout=60)
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]
    deadline = time.monotonic() + 120
    plain = {"Authorization": f"Bearer {key}"}  # polls are traces of their own
    while (run := httpx.get(f"{base}/v1/workflows/runs/{run_id}", headers=plain, timeout=30).json())["status"] \
            not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, run
        time.sleep(0.2)
    assert run["status"] == "succeeded", run
    spans = receiver.wait_for(trace_id, {"POST /v1/workflows/runs", "workflow.run", "agent.task"})
    spans = receiver.wait_for(trace_id, {s.name for s in spans} | {f"chat {CHAT}"})
    by_id = check_connected(spans, span_id)
    run_span = one(spans, "workflow.run")
    assert by_id[run_span.parent_id].name == "POST /v1/workflows/runs" and run_span.service == "orfeas-coordinator"
    assert run_span.attributes["orfeas.status"] == "succeeded"
    steps = {s.attributes["orfeas.step"]: s for s in spans if s.name == "workflow.step"}
    assert set(steps) == {"draft", "polish"} and all(s.parent_id == run_span.span_id for s in steps.values())
    task = one(spans, "agent.task")
    assert task.parent_id == steps["draft"].span_id and task.service == "orfeas-agent"
    gens = [s for s in spans if s.name == f"generate {CHAT}"]
    assert len(gens) == 2  # one model call per step, each in the model replica
    tops = sorted(chain(by_id, g)[3] for g in gens)  # generate <- attempt <- chat <- the step's own span
    assert tops == ["agent.task", "workflow.step"]
    assert {chain(by_id, g)[-3] for g in gens} == {"workflow.step"}


def test_admin_resources_report_nodes_deployments_and_bottlenecks(traced):
    """GET /v1/admin/resources (the resource monitor, scaling.resources) on this deployed platform."""
    _, base, key = traced
    r = httpx.get(base + "/v1/admin/resources", headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert r.status_code == 200, r.text
    snap = r.json()
    deps = {(d["app"], d["name"]): d for d in snap["deployments"]}
    assert deps[("gateway", "Gateway")]["running"] >= 1 and deps[("gateway", "Gateway")]["capacity_per_replica"] == 100
    assert ("model-tiny-chat", "ChatModelServer") in deps
    assert snap["nodes"] and snap["nodes"][0]["cpus"] == 8 and isinstance(snap["bottlenecks"], list)
    assert httpx.get(base + "/v1/admin/resources", timeout=30).status_code == 401
