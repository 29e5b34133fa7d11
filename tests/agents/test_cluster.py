"""Agents, the bus, shared state and durable workflows on the real session cluster: real actors,
the real gateway (a scripted loopback provider and the tiny transformers model), real HTTP on
127.0.0.1, ray.kill for fault injection. One deployment for the module."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import ray
import yaml
from typer.testing import CliRunner

from config import ModelSpec, Settings
from config.names import ACTOR_NAMESPACE
from harness import deployed, free_port, make_key
from provider_server import ProviderServer

from effects_server import EffectsServer

CHAT = "tiny-chat"


def script(*replies) -> str:
    return "SCRIPT: " + json.dumps(list(replies))


@pytest.fixture(scope="module")
def platform(ray_cluster, serve_port, tiny_model_dir, tmp_path_factory):
    provider = ProviderServer(free_port()).start()
    effects = EffectsServer(free_port()).start()
    root = tmp_path_factory.mktemp("agents")
    settings = Settings(
        data_dir=root / "data",
        serve={"host": "127.0.0.1", "port": serve_port},
        auth={"key_cache_s": 0},
        rag={"enabled": False},
        models=[ModelSpec(id="script", engine="openai", base_url=provider.base_url, source="script",
                          api_key_env="ORFEAS_TEST_PROVIDER_KEY"),
                # The same scripted provider, catalogued as a model with native tools and a price.
                ModelSpec(id="script-tools", engine="openai", base_url=provider.base_url, source="script",
                          api_key_env="ORFEAS_TEST_PROVIDER_KEY", capabilities=["chat", "tools"],
                          price_input_per_m=1000.0, price_output_per_m=2000.0),
                ModelSpec(id=CHAT, engine="transformers", source=str(tiny_model_dir), max_context=2048)],
        agents={"default_model": "script", "heartbeat_s": 0.5, "max_parallel_steps": 4,
                "http_get": {"enabled": True, "allowlist": [effects.url + "/"]},
                "agents": [{"name": "assistant", "capabilities": ["general"], "tools": ["calculator"],
                            "instructions": script('{"answer": "hello from the registry"}')}]},
    )
    config = root / "orfeas.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    from agents.coordinator import coordinator

    with deployed(settings):
        _, admin = make_key(settings, "admin")
        _, alice = make_key(settings, "user", name="alice")
        _, bob = make_key(settings, "user", ["script"], name="bob")
        yield {"settings": settings, "config": config, "effects": effects, "coord": coordinator(settings),
               "provider": provider,
               "base": f"http://127.0.0.1:{serve_port}", "admin": admin, "alice": alice, "bob": bob}
    effects.stop()
    provider.stop()


def coord(platform):
    from agents.coordinator import coordinator

    return coordinator(platform["settings"])


def wait_dead(actor, timeout_s: float = 60.0) -> None:
    """ray.kill is asynchronous: a call sent right after it can still be answered. Wait until the
    actor's calls fail, as they must once the kill has landed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ping.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    pytest.fail(f"the actor still answers {timeout_s:g}s after ray.kill")


def wait_done(c, run_id: str) -> dict:
    after = 0
    while True:
        batch = ray.get(c.events_after.remote(run_id, after, 30.0))
        if batch["events"]:
            after = batch["events"][-1]["seq"]
        if batch["done"]:
            return ray.get(c.get_run.remote(run_id))


def events_until(c, run_id: str, event: str, timeout_s: float = 30.0) -> list[dict]:
    """The run's events up to and including the first `event`. A run's state is read on the
    coordinator's control group and its events on their own group: the state can show a change
    a moment before the change's event is written."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while not any(e["event"] == event for e in events) and time.monotonic() < deadline:
        events += ray.get(c.events_after.remote(run_id, events[-1]["seq"] if events else 0, 5.0))["events"]
    return events


def wait_status(c, run_id: str, status: str) -> dict:
    after = 0
    while True:
        run = ray.get(c.get_run.remote(run_id))
        if run["status"] == status:
            return run
        assert run["status"] not in ("succeeded", "failed", "cancelled"), run
        batch = ray.get(c.events_after.remote(run_id, after, 30.0))
        after = batch["events"][-1]["seq"] if batch["events"] else after


def api(platform, method, path, key=None, **kw):
    key = key or platform["admin"]
    return httpx.request(method, platform["base"] + path, headers={"Authorization": f"Bearer {key}"},
                         timeout=60, **kw)


# ------------------------------------------------------------------ agents and tools


def test_agent_tool_loop_handles_native_json_and_bad_calls(platform):
    calc_agent = {"name": "calc", "capabilities": ["math"], "tools": ["calculator"], "instructions": script(
        '{"tool": "calculator", "arguments": {"expression": "6*7"}}',
        '{"tool": "calculator", "arguments": {"expression": "1/0"}}',
        '{"tool": "calculator", "arguments": {"nope": 1}}',
        '{"tool": "rm", "arguments": {}}',
        '{"tool_calls": [{"id": "c1", "type": "function", "function": {"name": "calculator", '
        '"arguments": "{\\"expression\\": \\"2+2\\"}"}}]}',
        'done: {last}')}
    wf = {"name": "calc", "agents": [calc_agent],
          "steps": [{"id": "solve", "kind": "agent", "capability": "math", "task": "compute"}]}
    c = coord(platform)
    run = wait_done(c, ray.get(c.start_run.remote(wf))["id"])
    assert run["status"] == "succeeded", run
    out = run["output"]
    assert out["agent"] == "calc" and out["answer"].startswith("done: ") and '{"result": 4}' in out["answer"]
    assert [t["ok"] for t in out["tool_calls"]] == [True, False, False, False, True]
    assert run["analytics"]["model_calls"] == 6 and run["steps"]["solve"]["model_calls"] == 6


def test_agent_uses_native_tool_calls_when_its_model_has_them(platform):
    """A model catalogued with `tools` is offered them the OpenAI way through the gateway; its
    tool_calls run and their results go back as `tool` messages. Analytics carry the backend's
    token counts and the catalog price (7 prompt + 5 completion tokens on the calling turn; the
    answering turn's provider reports no usage, so that turn is priced from counted tokens)."""
    native = {"name": "native", "model": "script-tools", "capabilities": ["native"], "tools": ["calculator"],
              "instructions": script({"tool_calls": [{"name": "calculator", "arguments": {"expression": "6*7"}}]},
                                     "answer: {last}")}
    wf = {"name": "native", "agents": [native],
          "steps": [{"id": "s", "kind": "agent", "agent": "native", "task": "compute six times seven"}]}
    provider = platform["provider"]
    n = len(provider.requests)
    c = coord(platform)
    run = wait_done(c, ray.get(c.start_run.remote(wf))["id"])
    assert run["status"] == "succeeded", run
    assert run["output"]["answer"] == 'answer: {"result": 42}'
    assert run["output"]["tool_calls"] == [{"tool": "calculator", "arguments": {"expression": "6*7"}, "ok": True}]
    first, second = [r["body"] for r in provider.requests[n:]]
    assert [t["function"]["name"] for t in first["tools"]] == ["calculator"]
    assert "reply with only a JSON object" not in first["messages"][0]["content"]  # no JSON protocol
    call = second["messages"][2]["tool_calls"][0]
    assert call["function"] == {"name": "calculator", "arguments": '{"expression": "6*7"}'}
    assert second["messages"][3] == {"role": "tool", "tool_call_id": call["id"], "content": '{"result": 42}'}
    a = run["analytics"]
    assert a["model_calls"] == 2 and a["tokens"] > 12
    assert a["cost"] > (7 * 1000.0 + 5 * 2000.0) / 1e6


def test_step_limit_stops_a_looping_agent(platform):
    looper = {"name": "looper", "max_steps": 2, "tools": ["calculator"],
              "instructions": script('{"tool": "calculator", "arguments": {"expression": "1"}}')}
    wf = {"name": "loop", "agents": [looper], "steps": [{"id": "s", "kind": "agent", "agent": "looper", "task": "x"}]}
    c = coord(platform)
    run = wait_done(c, ray.get(c.start_run.remote(wf))["id"])
    assert run["status"] == "failed" and "within 2 steps" in run["error"]


def test_registry_discovery(platform):
    c = coord(platform)
    agents = ray.get(c.agents.remote())
    assert [a["name"] for a in agents] == ["assistant"] and agents[0]["tools"] == ["calculator"]
    assert ray.get(c.agents.remote("general"))[0]["model"] == "script"
    assert ray.get(c.agents.remote("nothing")) == []


# ------------------------------------------------------------------ the multi-agent workflow


def test_research_draft_review_with_conflict_end_to_end(platform):
    effects = platform["effects"]
    wf = {
        "name": "article", "inputs": {"topic": "Ray Serve", "n": 6},
        "agents": [
            {"name": "researcher", "capabilities": ["research"], "tools": ["calculator", "http_get"],
             "instructions": script(
                 json.dumps({"tool": "http_get", "arguments": {"url": effects.url + "/count/research"}}),
                 '{"tool": "calculator", "arguments": {"expression": "6*7"}}', 'facts: {last}')},
            {"name": "writer", "capabilities": ["writing"], "model": CHAT, "max_tokens": 8,
             "instructions": "Write a short draft."},
            {"name": "rev_a", "capabilities": ["review"], "instructions": script("approve")},
            {"name": "rev_b", "capabilities": ["review"], "priority": 5, "instructions": script("reject")},
            {"name": "rev_c", "capabilities": ["review"], "instructions": script("Approve.")},
        ],
        "steps": [
            {"id": "research", "kind": "agent", "capability": "research", "task": "Research ${inputs.topic}"},
            {"id": "draft", "kind": "agent", "agent": "writer",
             "task": "Draft about ${inputs.topic} from: ${steps.research.output.answer}"},
            {"id": "review", "kind": "agent", "agents": ["rev_a", "rev_b", "rev_c"], "conflict": "vote",
             "task": "Review: ${steps.draft.output.answer}"},
            {"id": "verdict", "kind": "condition", "expr": "steps.review.output.votes['approve'] >= 2",
             "then": ["publish"], "else": ["rewrite"]},
            {"id": "publish", "kind": "tool", "tool": "calculator", "args": {"expression": "${inputs.n} * 7"}},
            {"id": "rewrite", "kind": "model", "model": "script", "prompt": "rewrite"},
            {"id": "summary", "kind": "model", "model": "script", "system": script("summary of {task}"),
             "prompt": "${steps.publish.output.result}", "needs": ["publish", "rewrite"]},
        ],
    }
    c = coord(platform)
    run = wait_done(c, ray.get(c.start_run.remote(wf, {"topic": "KubeRay"}))["id"])
    assert run["status"] == "succeeded", run["error"]
    steps = run["steps"]
    assert '{"result": 42}' in steps["research"]["output"]["answer"] and effects.hits["research"] == 1
    assert steps["draft"]["output"]["agent"] == "writer" and steps["draft"]["output"]["answer"]  # tiny model's noise
    review = steps["review"]["output"]
    assert review["conflict"] and review["votes"] == {"approve": 2, "reject": 1} and review["agent"] in ("rev_a", "rev_c")
    assert steps["verdict"]["output"] is True and steps["rewrite"]["status"] == "skipped"
    assert steps["publish"]["output"] == {"result": 42} and run["output"] == "summary of 42"
    a = run["analytics"]
    assert a["steps_succeeded"] == 6 and a["model_calls"] >= 8 and a["tokens"] > 0
    events = [e["event"] for e in events_until(c, run["id"], "run.succeeded")]
    assert events[0] == "run.created" and events[-1] == "run.succeeded" and "step.skipped" in events
    # run-scoped agents are gone with their run
    assert "researcher" not in [x["name"] for x in ray.get(c.agents.remote(None, True))]


def test_fan_out_and_retry_with_on_failure(platform):
    wf = {"name": "fan", "inputs": {"xs": ["1+1", "2*3", "10/4"]},
          "steps": [{"id": "each", "kind": "tool", "tool": "calculator", "foreach": "${inputs.xs}",
                     "args": {"expression": "${item}"}},
                    {"id": "broken", "kind": "tool", "tool": "calculator", "args": {"expression": "1/0"},
                     "retries": 2, "backoff": {"initial_s": 0.01, "factor": 2}, "on_failure": "fallback",
                     "needs": ["each"]},
                    {"id": "fallback", "kind": "tool", "tool": "calculator", "args": {"expression": "-1"}},
                    {"id": "total", "kind": "tool", "tool": "calculator",
                     "args": {"expression": "${steps.each.output[0].result} + ${steps.broken.output.result}"}}]}
    c = coord(platform)
    run = wait_done(c, ray.get(c.start_run.remote(wf))["id"])
    assert run["status"] == "succeeded", run["error"]
    assert [o["result"] for o in run["steps"]["each"]["output"]] == [2, 6, 2.5]
    assert run["steps"]["broken"]["status"] == "recovered" and run["steps"]["broken"]["attempts"] == 3
    assert run["analytics"]["steps"]["broken"]["retries"] == 2 and run["output"] == {"result": 1}


# ------------------------------------------------------------------ fault injection


def test_agent_killed_mid_step_is_retried_on_a_new_actor_exactly_once_in_effect(platform):
    effects = platform["effects"]
    worker = {"name": "worker", "tools": ["http_get"], "instructions": script(
        json.dumps({"tool": "http_get", "arguments": {"url": effects.url + "/gate/agent-kill"}}), '{"answer": "ok"}')}
    wf = {"name": "kill-agent", "agents": [worker],
          "steps": [{"id": "work", "kind": "agent", "agent": "worker", "task": "do it"}]}
    c = coord(platform)
    run_id = ray.get(c.start_run.remote(wf))["id"]
    effects.wait_hits("agent-kill", 1)
    [task] = [t for t in ray.get(c.tasks_in_flight.remote()) if t["run_id"] == run_id]
    victim = ray.get_actor(task["actor"], namespace=ACTOR_NAMESPACE)
    ray.kill(victim, no_restart=True)
    effects.release("agent-kill")
    run = wait_done(c, run_id)
    assert run["status"] == "succeeded", run["error"]
    st = run["steps"]["work"]
    assert st["infra_failures"] == 1 and st["attempts"] == 1 and run["output"]["answer"] == "ok"
    assert effects.hits["agent-kill"] == 2  # the call was made again by the new actor...
    assert len(effects.effects["agent-kill"]) == 1  # ...with the same idempotency key: one effect
    events = [e["event"] for e in ray.get(c.events_after.remote(run_id, 0))["events"]]
    assert "step.retrying" in events


def test_coordinator_killed_mid_run_resumes_from_checkpoint(platform):
    effects = platform["effects"]
    url = effects.url
    wf = {"name": "durable", "steps": [
        {"id": "a", "kind": "tool", "tool": "http_get", "args": {"url": url + "/count/durable-a"}},
        {"id": "fan", "kind": "tool", "tool": "http_get", "foreach": "${inputs.names}",
         "args": {"url": url + "/count/durable-${item}"}, "needs": ["a"]},
        {"id": "b", "kind": "tool", "tool": "http_get", "args": {"url": url + "/gate/durable-b"}, "needs": ["fan"]},
        {"id": "c", "kind": "tool", "tool": "http_get", "args": {"url": url + "/count/durable-c"}, "needs": ["b"]}],
        "inputs": {"names": ["x", "y"]}}
    c = coord(platform)
    run_id = ray.get(c.start_run.remote(wf))["id"]
    effects.wait_hits("durable-b", 1)
    ray.kill(c, no_restart=True)
    wait_dead(c)
    effects.release("durable-b")

    runner = CliRunner()
    from cluster.cli import app

    result = runner.invoke(app, ["workflows", "resume", run_id, "--config", str(platform["config"])],
                           env={"RAY_ADDRESS": ray.get_runtime_context().gcs_address})
    assert result.exit_code == 0, result.output
    assert run_id in result.output
    c = coord(platform)
    run = wait_done(c, run_id)
    assert run["status"] == "succeeded", run["error"]
    assert effects.hits["durable-a"] == 1 and effects.hits["durable-x"] == 1 and effects.hits["durable-y"] == 1
    assert effects.hits["durable-c"] == 1 and effects.hits["durable-b"] == 2  # only the in-flight step ran again
    assert run["analytics"]["resumed"] == 1


def test_cancel_stops_the_run_and_its_running_step(platform):
    effects = platform["effects"]
    wf = {"name": "cancel-me", "steps": [
        {"id": "hold", "kind": "tool", "tool": "http_get", "args": {"url": effects.url + "/gate/cancel"}},
        {"id": "after", "kind": "tool", "tool": "http_get", "args": {"url": effects.url + "/count/after-cancel"},
         "needs": ["hold"]}]}
    c = coord(platform)
    run_id = ray.get(c.start_run.remote(wf))["id"]
    effects.wait_hits("cancel", 1)
    out = ray.get(c.cancel.remote(run_id))
    assert out["status"] == "cancelled"
    run = ray.get(c.get_run.remote(run_id))
    assert run["steps"]["hold"]["status"] == "cancelled" and run["steps"]["after"]["status"] == "cancelled"
    effects.release("cancel")
    assert effects.hits["after-cancel"] == 0
    with pytest.raises(ray.exceptions.RayTaskError, match="already cancelled"):
        ray.get(c.cancel.remote(run_id))


def test_approval_gate_blocks_until_approved(platform):
    wf = {"name": "gated", "steps": [
        {"id": "gate", "kind": "approval", "message": "ship ${inputs.what}?"},
        {"id": "ship", "kind": "tool", "tool": "calculator", "args": {"expression": "1+1"}, "needs": ["gate"]}],
        "inputs": {"what": "it"}}
    c = coord(platform)
    run_id = ray.get(c.start_run.remote(wf))["id"]
    run = wait_status(c, run_id, "awaiting_approval")
    assert run["awaiting_approval"] == ["gate"] and run["steps"]["ship"]["status"] == "pending"
    events = events_until(c, run_id, "step.awaiting_approval")
    assert any(e["event"] == "step.awaiting_approval" and e["message"] == "ship it?" for e in events)
    ray.get(c.approve.remote(run_id, None, "ops", True, "go"))
    run = wait_done(c, run_id)
    assert run["status"] == "succeeded" and run["steps"]["gate"]["approved_by"] == "ops"


# ------------------------------------------------------------------ bus and shared state


def test_bus_pubsub_order_redelivery_duplicates_direct_and_request_reply(platform):
    from agents.bus import Inbox, message_bus
    from agents.state import shared_state

    data_dir = str(platform["settings"].resolved_data_dir())
    bus, state = message_bus(data_dir), shared_state(data_dir, platform["settings"])
    ray.get([bus.subscribe.remote("s1", "news"), bus.subscribe.remote("s2", "news")])
    for i in range(5):
        ray.get(bus.publish.remote("news", {"n": i}, f"k{i}"))
    dup = ray.get(bus.publish.remote("news", {"n": 0}, "k0"))
    assert dup["duplicate"] and dup["seq"] == 1
    first = ray.get(bus.pull.remote("s1", "news"))
    assert [m["payload"]["n"] for m in first] == [0, 1, 2, 3, 4]  # ordered, duplicate not added
    # s1 crashes before acking: the messages come again; applying them is idempotent
    again = ray.get(bus.pull.remote("s1", "news"))
    assert [m["seq"] for m in again] == [m["seq"] for m in first]
    inbox = Inbox()
    for m in first + again:
        if inbox.accept(m):
            ray.get(state.put.remote("bus-test", f"doc{m['payload']['n']}", m["payload"], None, m["key"]))
        else:  # even if the consumer forgot, the store refuses the second effect
            assert ray.get(state.put.remote("bus-test", f"doc{m['payload']['n']}", {"x": 1}, None, m["key"]))["duplicate"]
    assert all(ray.get(state.get.remote("bus-test", f"doc{i}"))["version"] == 1 for i in range(5))
    ray.get(bus.ack.remote("s1", "news", first[-1]["seq"]))
    assert ray.get(bus.pull.remote("s1", "news")) == []
    assert len(ray.get(bus.pull.remote("s2", "news"))) == 5  # each subscriber has its own cursor
    ray.get(bus.send.remote("agent-b", {"hi": 1}, None, "agent-a"))
    assert ray.get(bus.pull.remote("agent-b", "@agent-b"))[0]["payload"] == {"hi": 1}

    @ray.remote(num_cpus=0)
    def responder(bus):
        msgs = ray.get(bus.pull.remote("svc", "@svc", 30.0))
        req = next(m for m in msgs if m["reply_to"])
        ray.get(bus.ack.remote("svc", "@svc", req["seq"]))
        return ray.get(bus.reply.remote(req["reply_to"], {"sum": sum(req["payload"])}))

    r = responder.remote(bus)
    assert ray.get(bus.request.remote("svc", [1, 2, 3], 60.0)) == {"sum": 6}
    assert ray.get(r) is True
    with pytest.raises(ray.exceptions.RayTaskError, match="no reply"):
        ray.get(bus.request.remote("nobody", {}, 0.2))


def test_shared_state_compare_and_set_detects_conflicts(platform):
    from agents.state import VersionConflict, shared_state

    state = shared_state(str(platform["settings"].resolved_data_dir()), platform["settings"])
    v1 = ray.get(state.put.remote("run-x", "plan", {"owner": "a"}, 0))
    # two agents read version 1 and both try to write
    ok = ray.get(state.put.remote("run-x", "plan", {"owner": "b"}, v1["version"]))
    with pytest.raises(ray.exceptions.RayTaskError) as e:
        ray.get(state.put.remote("run-x", "plan", {"owner": "c"}, v1["version"]))
    assert isinstance(e.value.cause, VersionConflict) and e.value.cause.current == ok["version"] == 2
    assert ray.get(state.get.remote("run-x", "plan")) == {"version": 2, "value": {"owner": "b"}}


# ------------------------------------------------------------------ HTTP API and CLI


def test_http_api_runs_events_and_ownership(platform):
    wf = {"name": "http", "steps": [
        {"id": "gate", "kind": "approval"},
        {"id": "calc", "kind": "tool", "tool": "calculator", "args": {"expression": "${inputs.x} * 2"}, "needs": ["gate"]}]}
    r = api(platform, "POST", "/v1/workflows/runs", platform["alice"], json={"definition": wf, "inputs": {"x": 21}})
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]
    assert api(platform, "GET", f"/v1/workflows/runs/{run_id}", platform["bob"]).status_code == 404
    assert run_id not in [x["id"] for x in api(platform, "GET", "/v1/workflows/runs", platform["bob"]).json()["data"]]
    assert run_id in [x["id"] for x in api(platform, "GET", "/v1/workflows/runs", platform["admin"]).json()["data"]]
    assert api(platform, "POST", f"/v1/workflows/runs/{run_id}/approve", platform["bob"]).status_code == 404
    c = coord(platform)
    wait_status(c, run_id, "awaiting_approval")
    r = api(platform, "POST", f"/v1/workflows/runs/{run_id}/approve", platform["alice"], json={"comment": "ok"})
    assert r.status_code == 200, r.text
    events = []
    with httpx.stream("GET", platform["base"] + f"/v1/workflows/runs/{run_id}/events",
                      headers={"Authorization": f"Bearer {platform['alice']}"}, timeout=60) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        for line in s.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
    assert events[0] == "run.created" and "step.approved" in events and events[-2:] == ["run.succeeded", "end"]
    body = api(platform, "GET", f"/v1/workflows/runs/{run_id}", platform["alice"]).json()
    assert body["status"] == "succeeded" and body["output"] == {"result": 42} and body["owner"] != "cli"
    r = api(platform, "POST", f"/v1/workflows/runs/{run_id}/cancel", platform["alice"])
    assert r.status_code == 409 and r.json()["error"]["type"] == "conflict_error"
    agents = api(platform, "GET", "/v1/agents", platform["bob"]).json()["data"]
    assert [a["name"] for a in agents] == ["assistant"]


@pytest.mark.parametrize("body, status, param", [
    ({}, 400, "workflow"),
    ({"workflow": "x", "definition": {"name": "x"}}, 400, "workflow"),
    ({"definition": {"name": "x", "steps": []}}, 400, "definition"),
    ({"definition": {"name": "x", "steps": [{"id": "a", "kind": "model", "prompt": "${steps.b.output}"}]}}, 400,
     "definition"),
    ({"definition": {"name": "x", "steps": [{"id": "a", "kind": "tool", "tool": "shell"}]}}, 400, "definition"),
    ({"definition": {"name": "x", "steps": [{"id": "a", "kind": "agent", "agent": "ghost", "task": "t"}]}}, 400,
     "definition"),
    ({"definition": {"name": "x", "steps": [{"id": "a", "kind": "model", "model": "nope", "prompt": "p"}]}}, 404,
     "model"),
    ({"definition": {"name": "x", "steps": [{"id": "a", "kind": "model", "model": CHAT, "prompt": "p"}]}}, 403,
     "model"),  # bob's key may use only `script`
    ({"workflow": "not-registered"}, 404, None),
    ({"definition": "name: [unclosed"}, 400, "definition"),
    ({"definition": {"name": "x", "steps": [{"id": "a", "kind": "approval"}]}, "surprise": 1}, 400, "surprise"),
    ({"definition": {"name": "x", "steps": [{"id": "a", "kind": "condition", "expr": "__import__('os').getcwd()"}]}},
     400, "definition"),  # refused when defined, not when the step runs
    ({"definition": {"name": "x", "steps": [{"id": "a", "kind": "tool", "tool": "calculator",
                                            "foreach": "${inputs.xs}", "args": {"expression": "${item}"}}]},
      "inputs": {"xs": list(range(1001))}}, 400, "definition"),  # over agents.max_foreach_items
])
def test_bad_run_requests_are_clear_4xx_and_start_nothing(platform, body, status, param):
    before = api(platform, "GET", "/v1/workflows/runs", platform["admin"]).json()["data"]
    r = api(platform, "POST", "/v1/workflows/runs", platform["bob"], json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and (param is None or err["param"] == param)
    assert api(platform, "GET", "/v1/workflows/runs", platform["admin"]).json()["data"] == before


def test_http_auth_and_unknown_runs(platform):
    assert httpx.get(platform["base"] + "/v1/workflows/runs").status_code == 401
    assert httpx.get(platform["base"] + "/v1/agents").status_code == 401
    assert api(platform, "GET", "/v1/workflows/runs/run_missing").status_code == 404
    assert api(platform, "GET", "/v1/workflows/runs/..%2f..%2fetc").status_code == 404
    assert api(platform, "GET", "/v1/workflows/runs/run_missing/events").status_code == 404


def test_cli_run_status_approve_and_agents(platform, tmp_path):
    from cluster.cli import app

    env = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    runner = CliRunner()
    cfg = ["--config", str(platform["config"])]

    def cli(*args):
        r = runner.invoke(app, [*args, *cfg], env=env)
        r.text = " ".join(r.output.split())
        return r

    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump({"name": "cli-flow", "steps": [
        {"id": "sum", "kind": "tool", "tool": "calculator", "args": {"expression": "${inputs.a} + 1"}}]}))
    r = cli("workflows", "run", str(path), "--input", "a=41", "--wait")
    assert r.exit_code == 0, r.output
    assert "step.succeeded" in r.text and "succeeded" in r.text
    r = cli("workflows", "register", str(path))
    assert r.exit_code == 0 and "registered cli-flow" in r.text
    r = cli("workflows", "run", "cli-flow", "--input", "a=1", "--wait", "--json")
    assert r.exit_code == 0 and '"result": 2' in r.output
    assert "cli-flow" in cli("workflows", "list").text
    r = cli("agents", "list")
    assert r.exit_code == 0 and "assistant" in r.text and "calculator" in r.text
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsteps: [{id: a, kind: tool, tool: shell}]\n")
    r = cli("workflows", "run", str(bad))
    assert r.exit_code == 2 and "unknown tool 'shell'" in r.text
    assert cli("workflows", "run", str(tmp_path / "missing.yaml")).exit_code == 2
    assert cli("workflows", "run", str(path), "--input", "novalue").exit_code == 2
    r = cli("workflows", "status", "run_nope")
    assert r.exit_code == 2 and "no workflow run" in r.text
    r = cli("workflows", "approve", "run_nope")
    assert r.exit_code == 2


def test_a_runs_model_calls_are_made_for_the_key_that_started_it(platform):
    # A model step and an agent step, started over HTTP by alice: both model calls are charged to
    # her key in the ledger (they were the platform's own "internal" calls before), at its price.
    wf = {"name": "on-behalf", "agents": [{"name": "pricer", "model": "script-tools",
                                             "instructions": script('{"answer": "from the agent"}')}],
          "steps": [{"id": "ask", "kind": "model", "model": "script-tools",
                     "system": script("from the model step"), "prompt": "hello"},
                    {"id": "delegate", "kind": "agent", "agent": "pricer", "task": "hi", "needs": ["ask"]}]}
    r = api(platform, "POST", "/v1/workflows/runs", platform["alice"], json={"definition": wf})
    assert r.status_code == 201, r.text
    run = wait_done(coord(platform), r.json()["id"])
    assert run["status"] == "succeeded", run
    deadline = time.monotonic() + 30
    while True:
        usage = api(platform, "GET", "/v1/usage", platform["alice"]).json()
        calls = usage["by_model"].get("script-tools", {}).get("requests", 0)
        if calls >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert calls >= 2, usage
    assert usage["totals"]["cost_usd"] > 0
    assert set(usage["by_key"]) == {usage["key_id"]}


def test_status_and_cancel_are_answered_while_the_engine_is_stalled(platform):
    """Status and cancel have the coordinator's own control group (its own event loop): they are
    answered while the loop that runs steps is held (here inside a step's checkpoint I/O: the run's
    event log is a FIFO nobody reads, a stand-in for a hung disk or NFS write), and a cancel takes
    effect at once: it is checkpointed while the engine is still held, no fan-out item starts
    after it, and the items in flight are cancelled (none of them is recorded as done)."""
    import os
    import uuid

    from agents.checkpoints import CheckpointStore
    from agents.coordinator import checkpoint_root
    from security.encryption import field_cipher

    effects, settings = platform["effects"], platform["settings"]
    width = settings.agents.max_parallel_steps
    wf = {"name": "stall", "inputs": {"xs": list(range(width * 3))},
          "steps": [{"id": "fan", "kind": "tool", "tool": "http_get", "foreach": "${inputs.xs}",
                     "args": {"url": effects.url + "/gate/stall-${item}"}}]}
    c = coord(platform)
    run_id = "run_stall_" + uuid.uuid4().hex[:8]
    ray.get(c.start_run.remote(wf, run_id=run_id))

    def started() -> int:
        return sum(n for name, n in list(effects.hits.items()) if name.startswith("stall-"))

    deadline = time.monotonic() + 120
    while started() < width:  # a full wave of items in flight at their gates
        assert time.monotonic() < deadline, started()
        time.sleep(0.05)
    store = CheckpointStore(checkpoint_root(settings), field_cipher(settings))
    log = os.path.join(store.root, "runs", run_id, "events.jsonl")
    os.remove(log)
    os.mkfifo(log)  # the next event the engine writes blocks its loop until someone reads
    try:
        effects.release("stall-0")  # item 0 ends: its checkpoint is written, then its event blocks
        while "0" not in store.load(run_id).steps["fan"].item_outputs:
            assert time.monotonic() < deadline, "item 0 was never checkpointed"
            time.sleep(0.05)
        status = ray.get(c.get_run.remote(run_id), timeout=30)  # a guard: on a held loop it never comes
        assert status["status"] == "running" and status["steps"]["fan"]["status"] == "running", status
        in_flight = started()
        cancel = c.cancel.remote(run_id)
        while not store.load(run_id).cancel_requested:  # durable while the engine is still held
            assert time.monotonic() < deadline, "the cancel did not take effect while the engine was held"
            time.sleep(0.05)
    finally:
        _unblock(log)
        for i in range(width * 3):
            effects.release(f"stall-{i}")
    assert ray.get(cancel, timeout=60)["status"] == "cancelled"
    run = wait_done(c, run_id)
    assert run["status"] == "cancelled" and run["steps"]["fan"]["status"] == "cancelled", run
    assert list(run["steps"]["fan"]["item_outputs"]) == ["0"]  # the items in flight were cancelled, not done
    assert started() == in_flight == width  # no item started after the cancel


def test_approve_events_and_start_are_answered_while_the_engine_is_stalled(platform):
    """Approve (control group), the event stream (events group) and starting a run (intake group)
    do not queue behind the loop that drives the runs: with that loop held inside a step's event
    write (the FIFO stand-in for a hung disk, as above), an approval is checkpointed and its event
    streamed over SSE, a new run is admitted with 201, and nothing that follows from either has
    happened yet (the loop is still held); once it is released, all of it runs to the end."""
    import os
    import uuid

    from agents.checkpoints import CheckpointStore
    from agents.coordinator import checkpoint_root
    from security.encryption import field_cipher

    effects, settings = platform["effects"], platform["settings"]
    store = CheckpointStore(checkpoint_root(settings), field_cipher(settings))
    c = coord(platform)
    calc = {"id": "calc", "kind": "tool", "tool": "calculator", "args": {"expression": "2+2"}}
    gated = ray.get(c.start_run.remote({"name": "gate-held", "steps": [
        {"id": "gate", "kind": "approval"}, {**calc, "needs": ["gate"]}]}))["id"]
    wait_status(c, gated, "awaiting_approval")
    tag = uuid.uuid4().hex[:8]
    held = ray.get(c.start_run.remote({"name": "hold", "steps": [
        {"id": "hold", "kind": "tool", "tool": "http_get", "args": {"url": f"{effects.url}/gate/hold-{tag}"}}]}))["id"]
    effects.wait_hits(f"hold-{tag}", 1)
    log = os.path.join(store.root, "runs", held, "events.jsonl")
    os.remove(log)
    os.mkfifo(log)  # the step's next event blocks the engine's loop until someone reads
    deadline = time.monotonic() + 120
    try:
        effects.release(f"hold-{tag}")  # the step ends: its checkpoint is written, then its event blocks
        while store.load(held).steps["hold"].status != "succeeded":
            assert time.monotonic() < deadline, "the held step was never checkpointed"
            time.sleep(0.05)
        approved = ray.get(c.approve.remote(gated, None, "ops", True, "go"), timeout=30)  # a guard, not a bound
        assert approved["awaiting_approval"] == [] and store.load(gated).steps["gate"].approved_by == "ops"
        with httpx.stream("GET", f"{platform['base']}/v1/workflows/runs/{gated}/events", timeout=30,
                          headers={"Authorization": f"Bearer {platform['admin']}"}) as stream:
            assert stream.status_code == 200
            seen = []
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    seen.append(line.removeprefix("event: "))
                    if seen[-1] == "step.approved":
                        break
        assert "step.started" not in seen[seen.index("step.awaiting_approval"):], seen  # the loop is held
        r = api(platform, "POST", "/v1/workflows/runs", json={"definition": {"name": "while-held", "steps": [calc]}})
        assert r.status_code == 201, r.text
        started = r.json()["id"]
        assert store.load(held).status == "running" and store.load(started).steps["calc"].status == "pending"
    finally:
        effects.release(f"hold-{tag}")
        _unblock(log)
    for run_id in (held, gated, started):
        run = wait_done(c, run_id)
        assert run["status"] == "succeeded", run
    assert run["output"] == {"result": 4}


def test_a_lost_coordinator_is_a_transparent_retry_for_reads_and_a_503_for_writes(platform):
    """The workflows app holds a handle to a coordinator that is then lost for good (ray.kill, no
    restart): a read over HTTP is retried once on a fresh one, made on that use and resumed from
    the checkpoints (200, the run as it was); a write on a lost handle is a 503 with Retry-After,
    never a 500, and the call after it works."""
    calc = {"id": "calc", "kind": "tool", "tool": "calculator", "args": {"expression": "6*7"}}
    run_id = wait_done(coord(platform), ray.get(coord(platform).start_run.remote(
        {"name": "survives", "steps": [calc]}))["id"])["id"]
    for lose in ("read", "write"):
        assert api(platform, "GET", f"/v1/workflows/runs/{run_id}").status_code == 200  # the app has a handle
        c = coord(platform)
        ray.kill(c, no_restart=True)
        wait_dead(c)
        if lose == "read":
            r = api(platform, "GET", f"/v1/workflows/runs/{run_id}")
            assert r.status_code == 200 and r.json()["output"] == {"result": 42}, r.text
        else:
            r = api(platform, "POST", f"/v1/workflows/runs/{run_id}/cancel")
            assert r.status_code == 503 and r.headers["retry-after"].isdigit(), r.text
            assert r.json()["error"]["code"] == "service_unavailable"
            r = api(platform, "POST", f"/v1/workflows/runs/{run_id}/cancel")
            assert r.status_code == 409 and "already succeeded" in r.json()["error"]["message"], r.text


def _unblock(fifo: str) -> None:
    """Let the write held on `fifo` through and put a regular file in its place."""
    import os

    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the held open() for writing now completes
    plain = fifo + ".plain"
    open(plain, "w").close()
    os.replace(plain, fifo)  # later events go to a plain file
    got, deadline = b"", time.monotonic() + 60
    try:
        while time.monotonic() < deadline:  # until the held event is written and its writer is gone
            try:
                chunk = os.read(reader, 65536)
            except BlockingIOError:
                chunk = None
            if chunk:
                got += chunk
            elif chunk == b"" and got:
                break
            time.sleep(0.01)
    finally:
        os.close(reader)
    with open(fifo, "ab") as f:
        f.write(got)
