"""Chaos: Serve replicas killed under load on the session cluster (slow; runs in CI). The tiny
transformers model, streaming chat over real HTTP on 127.0.0.1, `ray.kill` on Serve's replica
actors. Figures (requests lost, seconds to recover) are printed for docs/benchmarks.md; the
assertions are on outcomes, never on time. The other kills of the chaos list have their own tests:
the Qdrant owner (tests/rag/test_store_owner_loss.py), an agent actor and the coordinator mid-run
(tests/agents/test_cluster.py), an ingest job and an ingest worker (tests/rag/test_ingest.py). The last test here restarts
the whole platform on its data directory.

- two replicas, one killed while requests flow: no request fails before its first token (those
  are retried on the other replica); at most those already streaming from it are cut;
- one replica, killed: requests wait in Serve's queue (or open the circuit, which a passing probe
  then closes) and service comes back long before the breaker's cooldown (600 s here);
- one of two gateway replicas, killed: what was in flight on it may be lost (its sockets die with
  it), never more than the clients' concurrency, and every request after the load is served.
"""

import asyncio
import json
import threading
import time

import httpx
import pytest
import ray
from ray import serve
from ray.serve._private.constants import SERVE_NAMESPACE

from config import ModelSpec
from config.names import GATEWAY_APP, model_app_name
from harness import deployed, make_key, platform_settings

pytestmark = pytest.mark.slow

BODY = {"messages": [{"role": "user", "content": "Tell me about Ray."}], "max_tokens": 24, "stream": True}


def replicas(app: str) -> list[str]:
    """The names of an application's live Serve replica actors (no dashboard needed)."""
    prefix = f"SERVE_REPLICA::{app}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == SERVE_NAMESPACE and a["name"].startswith(prefix)]
    alive = []
    for name in names:
        try:
            ray.get_actor(name, namespace=SERVE_NAMESPACE)
            alive.append(name)
        except ValueError:
            pass
    return alive


def kill(name: str) -> None:
    ray.kill(ray.get_actor(name, namespace=SERVE_NAMESPACE), no_restart=True)


def running_replicas(model: str) -> list[str]:
    """The actor names of the replicas Serve's controller reports RUNNING for `model`'s app (its
    instance details, as the REST API's /api/serve/applications/ gives them)."""
    from ray.serve.context import _get_global_client

    app = _get_global_client().get_serve_details().get("applications", {}).get(model_app_name(model))
    if app is None:
        return []
    return [r["actor_name"] for d in app["deployments"].values() for r in d["replicas"] if r["state"] == "RUNNING"]


async def stream_one(c: httpx.AsyncClient, key: str, model: str) -> str:
    """'ok', 'cut' (failed after its first token) or 'failed' (an error before any token)."""
    got_token = False
    try:
        async with c.stream("POST", "/v1/chat/completions", json={"model": model, **BODY},
                            headers={"Authorization": f"Bearer {key}"}) as r:
            if r.status_code != 200:
                await r.aread()
                return "failed"
            async for line in r.aiter_lines():
                if '"error"' in line:
                    return "cut" if got_token else "failed"
                if '"content"' in line:
                    got_token = True
                if line.strip() == "data: [DONE]":
                    return "ok"
    except httpx.HTTPError:
        pass
    return "cut" if got_token else "failed"


@pytest.fixture(scope="module")
def platform(serve_port, tiny_model_dir, tmp_path_factory):
    settings = platform_settings(
        tmp_path_factory.mktemp("chaos") / "data", serve_port, gateway={"num_replicas": 2},
        router={"breaker": {"cooldown_s": 600, "failure_threshold": 2}, "probe_interval_s": 60},
        agents={"enabled": True},  # the workflows API, for the full restart
        models=[ModelSpec(id="two", engine="transformers", source=str(tiny_model_dir), max_context=256,
                          num_replicas=2, num_cpus=0.1),
                ModelSpec(id="one", engine="transformers", source=str(tiny_model_dir), max_context=256,
                          num_cpus=0.1)],
    )
    with deployed(settings) as names:
        _, admin = make_key(settings, "admin")
        yield {"base": f"http://127.0.0.1:{serve_port}", "admin": admin, "settings": settings, "names": names}


CLIENTS = 4


def streams_through_a_kill(platform, app: str, each: int = 15, then: int = 0) -> tuple[list[str], list[str]]:
    """CLIENTS clients each stream `each` chats from model "two" while one of `app`'s two replicas
    is killed 1 s in; then `then` more requests one by one. Outcomes of both phases (`stream_one`)."""
    victims = replicas(app)
    assert len(victims) == 2, victims

    async def load():
        outcomes: list[str] = []
        async with httpx.AsyncClient(base_url=platform["base"], timeout=120) as c:
            async def client():
                for _ in range(each):
                    outcomes.append(await stream_one(c, platform["admin"], "two"))

            async def killer():
                await asyncio.sleep(1.0)
                kill(victims[0])

            await asyncio.gather(killer(), *(client() for _ in range(CLIENTS)))
            after = [await stream_one(c, platform["admin"], "two") for _ in range(then)]
        return outcomes, after

    outcomes, after = asyncio.run(load())
    lost = outcomes.count("failed") + outcomes.count("cut")
    print(f"\nCHAOS {app}: two replicas, one killed: {len(outcomes)} requests, {outcomes.count('failed')} failed "
          f"before their first token, {outcomes.count('cut')} cut mid-stream, {lost / len(outcomes):.1%} lost"
          + (f"; after: {after}" if then else ""))
    return outcomes, after


def test_killing_one_of_two_replicas_fails_no_request_before_its_first_token(platform):
    outcomes, _ = streams_through_a_kill(platform, model_app_name("two"))
    assert outcomes.count("failed") == 0, outcomes
    assert outcomes.count("cut") <= CLIENTS  # at most what was streaming from the killed replica


def test_killing_the_only_replica_comes_back_without_the_breakers_cooldown(platform):
    async def one() -> str:
        async with httpx.AsyncClient(base_url=platform["base"], timeout=120) as c:
            return await stream_one(c, platform["admin"], "one")

    assert asyncio.run(one()) == "ok"
    victim = replicas(model_app_name("one"))[0]
    killed = time.monotonic()
    kill(victim)
    back_at: list[float] = []  # when Serve first reports a replacement (another replica id) running

    def watch() -> None:
        # Not "any replica RUNNING": under load the controller can still report the killed one so.
        while time.monotonic() - killed < 300 and not back_at:
            if any(name != victim for name in running_replicas("one")):
                back_at.append(time.monotonic())
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    outcomes = []
    while not outcomes or outcomes[-1] != "ok":
        outcomes.append(asyncio.run(one()))  # a request sent while no replica runs waits in Serve's queue
        assert time.monotonic() - killed < 300, "no recovery"  # a guard against hanging, not a timing check
        if outcomes[-1] != "ok":
            time.sleep(0.2)
    recovered = time.monotonic()
    watcher.join()
    lag = f"{recovered - back_at[0]:.1f} s after Serve reported the new replica running " \
          f"({back_at[0] - killed:.1f} s after the kill)" if back_at else "before Serve reported a new replica running"
    print(f"\nCHAOS one replica killed: {len(outcomes) - 1} requests failed; served again {recovered - killed:.1f} s "
          f"after the kill, {lag} (breaker cooldown 600 s)")
    headers = {"Authorization": f"Bearer {platform['admin']}"}
    status = httpx.get(platform["base"] + "/v1/router/status", headers=headers, timeout=30).json()["backends"]["one"]
    # Served again well inside the 600 s cooldown: a passing probe (or no opening at all) readmitted it.
    # Half-open is readmitted too: the status may come from the other gateway replica, whose probe
    # passed but which has had no live request (its trial) since.
    assert status["state"] in ("closed", "half_open"), status


def test_killing_one_of_two_gateway_replicas_loses_at_most_what_was_in_flight(platform):
    outcomes, after = streams_through_a_kill(platform, GATEWAY_APP, each=10, then=6)
    assert outcomes.count("failed") + outcomes.count("cut") <= CLIENTS, outcomes  # one in flight per client
    assert after == ["ok"] * 6, after


def restart_platform(settings, names: list[str]) -> None:
    """What `orfeas down` then `orfeas up` do to the platform, on the session cluster: every ORFEAS
    Serve application removed and every ORFEAS actor (key store, ledger, coordinator, vector store
    owner, audit log, ...) gone, then all of it started again from the data directory alone."""
    from cluster.deploy import deploy, wait_running
    from config.names import ACTOR_NAMESPACE

    for name in names:
        serve.delete(name)
    actors = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == ACTOR_NAMESPACE]
    for name in actors:
        try:
            ray.kill(ray.get_actor(name, namespace=ACTOR_NAMESPACE), no_restart=True)
        except ValueError:
            pass
    while any(a["namespace"] == ACTOR_NAMESPACE for a in ray.util.list_named_actors(all_namespaces=True)):
        time.sleep(0.1)  # ray.kill lands asynchronously
    assert sorted(deploy(settings)) == sorted(names)
    states = wait_running(names, timeout_s=300)
    assert all(v == "RUNNING" for v in states.values()), states


def test_a_full_restart_on_the_same_data_directory_loses_and_repeats_nothing(platform):
    """Restarted with vector points, a workflow run waiting at its approval gate, API keys and
    ledger rows on disk: the same points, keys that still authenticate, the ledger rows unchanged
    (and one more for the next request, never a repeat), and the run resumes and finishes once,
    its finished step not run again. The time until it serves again is printed (docs/benchmarks.md)."""
    from analytics.ledger import ledger, ledger_name
    from rag.store import open_store

    settings, base = platform["settings"], platform["base"]
    record, key = make_key(settings, "user", name="restart")
    auth = {"Authorization": f"Bearer {key}"}
    chat = {"model": "two", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for _ in range(2):
        assert httpx.post(base + "/v1/chat/completions", json=chat, headers=auth, timeout=120).status_code == 200
    store = open_store(settings)
    store.create_collection("restart", 4)
    store.upsert("restart", [{"id": i, "dense": [1.0, float(i), 0, 0], "sparse_indices": [i], "sparse_values": [1.0],
                              "payload": {"doc_id": f"d{i}", "doc_hash": "h", "n_chunks": 1, "chunk_index": 0,
                                          "text": f"t{i}"}} for i in range(1, 6)])
    store.flush("restart")
    wf = {"name": "restart", "steps": [
        {"id": "a", "kind": "tool", "tool": "calculator", "args": {"expression": "20+1"}},
        {"id": "gate", "kind": "approval", "needs": ["a"]},
        {"id": "b", "kind": "tool", "tool": "calculator", "args": {"expression": "${steps.a.output.result} * 2"},
         "needs": ["gate"]}]}
    r = httpx.post(base + "/v1/workflows/runs", json={"definition": wf}, headers=auth, timeout=60)
    assert r.status_code == 201, r.text
    run_url = base + f"/v1/workflows/runs/{r.json()['id']}"
    deadline = time.monotonic() + 120
    while httpx.get(run_url, headers=auth, timeout=60).json()["status"] != "awaiting_approval":
        assert time.monotonic() < deadline, "the run never reached its gate"  # a guard, not a timing check
        time.sleep(0.1)
    _, ledger_file = ledger_name(settings.resolved_data_dir())
    book = ledger(settings.resolved_data_dir(), settings)
    while ray.get(book.usage.remote(record["id"]))["totals"]["requests"] < 2:  # settled after the answer
        assert time.monotonic() < deadline, "the chats never reached the ledger"
        time.sleep(0.1)
    rows = ledger_file.read_text().splitlines()
    usage = ray.get(book.usage.remote())

    down = time.monotonic()
    restart_platform(settings, platform["names"])
    running = time.monotonic()
    assert open_store(settings).count("restart") == 5
    assert ray.get(ledger(settings.resolved_data_dir(), settings).usage.remote()) == usage
    assert ledger_file.read_text().splitlines() == rows
    while True:  # the first request the restarted platform serves
        try:
            served = httpx.post(base + "/v1/chat/completions", json=chat, headers=auth, timeout=120).status_code
        except httpx.HTTPError:
            served = None
        if served == 200:
            break
        assert time.monotonic() - down < 300, "not serving again"  # a guard against hanging
        time.sleep(0.2)
    back = time.monotonic()
    bad = httpx.post(base + "/v1/chat/completions", json=chat, headers={"Authorization": "Bearer sk-not-a-key"},
                     timeout=60)
    assert bad.status_code == 401
    run = httpx.get(run_url, headers=auth, timeout=60).json()
    assert run["status"] == "awaiting_approval" and run["steps"]["a"]["attempts"] == 1, run
    r = httpx.post(run_url + "/approve", json={}, headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    while (run := httpx.get(run_url, headers=auth, timeout=60).json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() - back < 120, run  # a guard
        time.sleep(0.1)
    assert run["status"] == "succeeded" and run["output"] == {"result": 42}, run
    assert run["steps"]["a"]["attempts"] == 1 and run["steps"]["b"]["attempts"] == 1
    assert run["analytics"]["resumed"] == 1
    with httpx.stream("GET", run_url + "/events", headers=auth, timeout=60) as s:
        events = [line[7:] for line in s.iter_lines() if line.startswith("event: ")]
    assert events.count("run.succeeded") == 1 and events.count("run.created") == 1, events
    book = ledger(settings.resolved_data_dir(), settings)
    while ray.get(book.usage.remote(record["id"]))["totals"]["requests"] < 3:
        assert time.monotonic() - back < 120, "the request after the restart never reached the ledger"
        time.sleep(0.1)
    new_rows = ledger_file.read_text().splitlines()
    assert new_rows[:len(rows)] == rows  # nothing lost or rewritten...
    ids = [json.loads(line).get("response_id") for line in new_rows]
    assert len([i for i in ids if i]) == len({i for i in ids if i})  # ...and nothing recorded twice
    print(f"\nCHAOS full restart: applications running again {running - down:.1f} s after the restart began, "
          f"first request served after {back - down:.1f} s; 5/5 points, {len(rows)} ledger rows, key, and the "
          "run waiting at its gate all kept; the run finished once, its first step not run again")
