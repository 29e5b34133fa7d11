"""Role-based access: which permissions a role grants, and the one pure function that decides.

A permission is `resource:action` (see PERMISSIONS). A role grants a set of them: the built-in
roles below, plus custom roles from `auth.roles` (each names its permissions and may inherit
other roles). A principal carries the permissions its role resolved to when it authenticated,
and its scopes: the models, collections and endpoints its credential may reach (None: every
one) and an expiry.

`decide(principal, permission, resource, now)` is the only place that answers "may this caller
do this": the HTTP layer's dependencies, the router's model checks, the RAG app's collection
checks and the workflow routes all ask it. It is a pure function of its arguments, so the
property test in tests/test_rbac.py can check that no role reaches what it was not granted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from security.auth import Principal

# Every permission there is, by resource. Resource-scoped ones (the credential's scopes narrow
# them further) are marked in SCOPED.
PERMISSIONS: tuple[str, ...] = (
    "models:list", "models:use",
    "collections:query", "collections:ingest", "collections:delete",
    "workflows:read", "workflows:run", "workflows:approve", "workflows:define",
    "agents:read",
    "keys:read", "keys:manage",
    "teams:read", "teams:manage",
    "roles:read", "roles:manage",
    "budgets:manage", "limits:manage",
    "usage:read_own", "usage:read_all",
    "audit:read",
    "privacy:erase",
    "admin:settings",
    "endpoints:call",
)
# Which scope of the principal narrows a permission (the resource is a model id, a collection
# name, or a request path).
SCOPED: dict[str, str] = {
    "models:use": "models",
    "collections:query": "collections", "collections:ingest": "collections", "collections:delete": "collections",
    "endpoints:call": "endpoints",
}

BUILTIN_ROLES: dict[str, frozenset[str]] = {
    "admin": frozenset(PERMISSIONS),
    "developer": frozenset({
        "models:list", "models:use", "collections:query", "collections:ingest", "workflows:read",
        "workflows:run", "workflows:approve", "workflows:define", "agents:read", "usage:read_own",
        "endpoints:call"}),
    # A user's runs are their own (the workflow routes show and settle only the runs a key started):
    # they may define, run and approve them; ingesting into collections is a developer's.
    "user": frozenset({
        "models:list", "models:use", "collections:query", "workflows:read", "workflows:run", "workflows:define",
        "workflows:approve", "agents:read", "usage:read_own", "endpoints:call"}),
    "viewer": frozenset({"models:list", "workflows:read", "agents:read", "usage:read_own", "endpoints:call"}),
    "auditor": frozenset({"models:list", "audit:read", "usage:read_own", "usage:read_all", "keys:read",
                          "teams:read", "roles:read", "endpoints:call"}),
}


class RoleError(ValueError):
    """A role definition that cannot be used (unknown permission, unknown or cyclic parent)."""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # why not (empty when allowed); names only what the caller asked for

    def __bool__(self) -> bool:
        return self.allowed


ALLOW = Decision(True, "")


def role_table(custom: Mapping[str, tuple[Iterable[str], Iterable[str]]] | None = None) -> dict[str, frozenset[str]]:
    """Built-in roles plus custom ones, each `name -> (permissions, inherits)`, resolved to the
    set of permissions each role grants. Raises RoleError naming the bad role and value."""
    custom = dict(custom or {})
    for name in custom:
        if name in BUILTIN_ROLES:
            raise RoleError(f"role {name!r} is built in and cannot be redefined")
    known = set(PERMISSIONS)
    resolved: dict[str, frozenset[str]] = dict(BUILTIN_ROLES)

    def resolve(name: str, path: tuple[str, ...]) -> frozenset[str]:
        if name in resolved:
            return resolved[name]
        if name in path:
            raise RoleError(f"role {name!r} inherits itself: {' -> '.join((*path, name))}")
        if name not in custom:
            raise RoleError(f"role {path[-1]!r} inherits unknown role {name!r}")
        perms, parents = custom[name]
        perms = set(perms)
        bad = sorted(perms - known)
        if bad:
            raise RoleError(f"role {name!r}: unknown permission {bad[0]!r}; permissions are {', '.join(PERMISSIONS)}")
        for parent in parents:
            perms |= resolve(parent, (*path, name))
        resolved[name] = frozenset(perms)
        return resolved[name]

    for name in custom:
        resolve(name, ())
    return resolved


def grants(role: str, table: Mapping[str, frozenset[str]] | None = None) -> frozenset[str]:
    """What a role grants (nothing for a role the table does not know)."""
    return (table if table is not None else BUILTIN_ROLES).get(role, frozenset())


def in_scope(scope: tuple[str, ...] | None, resource: str) -> bool:
    """A scope of names or glob patterns (`docs-*`, `/v1/rag/*`); None is every resource."""
    return scope is None or any(s == resource or fnmatchcase(resource, s) for s in scope)


def decide(principal: Principal, permission: str, resource: str | None = None, now: float = 0.0) -> Decision:
    """May `principal` exercise `permission` (on `resource`, for scoped permissions) at `now`?

    Allowed only when the credential has not expired, its role grants the permission, and the
    resource is inside the credential's scope for that permission. Denials say what was asked
    for, never what else exists."""
    if permission not in PERMISSIONS:
        raise ValueError(f"unknown permission {permission!r}")
    if principal.expires_at is not None and now >= principal.expires_at:
        return Decision(False, f"credential {principal.key_id} has expired")
    if permission not in principal.grants:
        return Decision(False, f"role {principal.role!r} does not grant {permission}")
    scope_name = SCOPED.get(permission)
    if scope_name is not None and resource is not None:
        if not in_scope(getattr(principal, scope_name), resource):
            what = {"models": "model", "collections": "collection", "endpoints": "endpoint"}[scope_name]
            return Decision(False, f"this credential may not use {what} {resource!r}")
    return ALLOW
