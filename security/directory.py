"""Directory sync: LDAP / Active Directory groups mapped to ORFEAS roles and teams (ldap3).

`read_directory` reads the configured groups (`auth.directory.groups`: group cn or DN -> role
and/or team) and their members, and answers `{user: {"role", "team", "groups"}}`, the user named
by `user_attribute` (uid; on AD sAMAccountName). A `DirectoryStore` actor (detached, made by
config/actors.py's helper) keeps the last answer, syncs every `interval_s` and on demand
(`orfeas directory sync`); the Authenticator gives a token or session user the role and team
the last sync found (security/auth.py `directory_role`), so a user removed from a group loses
the role at the next sync. A failed sync keeps the last good answer and reports the error.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from typing import Any

from config import Settings, settings_from_dict
from config.actors import detached_actor
from config.settings import DirectorySettings

log = logging.getLogger(__name__)


class DirectoryError(Exception):
    """The directory could not be read: the message names the server and what failed."""


def _rdn_value(dn: str, attribute: str) -> str | None:
    first = dn.split(",", 1)[0]
    name, _, value = first.partition("=")
    return value.strip() if name.strip().lower() == attribute.lower() and value else None


def read_directory(d: DirectorySettings) -> dict[str, dict[str, Any]]:
    """Users of the mapped groups with the role (by role_priority) and team their groups give."""
    import ldap3
    from ldap3.core.exceptions import LDAPException

    wanted = {g.group.lower(): g for g in d.groups}
    password = os.environ.get(d.bind_password_env, "") if d.bind_password_env else ""
    try:
        seconds = max(1, round(d.timeout_s))  # ldap3 packs these into socket options as ints
        server = ldap3.Server(d.url, connect_timeout=seconds, get_info=ldap3.NONE)
        conn = ldap3.Connection(server, user=d.bind_dn or None, password=password or None,
                                receive_timeout=seconds, auto_bind=ldap3.AUTO_BIND_NO_TLS, read_only=True)
    except LDAPException as e:
        raise DirectoryError(f"cannot bind to {d.url} as {d.bind_dn or 'anonymous'}: {e}") from None
    try:
        conn.search(d.group_base_dn, d.group_filter, search_scope=ldap3.SUBTREE,
                    attributes=["cn", *d.member_attributes])
        groups = list(conn.entries)
        users: dict[str, dict[str, Any]] = {}
        names: dict[str, str | None] = {}
        for entry in groups:
            cn = str(entry.cn.value) if "cn" in entry.entry_attributes else ""
            mapping = wanted.get(cn.lower()) or wanted.get(entry.entry_dn.lower())
            if mapping is None:
                continue
            for attribute in d.member_attributes:
                if attribute not in entry.entry_attributes:
                    continue
                for member in entry[attribute].values:
                    member = str(member)
                    if member not in names:
                        names[member] = _rdn_value(member, d.user_attribute) or _lookup(conn, member, d.user_attribute)
                    user = names[member]
                    if not user:
                        continue
                    u = users.setdefault(user, {"roles": [], "team": "", "groups": []})
                    u["groups"].append(cn or entry.entry_dn)
                    if mapping.role:
                        u["roles"].append(mapping.role)
                    if mapping.team and not u["team"]:
                        u["team"] = mapping.team
    except LDAPException as e:
        raise DirectoryError(f"reading groups under {d.group_base_dn!r} from {d.url} failed: {e}") from None
    finally:
        conn.unbind()
    out = {}
    for user, u in users.items():
        role = next((r for r in d.role_priority if r in u["roles"]), u["roles"][0] if u["roles"] else "")
        out[user] = {"role": role, "team": u["team"], "groups": sorted(set(u["groups"]))}
    return out


def _lookup(conn, dn: str, attribute: str) -> str | None:
    import ldap3

    if not conn.search(dn, "(objectClass=*)", search_scope=ldap3.BASE, attributes=[attribute]) or not conn.entries:
        return None
    value = conn.entries[0][attribute].value if attribute in conn.entries[0].entry_attributes else None
    return str(value) if value else None


class DirectoryStore:
    """The last directory answer, synced periodically and on demand; run as a detached actor."""

    def __init__(self, settings: dict):
        self.settings: Settings = settings_from_dict(settings)
        self.users: dict[str, dict] = {}
        self.synced_at: float | None = None
        self.error: str | None = None
        self.syncs = 0
        self._loop: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> bool:
        """Start the periodic sync (idempotent)."""
        if self._loop is None or self._loop.done():
            self._loop = asyncio.get_running_loop().create_task(self._every())
        return True

    async def _every(self) -> None:
        while True:
            await self.sync()
            await asyncio.sleep(self.settings.auth.directory.interval_s)

    async def sync(self) -> dict:
        """Read the directory now; on failure keep the last good answer."""
        async with self._lock:
            try:
                users = await asyncio.to_thread(read_directory, self.settings.auth.directory)
            except DirectoryError as e:
                self.error = str(e)
                log.warning("directory sync failed (keeping the last answer): %s", e)
            else:
                self.users, self.synced_at, self.error = users, time.time(), None
                self.syncs += 1
            return self.status()

    def status(self) -> dict:
        return {"users": len(self.users), "synced_at": self.synced_at, "error": self.error, "syncs": self.syncs}

    async def get_users(self) -> dict[str, dict]:
        return self.users


def directory_store(settings: Settings, start: bool = True):
    """The cluster's directory actor (created on first use, its periodic sync started)."""
    d = settings.auth.directory
    name = "orfeas-directory-" + hashlib.sha1(f"{settings.resolved_data_dir()}|{d.url}".encode()).hexdigest()[:10]
    # The bind password travels in the actor's own environment: a worker inherits the raylet's,
    # which may predate the variable (set by an operator or a Secret in this process only).
    env = {d.bind_password_env: os.environ[d.bind_password_env]} if os.environ.get(d.bind_password_env) else {}
    actor = detached_actor(DirectoryStore, name, settings.to_dict(),
                           **({"runtime_env": {"env_vars": env}} if env else {}))
    if start:
        actor.start.remote()
    return actor
