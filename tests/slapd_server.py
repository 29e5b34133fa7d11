"""A real OpenLDAP server (Debian's `slapd`) on a loopback port, with its own config and database
in a temp dir (never the system one), seeded with users and groups for directory-sync tests."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

BASE = "dc=example,dc=org"
ADMIN_DN, ADMIN_PASSWORD = f"cn=admin,{BASE}", "admin-secret"
SCHEMAS = ("core", "cosine", "nis", "inetorgperson")
PLACEHOLDER = f"cn=placeholder,{BASE}"


def slapd_binary() -> str | None:
    return shutil.which("slapd") or (Path("/usr/sbin/slapd").exists() and "/usr/sbin/slapd") or None


class Slapd:
    def __init__(self, root: Path, port: int):
        self.root, self.port = Path(root), port
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def start(self) -> "Slapd":
        db = self.root / "db"
        db.mkdir(parents=True, exist_ok=True)
        conf = self.root / "slapd.conf"
        conf.write_text("\n".join([
            *(f"include /etc/ldap/schema/{s}.schema" for s in SCHEMAS),
            f"pidfile {self.root}/slapd.pid",
            "modulepath /usr/lib/ldap", "moduleload back_mdb",
            "database mdb", f'suffix "{BASE}"', f'rootdn "{ADMIN_DN}"', f"rootpw {ADMIN_PASSWORD}",
            f"directory {db}", "maxsize 16777216", "",
        ]))
        # -d 0: stay in the foreground (a child we own and stop), logging nothing.
        self.proc = subprocess.Popen([slapd_binary(), "-f", str(conf), "-h", f"{self.url}/", "-d", "0"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while True:
            try:
                self.connection().unbind()
                break
            except Exception:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"slapd exited: {self.proc.stderr.read().decode()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError("slapd did not start")
                time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def connection(self):
        import ldap3

        return ldap3.Connection(ldap3.Server(self.url, connect_timeout=2), ADMIN_DN, ADMIN_PASSWORD,
                                auto_bind=ldap3.AUTO_BIND_NO_TLS)

    def seed(self, users: list[str], groups: dict[str, list[str]]) -> None:
        """Users under ou=people (uid=...), groups (groupOfNames) under ou=groups."""
        conn = self.connection()
        try:
            conn.add(BASE, ["dcObject", "organization"], {"o": "Example", "dc": "example"})
            conn.add(f"ou=people,{BASE}", ["organizationalUnit"], {"ou": "people"})
            conn.add(f"ou=groups,{BASE}", ["organizationalUnit"], {"ou": "groups"})
            for u in users:
                assert conn.add(self.user_dn(u), ["inetOrgPerson"], {"uid": u, "cn": u, "sn": u}), conn.result
            for name, members in groups.items():
                # groupOfNames needs a member: a placeholder (not a user) keeps a group valid when
                # its last user leaves, as directories commonly do.
                assert conn.add(self.group_dn(name), ["groupOfNames"],
                                {"cn": name, "member": [PLACEHOLDER, *(self.user_dn(m) for m in members)]}), conn.result
        finally:
            conn.unbind()

    def remove_member(self, group: str, user: str) -> None:
        import ldap3

        conn = self.connection()
        try:
            assert conn.modify(self.group_dn(group), {"member": [(ldap3.MODIFY_DELETE, [self.user_dn(user)])]}), \
                conn.result
        finally:
            conn.unbind()

    @staticmethod
    def user_dn(uid: str) -> str:
        return f"uid={uid},ou=people,{BASE}"

    @staticmethod
    def group_dn(cn: str) -> str:
        return f"cn={cn},ou=groups,{BASE}"
