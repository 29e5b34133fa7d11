"""`orfeas keys|teams|roles`: the admin API (serve/admin_api.py) over HTTP.

Every command calls the gateway (`cluster.local.api_url`) with an admin credential: `--key`
(default `$ORFEAS_API_KEY`), else the token `orfeas login` stored. The one exception is the
bootstrap: `orfeas keys create` with no credential at all writes to the key store actor directly,
which only works on a machine that can join the cluster (the head): that is how the very first
admin key is made (and a lost one replaced). An error of the API is printed as its message, exit
status 2 for bad input (400/404/422), 1 otherwise.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Optional

import httpx
import typer

from cluster.console import ConfigOpt, JsonOpt, connected, console, err, fail, print_json, settings_or_exit, table
from config import Settings

KeyOpt = Annotated[Optional[str], typer.Option(
    "--key", envvar="ORFEAS_API_KEY", show_envvar=True,
    help="An admin API key (default: $ORFEAS_API_KEY, else the token of `orfeas login`).")]
PeriodOpt = Annotated[str, typer.Option(help="day or month")]

keys_app = typer.Typer(help="Create, list and revoke API keys, set their budgets and limits (the admin API; "
                       "with no credential, `keys create` is the head machine's bootstrap of the first admin key).",
                       no_args_is_help=True)
teams_app = typer.Typer(help="Teams' budgets and rate limits (the admin API).", no_args_is_help=True)
roles_app = typer.Typer(help="Roles and the permissions they grant (the admin API).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
    app.add_typer(teams_app, name="teams")
    app.add_typer(roles_app, name="roles")


class AdminClient:
    """The admin API at the gateway, called with one bearer credential."""

    def __init__(self, settings: Settings, credential: str | None):
        from cluster.local import api_url

        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        self.http = httpx.Client(base_url=api_url(settings) + "/v1/admin", headers=headers, timeout=60)

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        """The response's JSON; an error ends the command with the API's message."""
        try:
            r = self.http.request(method, path, json=body)
        except httpx.HTTPError as e:
            fail(f"cannot reach the admin API at {self.http.base_url}: {e}")
        if r.status_code >= 400:
            fail(_message(r), 2 if r.status_code in (400, 404, 422) else 1)
        return r.json()


def _message(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return f"the admin API answered {r.status_code}: {r.text[:200]}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):  # FastAPI's validation errors
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail)
    return f"the admin API answered {r.status_code}: {str(body)[:200]}"


def credential_of(key: str | None) -> str | None:
    """`--key` / $ORFEAS_API_KEY, else the stored `orfeas login` token, else None."""
    from cluster.identity_cli import stored_token

    return (key or "").strip() or stored_token()


def client(settings: Settings, key: str | None) -> AdminClient:
    """The admin API client; without a credential (and with auth on) the command ends saying how to get one."""
    credential = credential_of(key)
    if credential is None and settings.auth.enabled:
        fail("no admin credential: pass --key, set $ORFEAS_API_KEY or run `orfeas login` (the first admin key "
             "comes from `orfeas up`, or `orfeas keys create --role admin` on the head machine)", 2)
    return AdminClient(settings, credential)


def _csv(value: str | None) -> list[str] | None:
    return [m.strip() for m in value.split(",") if m.strip()] if value else None


def _limits(rpm: int | None, tpm: int | None, concurrent: int | None) -> dict:
    return {"requests_per_minute": rpm, "tokens_per_minute": tpm, "concurrent": concurrent}


def _check_period(period: str, usd: float | None, message: str) -> None:
    if period not in ("day", "month") or (usd is not None and usd < 0):
        fail(message, 2)


def _limits_text(limits: dict | None) -> str:
    if not limits:
        return "-"
    short = {"requests_per_minute": "rpm", "tokens_per_minute": "tpm", "concurrent": "concurrent"}
    return ",".join(f"{short.get(k, k)}={v}" for k, v in limits.items() if v is not None) or "-"


def _budget_text(usd: float | None, period: str) -> str:
    return "-" if usd is None else f"${usd:g}/{period}"


# ------------------------------------------------------------------ keys

RpmOpt = Annotated[Optional[int], typer.Option("--rpm", min=1, help="Requests per minute.")]
TpmOpt = Annotated[Optional[int], typer.Option("--tpm", min=1, help="Tokens (prompt + completion) per minute.")]
ConcurrentOpt = Annotated[Optional[int], typer.Option("--concurrent", min=1, help="Requests in flight at once.")]


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="admin, developer, user, viewer, auditor or a role from auth.roles")] = "user",
    models: Annotated[Optional[str], typer.Option(help="Comma-separated model ids this key may use (default: all).")] = None,
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    team: Annotated[str, typer.Option(help="Team its usage is aggregated under.")] = "",
    budget_usd: Annotated[Optional[float], typer.Option("--budget-usd", help="Spend allowed per period.")] = None,
    budget_period: Annotated[str, typer.Option("--budget-period", help="day or month")] = "month",
    key: KeyOpt = None,
    config: ConfigOpt = None,
):
    """Create a key; it is printed once and only its hash is kept.

    With an admin credential this is POST /v1/admin/keys. With none at all it is the bootstrap of
    the first admin key: written to the key store directly, from a machine that can join the
    cluster (the head machine)."""
    _check_period(budget_period, budget_usd, "--budget-period must be day or month and --budget-usd not negative")
    settings = settings_or_exit(config)
    allowed = _csv(models)
    credential = credential_of(key)
    if credential is None and settings.auth.enabled:
        record, secret = _bootstrap_create(settings, config, role, allowed, name, team, budget_usd, budget_period)
    else:
        body = {"role": role, "models": allowed, "name": name, "team": team, "budget_usd": budget_usd,
                "budget_period": budget_period}
        created = AdminClient(settings, credential).call("POST", "/keys", body)
        record, secret = created, created["key"]
    console.print(f"key id {record['id']} ({role}" + (f", models: {','.join(allowed)}" if allowed else "") + ")")
    console.print(secret, highlight=False, soft_wrap=True)


def _bootstrap_create(settings: Settings, config, role, allowed, name, team, budget_usd, budget_period):
    """The key store actor called directly (no credential exists yet): checked here as the API would."""
    import ray

    from security.auth import role_table_of
    from security.keys import keystore

    roles = sorted(role_table_of(settings))
    if role not in roles:
        fail(f"--role must be one of {', '.join(roles)}, not {role!r}", 2)
    unknown = [m for m in allowed or [] if settings.model(m) is None]
    if unknown:
        fail(f"unknown model(s) {', '.join(unknown)}; the catalog has {', '.join(m.id for m in settings.models)}", 2)
    connected(config)
    err.print("no admin credential (--key, $ORFEAS_API_KEY, orfeas login): creating the key in the key store "
              "directly (bootstrap)")
    from cluster.compliance_cli import cli_actor
    from security.audit import audit_event

    details = {"role": role, "name": name, "team": team, "models": allowed, "bootstrap": True}
    try:
        record, key = ray.get(keystore(settings.resolved_data_dir()).create.remote(
            role, allowed, name, team, budget_usd, budget_period, roles=roles))
    except ray.exceptions.RayTaskError as e:
        audit_event(settings, "admin.key.create", {**details, "reason": str(getattr(e, "cause", e))[:300]},
                    actor=cli_actor(), outcome="error")
        fail(str(getattr(e, "cause", e)), 2)
    audit_event(settings, "admin.key.create", details, actor=cli_actor(), target=f"key:{record['id']}", wait=True)
    return record, key


# What the RayService's pods read as auth.bootstrap_key_env (kuberay/base/rayservice.yaml).
BOOTSTRAP_SECRET, BOOTSTRAP_SECRET_KEY = "orfeas-admin-bootstrap", "api-key"


@keys_app.command("bootstrap-secret")
def keys_bootstrap_secret(
    namespace: Annotated[str, typer.Option("--namespace", "-n", help="Namespace of the RayService.")] = "orfeas",
):
    """Print a Kubernetes Secret holding a freshly made admin key, for the first admin on a cluster.

    `orfeas keys bootstrap-secret | kubectl apply -f -` before the RayService starts: the gateway
    installs the key once (docs/access.md). The key is printed in the manifest only (stdout; its
    id goes to stderr) and kept nowhere else. Needs no cluster and no credential."""
    import yaml

    from security.keys import key_id_of, new_key

    key = new_key()
    manifest = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": BOOTSTRAP_SECRET, "namespace": namespace,
                             "labels": {"app.kubernetes.io/part-of": "orfeas"}},
                "stringData": {BOOTSTRAP_SECRET_KEY: key}}
    typer.echo(yaml.safe_dump(manifest, sort_keys=False), nl=False)
    err.print(f"admin key id {key_id_of(key)} (kept nowhere but this manifest and the Secret you apply; "
              "revoke it through the admin API once other admins exist)")


@keys_app.command("list")
def keys_list(key: KeyOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False):
    """List keys (ids, roles, models, team, budget, limits, state); never the keys themselves."""
    data = client(settings_or_exit(config), key).call("GET", "/keys")["data"]
    if as_json:
        print_json(data)
        return
    keys = table("id", "role", "models", "name", "team", "budget", "limits", "created", "state")
    for r in data:
        created = dt.datetime.fromtimestamp(r["created_at"]).strftime("%Y-%m-%d %H:%M")
        state = "revoked" if r.get("revoked_at") else "active"
        keys.add_row(r["id"], r["role"], ",".join(r.get("models") or ["*"]), r.get("name", ""), r.get("team") or "-",
                     _budget_text(r.get("budget_usd"), r.get("budget_period", "month")),
                     _limits_text(r.get("limits")), created, state)
    console.print(keys)


@keys_app.command("revoke")
def keys_revoke(key_id: str, key: KeyOpt = None, config: ConfigOpt = None):
    """Revoke a key by id (gateways stop accepting it within auth.key_cache_s seconds)."""
    client(settings_or_exit(config), key).call("DELETE", f"/keys/{key_id}")
    console.print(f"revoked {key_id}")


@keys_app.command("budget")
def keys_budget(
    key_id: str,
    usd: Annotated[Optional[float], typer.Option("--usd", help="Spend allowed per period; omit to remove.")] = None,
    period: PeriodOpt = "month",
    team: Annotated[Optional[str], typer.Option(help="Also set the key's team.")] = None,
    key: KeyOpt = None,
    config: ConfigOpt = None,
):
    """Set or clear a key's spending budget (refused with 429 once spent; gateways see it within
    auth.key_cache_s seconds)."""
    _check_period(period, usd, "--period must be day or month and --usd not negative")
    body: dict[str, Any] = {"budget_usd": usd, "budget_period": period}
    if team is not None:
        body["team"] = team
    record = client(settings_or_exit(config), key).call("PATCH", f"/keys/{key_id}", body)
    console.print(f"{key_id}: budget " + (f"${usd:g} per {period}" if usd is not None else "none")
                  + (f", team {record['team']}" if record.get("team") else ""))


@keys_app.command("limits")
def keys_limits(key_id: str, rpm: RpmOpt = None, tpm: TpmOpt = None, concurrent: ConcurrentOpt = None,
                key: KeyOpt = None, config: ConfigOpt = None):
    """Set a key's rate limits (those not given are cleared: the team's and rate_limits' defaults apply)."""
    record = client(settings_or_exit(config), key).call("PATCH", f"/keys/{key_id}",
                                                        {"limits": _limits(rpm, tpm, concurrent)})
    console.print(f"{key_id}: limits {_limits_text(record.get('limits'))}")


# ------------------------------------------------------------------ teams and roles


@teams_app.command("list")
def teams_list(key: KeyOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False):
    """Teams with their budgets and rate limits."""
    data = client(settings_or_exit(config), key).call("GET", "/teams")["data"]
    if as_json:
        print_json(data)
        return
    rows = table("team", "budget", "limits")
    for t in data:
        rows.add_row(t["name"], _budget_text(t.get("budget_usd"), t.get("budget_period", "month")),
                     _limits_text(t.get("limits")))
    console.print(rows)


@teams_app.command("set")
def teams_set(name: str,
              usd: Annotated[Optional[float], typer.Option("--usd", help="The team's spend per period; omit: none.")] = None,
              period: PeriodOpt = "month", rpm: RpmOpt = None, tpm: TpmOpt = None, concurrent: ConcurrentOpt = None,
              key: KeyOpt = None, config: ConfigOpt = None):
    """Create or replace a team's budget and rate limits (PUT: what is not given is cleared)."""
    _check_period(period, usd, "--period must be day or month and --usd not negative")
    limits = _limits(rpm, tpm, concurrent)
    body = {"budget_usd": usd, "budget_period": period,
            "limits": limits if any(v is not None for v in limits.values()) else None}
    t = client(settings_or_exit(config), key).call("PUT", f"/teams/{name}", body)
    console.print(f"team {t['name']}: budget {_budget_text(t.get('budget_usd'), t.get('budget_period', 'month'))}, "
                  f"limits {_limits_text(t.get('limits'))}")


@roles_app.command("list")
def roles_list(key: KeyOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False):
    """Roles (built-in and from auth.roles) and the permissions each grants."""
    data = client(settings_or_exit(config), key).call("GET", "/roles")["data"]
    if as_json:
        print_json(data)
        return
    rows = table("role", "built-in", "permissions")
    for r in data:
        rows.add_row(r["name"], "yes" if r["builtin"] else "no", ", ".join(r["permissions"]))
    console.print(rows)
