"""Chaos: model replicas killed under load on the session cluster (slow; runs in CI). The tiny
transformers model, streaming chat over real HTTP on 127.0.0.1, `ray.kill` on Serve's replica
actors. Figures (requests lost, seconds to recover) are printed for docs/benchmarks.md; the
assertions are on outcomes, never on time.

- two replicas, one killed while requests flow: no request fails before its first token (those
  are retried on the other replica); at most those already streaming from it are cut;
- one replica, killed: the circuit opens, and once Serve's new replica is healthy a passing probe
  re-admits it long before the breaker's cooldown (600 s here), so service comes back.
"""

import asyncio
import time

import httpx
import pytest
import ray
from ray import serve

from config import ModelSpec
from config.names import model_app_name
from harness import deployed, make_key, platform_settings

pytestmark = [pytest.mark.slow,
              # Written and committed but not yet run on a live cluster (the session's locked time ran
              # out before its turn): run `pytest tests/test_chaos.py -s` and drop this mark.
              pytest.mark.skip(reason="not yet run live; see the comment above")]

BODY = {"messages": [{"role": "user", "content": "Tell me about Ray."}], "max_tokens": 24, "stream": True}


def replicas(model: str) -> list[str]:
    """The names of a model's live Serve replica actors (no dashboard needed)."""
    prefix = f"SERVE_REPLICA::{model_app_name(model)}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and a["name"].startswith(prefix)]
    alive = []
    for name in names:
        try:
            ray.get_actor(name, namespace="serve")
            alive.append(name)
        except ValueError:
            pass
    return alive


def running_replicas(model: str) -> int:
    app = serve.status().applications.get(model_app_name(model))
    if app is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())


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
        tmp_path_factory.mktemp("chaos") / "data", serve_port,
        router={"breaker": {"cooldown_s": 600, "failure_threshold": 2}, "probe_interval_s": 60},
        models=[ModelSpec(id="two", engine="transformers", source=str(tiny_model_dir), max_context=256,
                          num_replicas=2, num_cpus=0.1),
                ModelSpec(id="one", engine="transformers", source=str(tiny_model_dir), max_context=256,
                          num_cpus=0.1)],
    )
    with deployed(settings):
        _, admin = make_key(settings, "admin")
        yield {"base": f"http://127.0.0.1:{serve_port}", "admin": admin}


def test_killing_one_of_two_replicas_fails_no_request_before_its_first_token(platform):
    assert len(replicas("two")) == 2

    async def load():
        outcomes: list[str] = []
        async with httpx.AsyncClient(base_url=platform["base"], timeout=120) as c:
            async def client():
                for _ in range(15):
                    outcomes.append(await stream_one(c, platform["admin"], "two"))

            async def killer():
                await asyncio.sleep(1.0)
                ray.kill(ray.get_actor(replicas("two")[0], namespace="serve"), no_restart=True)

            await asyncio.gather(killer(), *(client() for _ in range(4)))
        return outcomes

    outcomes = asyncio.run(load())
    lost = outcomes.count("failed") + outcomes.count("cut")
    print(f"\nCHAOS two replicas, one killed: {len(outcomes)} requests, {outcomes.count('failed')} failed before "
          f"their first token, {outcomes.count('cut')} cut mid-stream, {lost / len(outcomes):.1%} lost")
    assert outcomes.count("failed") == 0, outcomes
    assert outcomes.count("cut") <= 4  # at most what was streaming from the killed replica


def test_killing_the_only_replica_recovers_on_a_probe_not_the_cooldown(platform):
    async def one() -> str:
        async with httpx.AsyncClient(base_url=platform["base"], timeout=120) as c:
            return await stream_one(c, platform["admin"], "one")

    assert asyncio.run(one()) == "ok"
    killed = time.monotonic()
    ray.kill(ray.get_actor(replicas("one")[0], namespace="serve"), no_restart=True)
    failures = 0
    back_at = None
    while True:
        if back_at is None and running_replicas("one") >= 1 and replicas("one"):
            back_at = time.monotonic()
        outcome = asyncio.run(one())
        if outcome == "ok":
            break
        failures += 1
        assert time.monotonic() - killed < 300, "no recovery"  # a guard against hanging, not a timing check
        time.sleep(0.2)
    recovered = time.monotonic()
    print(f"\nCHAOS one replica killed: {failures} requests failed; served again {recovered - killed:.1f} s after "
          f"the kill, {recovered - (back_at or recovered):.1f} s after Serve reported the new replica running "
          f"(breaker cooldown 600 s)")
    assert failures >= 1  # the kill was seen...
    headers = {"Authorization": f"Bearer {platform['admin']}"}
    status = httpx.get(platform["base"] + "/v1/router/status", headers=headers, timeout=30).json()["backends"]["one"]
    assert status["state"] == "closed", status  # ...and the circuit closed again without its cooldown
