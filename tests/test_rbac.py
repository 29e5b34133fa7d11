"""RBAC: one pure policy function (security.rbac.decide); no role reaches what it was not granted."""

import time

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from security import rbac
from security.auth import Principal, principal_of
from security.rbac import BUILTIN_ROLES, PERMISSIONS, SCOPED, RoleError, decide, role_table

names = st.text(alphabet="abcxyz-*", min_size=1, max_size=5)
scopes = st.one_of(st.none(), st.lists(names, max_size=3).map(tuple))
custom_roles = st.dictionaries(
    st.sampled_from(["ops", "analyst", "bot", "lead"]),
    st.tuples(st.sets(st.sampled_from(PERMISSIONS), max_size=6),
              st.lists(st.sampled_from(["viewer", "user", "auditor"]), max_size=2)),
    max_size=3)


def granted_by(role: str, custom: dict) -> set[str]:
    """What a role grants, worked out independently of role_table: its own permissions and,
    transitively, its parents'."""
    if role in BUILTIN_ROLES:
        return set(BUILTIN_ROLES[role])
    perms, parents = custom[role]
    out = set(perms)
    for p in parents:
        out |= granted_by(p, custom)
    return out


@hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(custom=custom_roles, role=st.sampled_from([*BUILTIN_ROLES, "ops", "analyst", "bot", "lead", "nobody"]),
       models=scopes, collections=scopes, endpoints=scopes, expires=st.one_of(st.none(), st.floats(0, 200)),
       permission=st.sampled_from(PERMISSIONS), resource=st.one_of(st.none(), names), now=st.floats(0, 200))
def test_property_no_role_reaches_what_it_was_not_granted(custom, role, models, collections, endpoints, expires,
                                                          permission, resource, now):
    table = role_table(custom)
    p = Principal("k1", role, models, collections=collections, endpoints=endpoints, expires_at=expires,
                  permissions=rbac.grants(role, table))
    d = decide(p, permission, resource, now)
    known = role in BUILTIN_ROLES or role in custom
    if d.allowed:
        assert known and permission in granted_by(role, custom)
        assert expires is None or now < expires
        scope = {"models": models, "collections": collections, "endpoints": endpoints}.get(SCOPED.get(permission))
        if SCOPED.get(permission) and resource is not None and scope is not None:
            assert rbac.in_scope(scope, resource)
    else:
        assert d.reason
        # a denial names only what was asked for: no other model, collection or endpoint
        for other in (models or ()) + (collections or ()) + (endpoints or ()):
            if other != resource:
                assert repr(other) not in d.reason
    # and the converse: what was granted, in scope and unexpired is allowed
    if known and permission in granted_by(role, custom) and (expires is None or now < expires):
        scope = {"models": models, "collections": collections, "endpoints": endpoints}.get(SCOPED.get(permission))
        if not SCOPED.get(permission) or resource is None or scope is None or rbac.in_scope(scope, resource):
            assert d.allowed


@pytest.mark.parametrize("role", sorted(BUILTIN_ROLES))
def test_builtin_roles_deny_everything_they_do_not_grant(role):
    p = Principal("k", role, None)
    for perm in PERMISSIONS:
        assert decide(p, perm, None, 0.0).allowed == (perm in BUILTIN_ROLES[role]), (role, perm)
    assert not Principal("k", "viewer", None).may_use("any-model")
    assert Principal("k", "auditor", None).allows("audit:read") and not Principal("k", "auditor", None).is_admin


def test_scopes_globs_and_expiry():
    p = Principal("k", "developer", ("tiny-*",), collections=("docs", "team-a-*"), endpoints=("/v1/chat/*",),
                  expires_at=100.0)
    assert decide(p, "models:use", "tiny-chat", 1).allowed and not decide(p, "models:use", "gpt", 1).allowed
    assert decide(p, "collections:ingest", "team-a-x", 1).allowed
    denied = decide(p, "collections:query", "secret", 1)
    assert not denied.allowed and "secret" in denied.reason and "team-a" not in denied.reason
    assert decide(p, "endpoints:call", "/v1/chat/completions", 1).allowed
    assert not decide(p, "endpoints:call", "/v1/embeddings", 1).allowed
    assert "expired" in decide(p, "models:use", "tiny-chat", 100.0).reason
    with pytest.raises(ValueError, match="unknown permission"):
        decide(p, "models:fly", None, 1)


def test_custom_roles_from_config_are_checked():
    table = role_table({"ops": (["keys:manage"], ["viewer"]), "lead": ([], ["ops", "developer"])})
    assert table["ops"] == BUILTIN_ROLES["viewer"] | {"keys:manage"}
    assert "collections:ingest" in table["lead"] and "keys:manage" in table["lead"]
    with pytest.raises(RoleError, match="unknown permission 'keys:steal'"):
        role_table({"x": (["keys:steal"], [])})
    with pytest.raises(RoleError, match="inherits itself"):
        role_table({"a": ([], ["b"]), "b": ([], ["a"])})
    with pytest.raises(RoleError, match="unknown role 'ghost'"):
        role_table({"a": ([], ["ghost"])})
    with pytest.raises(RoleError, match="built in"):
        role_table({"admin": ([], [])})


def test_key_records_become_principals_with_team_user_budgets_and_limits():
    record = {"id": "abcd1234", "role": "ops", "models": ["m"], "collections": None, "endpoints": ["/v1/*"],
              "expires_at": time.time() + 60, "user": "alice", "team": "red", "budget_usd": 1.0,
              "budget_period": "day", "limits": {"requests_per_minute": 5},
              "account": {"team": {"name": "red", "budget_usd": 10.0, "budget_period": "month",
                                   "limits": {"concurrent": 2}},
                          "user": {"id": "alice", "budget_usd": 3.0, "budget_period": "month"}}}
    p = principal_of(record, role_table({"ops": (["keys:manage", "models:use"], [])}))
    assert p.allows("keys:manage") and p.may_use("m") and not p.may_use("n") and not p.is_admin
    assert [(b.scope, b.id, b.usd) for b in p.all_budgets()] == [("key", "abcd1234", 1.0), ("team", "red", 10.0),
                                                                ("user", "alice", 3.0)]
    assert p.rate_limit.requests_per_minute == 5 and p.team_rate_limit.concurrent == 2
