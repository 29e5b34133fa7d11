"""Compliance controls: the running configuration, the data directory's state and the rendered
Kubernetes manifests checked against a control list, per profile (GDPR, HIPAA, SOC 2); and a
privacy impact assessment draft from the data inventory.

    facts = gather_facts(settings)                      # reads the data directory (no cluster)
    report = evaluate(settings, "soc2", manifests, facts, inventory)

Every control returns evidence lines, each `ok` True (holds), False (does not) or None (not
evaluated: no manifests given, say). A control fails when any line fails, is skipped when none
was evaluated, passes otherwise. A profile names the controls it requires; the others are
reported as advisory. The report's result is `fail` when a required control fails, `incomplete`
when one was skipped, else `pass`. Nothing here writes; `security/compliance_report.py` writes
the JSON and the PDF, `agents/compliance.py` runs it all with the inventory and alerts.

Settings that a build does not have yet (TLS for the ingress, redaction of prompts to remote
providers) are read defensively by name: absent is reported as "not configured", a fail, with
that evidence, never as a pass.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Callable, Iterable

PROFILES = ("gdpr", "hipaa", "soc2")
ADMIN_ONLY = ("keys:manage", "roles:manage", "admin:settings", "privacy:erase", "teams:manage",
              "budgets:manage", "limits:manage")


class ComplianceError(ValueError):
    """Input a check cannot use (an unknown profile, unreadable manifests); the message says which."""


@dataclass
class Evidence:
    ok: bool | None
    text: str


@dataclass
class ControlResult:
    id: str
    title: str
    required: bool
    status: str  # pass | fail | skipped
    evidence: list[Evidence] = field(default_factory=list)


@dataclass
class Facts:
    """What the data directory shows (gather_facts); tests build it the same way."""

    audit: dict[str, Any] | None  # verify_log's report, None when there is no log yet
    audit_dir: str
    keys: list[dict[str, Any]]  # key records, public fields
    mfa_enrolled: set[str]
    kek_file: str
    kek_mode: int | None  # None: no key file (yet, or the KEK comes from the environment)
    kek_from_env: bool
    newest_backup: float | None  # mtime of the newest file under compliance.backup_dir


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise ComplianceError(f"unknown compliance profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return profile


# --- facts ----------------------------------------------------------------------------------------

def gather_facts(settings: Any) -> Facts:
    from security.audit import AuditError, audit_dir, verify_log
    from security.keyproviders import ENV_KEY
    from security.keys import KeyFile

    data = settings.resolved_data_dir()
    adir = audit_dir(settings)
    audit: dict[str, Any] | None = None
    if (adir / "audit.jsonl").exists():
        try:
            audit = verify_log(adir).to_dict()
        except AuditError as e:
            audit = {"ok": False, "entries": 0, "first_bad": None, "problem": str(e)}
    keys_path = data / "auth" / "keys.json"
    try:
        keys = [r.public() for r in KeyFile(keys_path).load().values()]
    except (OSError, ValueError) as e:
        raise ComplianceError(f"cannot read the key file {keys_path}: {e}") from e
    mfa_path = data / "auth" / "mfa.json"
    try:
        enrolled = set(json.loads(mfa_path.read_text())["enrolments"]) if mfa_path.exists() else set()
    except (OSError, ValueError, KeyError) as e:
        raise ComplianceError(f"cannot read the MFA enrolments {mfa_path}: {e}") from e
    kek = data / "keys" / "kek.json"
    mode = stat.S_IMODE(kek.stat().st_mode) if kek.exists() else None
    return Facts(audit, str(adir), keys, enrolled, str(kek), mode, bool(os.environ.get(ENV_KEY)),
                 _newest_file(settings.compliance.backup_dir))


def _newest_file(directory: str) -> float | None:
    if not directory or not Path(directory).is_dir():
        return None
    newest = None
    for root, _, files in os.walk(directory):
        for f in files:
            try:
                t = os.stat(os.path.join(root, f)).st_mtime
            except OSError:
                continue
            newest = t if newest is None else max(newest, t)
    return newest


# --- manifests ------------------------------------------------------------------------------------

def load_manifests(path: str | Path) -> list[dict[str, Any]]:
    """The objects of a rendered YAML stream (`orfeas k8s render -o dev > x.yaml`)."""
    import yaml

    p = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
    except OSError as e:
        raise ComplianceError(f"cannot read the manifests {p}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ComplianceError(f"the manifests {p} are not YAML: {str(e).splitlines()[0]}") from e
    bad = [i for i, d in enumerate(docs) if not isinstance(d, dict) or "kind" not in d]
    if bad:
        raise ComplianceError(f"the manifests {p}: document {bad[0]} is not a Kubernetes object (no kind)")
    if not docs:
        raise ComplianceError(f"the manifests {p} hold no objects")
    return docs


def _oid(o: dict[str, Any]) -> str:
    return f"{o.get('kind')}/{(o.get('metadata') or {}).get('name')}"


def _ray_pod_specs(o: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    spec, kind = o.get("spec") or {}, o.get("kind")
    clusters = []
    if kind == "RayService":
        clusters.append(spec.get("rayClusterConfig") or {})
    elif kind == "RayCluster":
        clusters.append(spec)
    elif kind == "RayJob":
        clusters.append(spec.get("rayClusterSpec") or {})
    elif kind == "RayCronJob":
        clusters.append((spec.get("jobTemplate") or {}).get("rayClusterSpec") or {})
    for c in clusters:
        groups = [("head", c.get("headGroupSpec") or {})]
        groups += [(g.get("groupName", "workers"), g) for g in c.get("workerGroupSpecs") or []]
        for name, g in groups:
            pod = (g.get("template") or {}).get("spec") or {}
            if pod:
                yield f"{_oid(o)} {name}", pod


def _env(pod: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in pod.get("containers") or []:
        for e in c.get("env") or []:
            out[e.get("name")] = e.get("value", e.get("valueFrom"))
    return out


# --- the controls ---------------------------------------------------------------------------------

@dataclass
class Context:
    settings: Any
    manifests: list[dict[str, Any]] | None
    facts: Facts
    now: float


def c_encryption_at_rest(ctx: Context) -> list[Evidence]:
    s, f = ctx.settings, ctx.facts
    e = s.encryption
    out = [Evidence(bool(e.enabled), f"encryption.enabled is {e.enabled} (chunk text, workflow checkpoints "
                    "and events, ledger details, audit details, shared agent state: AES-256-GCM)"),
           Evidence(not e.allow_plaintext_reads, f"encryption.allow_plaintext_reads is {e.allow_plaintext_reads}")]
    if e.enabled and e.provider == "local":
        if f.kek_from_env:
            out.append(Evidence(True, "the KEK comes from ORFEAS_ENCRYPTION_KEY (a Secret), not a file"))
        elif f.kek_mode is None:
            out.append(Evidence(True, f"no KEK file yet ({f.kek_file}): it is created with mode 0600 on first use"))
        else:
            out.append(Evidence(f.kek_mode & 0o077 == 0, f"KEK file {f.kek_file} has mode {f.kek_mode:04o}"))
    elif e.enabled:
        out.append(Evidence(True, f"the KEK is held by encryption.provider {e.provider}"))
    if ctx.manifests is not None and e.enabled and e.provider == "local":
        pods = list(p for o in ctx.manifests if o.get("kind") == "RayService" for p in _ray_pod_specs(o))
        missing = [w for w, pod in pods if "ORFEAS_ENCRYPTION_KEY" not in _env(pod)]
        out.append(Evidence(bool(pods) and not missing, "manifests: every RayService pod reads "
                            "ORFEAS_ENCRYPTION_KEY from a Secret" if not missing and pods else
                            f"manifests: pods without ORFEAS_ENCRYPTION_KEY: {', '.join(missing) or 'no RayService'}"))
    return out


def c_transit_ingress(ctx: Context) -> list[Evidence]:
    out: list[Evidence] = []
    tls = ctx.settings.serve.tls
    out.append(Evidence(tls.enabled, "serve.tls: " + (f"HTTPS with {tls.certfile}" if tls.enabled else
                        "not configured (Serve's proxy answers plain HTTP)")))
    if ctx.manifests is not None:
        ingresses = [o for o in ctx.manifests if o.get("kind") == "Ingress"]
        for o in ingresses:
            spec = o.get("spec") or {}
            covered = {h for t in spec.get("tls") or [] for h in t.get("hosts") or []}
            hosts = {r.get("host") for r in spec.get("rules") or [] if r.get("host")}
            uncovered = sorted(hosts - covered)
            ok = bool(spec.get("tls")) and not uncovered
            out.append(Evidence(ok, f"manifests: {_oid(o)} terminates TLS for {', '.join(sorted(covered)) or '-'}"
                                + (f"; not for {', '.join(uncovered)}" if uncovered else "")))
        if not ingresses:
            out.append(Evidence(False, "manifests: no Ingress (nothing terminates TLS at the edge)"))
    return out


def c_transit_ray(ctx: Context) -> list[Evidence]:
    if ctx.manifests is None:
        return [Evidence(None, "manifests not given: Ray's intra-cluster TLS not evaluated")]
    pods = [p for o in ctx.manifests for p in _ray_pod_specs(o)]
    plain = [w for w, pod in pods if str(_env(pod).get("RAY_USE_TLS", "0")).lower() not in ("1", "true")]
    if not pods:
        return [Evidence(None, "manifests: no Ray pods")]
    return [Evidence(not plain, f"manifests: RAY_USE_TLS=1 in {len(pods) - len(plain)} of {len(pods)} Ray pod "
                     "specs" + (f"; not in {', '.join(plain[:6])}{' ...' if len(plain) > 6 else ''}" if plain else ""))]


def c_audit_enabled(ctx: Context) -> list[Evidence]:
    s = ctx.settings
    return [Evidence(bool(s.audit.enabled), f"audit.enabled is {s.audit.enabled}"),
            Evidence(s.pii.enabled and s.pii.audit == "redact", f"PII in audit details: pii.enabled "
                     f"{s.pii.enabled}, pii.audit {s.pii.audit}"),
            Evidence(True, f"signed checkpoints every {s.audit.checkpoint_every} entries / {s.audit.checkpoint_s:g} s")]


def c_audit_verify(ctx: Context) -> list[Evidence]:
    a = ctx.facts.audit
    if a is None:
        return [Evidence(False, f"no audit log at {ctx.facts.audit_dir}: nothing has been recorded")]
    if not a.get("ok"):
        return [Evidence(False, f"`orfeas audit verify` fails at position {a.get('first_bad')}: {a.get('problem')}")]
    return [Evidence(True, f"`orfeas audit verify` passes: {a.get('entries')} entries, {a.get('checkpoints')} "
                     f"signed checkpoints, head {str(a.get('head', ''))[:16]}")]


def c_retention(ctx: Context) -> list[Evidence]:
    r = ctx.settings.retention
    out = [Evidence(r.usage_events_days is not None, f"retention.usage_events_days: {r.usage_events_days}"),
           Evidence(r.logs_days is not None, f"retention.logs_days: {r.logs_days}"),
           Evidence(r.workflow_runs_days is not None, f"retention.workflow_runs_days: {r.workflow_runs_days}"),
           Evidence(r.threads_days is not None, f"retention.threads_days: {r.threads_days}"),
           Evidence(r.collection_days is not None or bool(r.collections),
                    f"collections: retention.collection_days {r.collection_days}, per collection "
                    f"{dict(r.collections) or 'none'}")]
    if ctx.manifests is not None:
        crons = [o for o in ctx.manifests if o.get("kind") == "RayCronJob"
                 and "jobs.retention" in str(((o.get("spec") or {}).get("jobTemplate") or {}).get("entrypoint", ""))]
        active = [o for o in crons if not (o.get("spec") or {}).get("suspend")]
        out.append(Evidence(bool(active), f"manifests: retention scheduled by {', '.join(_oid(o) for o in active)} "
                            f"({(active[0]['spec'].get('schedule'))})" if active else
                            "manifests: no active RayCronJob runs jobs.retention"))
    return out


def _active_admin_keys(ctx: Context) -> list[dict[str, Any]]:
    return [k for k in ctx.facts.keys if k.get("role") == "admin" and not k.get("revoked_at")
            and not (k.get("expires_at") and k["expires_at"] <= ctx.now)]


def c_mfa_admins(ctx: Context) -> list[Evidence]:
    m = ctx.settings.auth.mfa
    out = [Evidence(ctx.settings.auth.enabled, f"auth.enabled is {ctx.settings.auth.enabled}"),
           Evidence(m.admin == "required", f"auth.mfa.admin is {m.admin!r} (admin permissions need MFA evidence)")]
    admins = _active_admin_keys(ctx)
    without = [k["id"] for k in admins if k["id"] not in ctx.facts.mfa_enrolled]
    if m.admin_keys == "required":
        out.append(Evidence(True, "auth.mfa.admin_keys is 'required': every admin key must send a TOTP code"))
    else:
        out.append(Evidence(not without, f"auth.mfa.admin_keys is {m.admin_keys!r}: {len(admins) - len(without)} of "
                            f"{len(admins)} active admin keys have a TOTP enrolled"
                            + (f"; not {', '.join(without)}" if without else "")))
    return out


def c_least_privilege(ctx: Context) -> list[Evidence]:
    from security import rbac

    s = ctx.settings
    out: list[Evidence] = []
    try:
        table = rbac.role_table({n: (r.permissions, r.inherits) for n, r in s.auth.roles.items()})
    except rbac.RoleError as e:
        return [Evidence(False, f"auth.roles cannot be resolved: {e}")]
    broad = {name: sorted(p & set(ADMIN_ONLY)) for name, p in table.items() if name != "admin" and p & set(ADMIN_ONLY)}
    out.append(Evidence(not broad, "no role but admin grants administrative permissions" if not broad else
                        "roles beside admin granting administrative permissions: "
                        + "; ".join(f"{n}: {', '.join(p)}" for n, p in sorted(broad.items()))))
    admins = _active_admin_keys(ctx)
    cap = s.compliance.max_admin_keys
    out.append(Evidence(len(admins) <= cap, f"{len(admins)} active admin API keys (compliance.max_admin_keys {cap})"))
    unknown = sorted({k["role"] for k in ctx.facts.keys if not k.get("revoked_at") and k["role"] not in table})
    if unknown:
        out.append(Evidence(False, f"active keys with roles this configuration does not define: {', '.join(unknown)}"))
    if ctx.manifests is not None:
        for o in ctx.manifests:
            if o.get("kind") in ("Role", "ClusterRole"):
                wild = [i for i, r in enumerate(o.get("rules") or [])
                        if "*" in (r.get("verbs") or []) + (r.get("resources") or []) + (r.get("apiGroups") or [])]
                out.append(Evidence(not wild, f"manifests: {_oid(o)} " + ("grants no wildcard" if not wild else
                                    f"rules {wild} use a wildcard verb, resource or API group")))
            if o.get("kind") in ("RoleBinding", "ClusterRoleBinding"):
                ref = (o.get("roleRef") or {}).get("name")
                if ref in ("cluster-admin", "admin", "edit"):
                    out.append(Evidence(False, f"manifests: {_oid(o)} binds the broad built-in role {ref}"))
    return out


def _durable_claims(manifests: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(namespace, claim) of every PersistentVolumeClaim and StatefulSet claim template."""
    out = []
    for o in manifests:
        ns = (o.get("metadata") or {}).get("namespace", "")
        if o.get("kind") == "PersistentVolumeClaim":
            out.append((ns, (o.get("metadata") or {}).get("name")))
        if o.get("kind") == "StatefulSet":
            for t in (o.get("spec") or {}).get("volumeClaimTemplates") or []:
                out.append((ns, f"{(o.get('metadata') or {}).get('name')}/{(t.get('metadata') or {}).get('name')}"))
    return out


def c_backups(ctx: Context) -> list[Evidence]:
    c = ctx.settings.compliance
    out: list[Evidence] = []
    if not c.backup_dir:
        out.append(Evidence(False, f"compliance.backup_dir is not set: no backups of {ctx.settings.resolved_data_dir()} "
                            "(API keys, audit chain, ledger, workflow checkpoints, collections)"))
    elif ctx.facts.newest_backup is None:
        out.append(Evidence(False, f"no backup under compliance.backup_dir {c.backup_dir}"))
    else:
        age = (ctx.now - ctx.facts.newest_backup) / 86400
        out.append(Evidence(age <= c.backup_max_age_days, f"newest backup under {c.backup_dir} is {age:.1f} days old "
                            f"(compliance.backup_max_age_days {c.backup_max_age_days:g})"))
    if ctx.manifests is not None:
        claims = _durable_claims(ctx.manifests)
        schedules = [o for o in ctx.manifests if o.get("kind") == "Schedule"
                     and str(o.get("apiVersion", "")).startswith("velero.io/")]
        spaces = {n for o in schedules for n in (((o.get("spec") or {}).get("template") or {})
                                                 .get("includedNamespaces") or ["*"])}
        bare = [f"{ns}/{name}" for ns, name in claims if not any(fnmatchcase(ns or "default", p) for p in spaces)]
        out.append(Evidence(bool(claims) and not bare, f"manifests: {len(claims) - len(bare)} of {len(claims)} durable "
                            "volume claims covered by a backup Schedule (velero.io)"
                            + (f"; not {', '.join(bare)}" if bare else "")))
    return out


def c_pii_policy(ctx: Context) -> list[Evidence]:
    p = ctx.settings.pii
    out = [Evidence(bool(p.enabled), f"pii.enabled is {p.enabled} ({', '.join(p.entities)})"),
           Evidence(p.ingest in ("tag", "redact"), f"pii.ingest is {p.ingest!r} (chunks holding PII tagged or redacted)"),
           Evidence(p.logs == "redact", f"pii.logs is {p.logs!r}"),
           Evidence(p.audit == "redact", f"pii.audit is {p.audit!r}")]
    remote = [m.id for m in ctx.settings.models if m.engine == "openai"]
    if remote:
        policy = {m: p.remote_prompts_models.get(m, p.remote_prompts) for m in remote}
        out.append(Evidence(all(v != "off" for v in policy.values()), "prompts to remote providers: " +
                            ", ".join(f"{m} {v}" for m, v in policy.items()) + " (pii.remote_prompts)"))
    else:
        out.append(Evidence(True, "no remote providers in the catalog: prompts stay in the cluster"))
    return out


ALL = frozenset(PROFILES)
# id, title, profiles that require it, check
CONTROLS: tuple[tuple[str, str, frozenset[str], Callable[[Context], list[Evidence]]], ...] = (
    ("encryption.at_rest", "Encryption at rest (envelope keys, KEK protected)", ALL, c_encryption_at_rest),
    ("encryption.in_transit.ingress", "Encryption in transit: TLS at the HTTP ingress", ALL, c_transit_ingress),
    ("encryption.in_transit.ray", "Encryption in transit: Ray's intra-cluster TLS", frozenset({"hipaa", "soc2"}),
     c_transit_ray),
    ("audit.enabled", "Audit logging on, details redacted", ALL, c_audit_enabled),
    ("audit.verify", "Audit chain verifies (tamper evidence)", ALL, c_audit_verify),
    ("retention.set", "Retention periods set and enforced", frozenset({"gdpr", "hipaa"}), c_retention),
    ("access.mfa_admins", "MFA for administrators", frozenset({"hipaa", "soc2"}), c_mfa_admins),
    ("access.least_privilege", "Least-privilege roles and keys", ALL, c_least_privilege),
    ("backups.durable_state", "Backups of durable state", frozenset({"hipaa", "soc2"}), c_backups),
    ("pii.policy", "PII detection and redaction policy", frozenset({"gdpr", "hipaa"}), c_pii_policy),
)


def required_controls(profile: str) -> list[str]:
    check_profile(profile)
    return [cid for cid, _, profiles, _ in CONTROLS if profile in profiles]


def _status(evidence: list[Evidence]) -> str:
    if any(e.ok is False for e in evidence):
        return "fail"
    return "pass" if any(e.ok for e in evidence) else "skipped"


def evaluate(settings: Any, profile: str, manifests: list[dict[str, Any]] | None, facts: Facts,
             inventory: list[dict[str, Any]] | None = None, *, manifests_source: str = "",
             now: float | None = None) -> dict[str, Any]:
    """The report: every control's status and evidence, the profile's result, and the privacy
    impact assessment draft (from `inventory`, the collections' sampled PII; None: not scanned)."""
    check_profile(profile)
    ctx = Context(settings, manifests, facts, time.time() if now is None else now)
    controls = []
    for cid, title, profiles, check in CONTROLS:
        try:
            evidence = check(ctx)
        except Exception as e:  # a control that cannot be evaluated fails, saying why
            evidence = [Evidence(False, f"the check itself failed: {type(e).__name__}: {e}")]
        controls.append(ControlResult(cid, title, profile in profiles, _status(evidence), evidence))
    req = [c for c in controls if c.required]
    result = ("fail" if any(c.status == "fail" for c in req) else
              "incomplete" if any(c.status == "skipped" for c in req) else "pass")
    return {
        "object": "compliance.report", "profile": profile, "result": result, "generated_at": ctx.now,
        "data_dir": str(settings.resolved_data_dir()),
        "manifests": manifests_source or ("not evaluated" if manifests is None else f"{len(manifests)} objects"),
        "summary": {s: sum(1 for c in req if c.status == s) for s in ("pass", "fail", "skipped")},
        "controls": [asdict(c) for c in controls],
        "privacy_impact": privacy_impact(settings, facts, inventory),
    }


# --- privacy impact assessment --------------------------------------------------------------------

def _role_table(settings: Any) -> dict[str, frozenset[str]]:
    from security import rbac

    try:
        return rbac.role_table({n: (r.permissions, r.inherits) for n, r in settings.auth.roles.items()})
    except rbac.RoleError:
        return dict(rbac.BUILTIN_ROLES)


def readers(settings: Any, facts: Facts, permission: str, resource: str | None = None,
            scope_field: str | None = None) -> dict[str, Any]:
    """Who can read: the roles granting `permission`, and the active keys holding such a role
    whose scope (`scope_field`, e.g. collections) reaches `resource`."""
    table = _role_table(settings)
    roles = sorted(r for r, perms in table.items() if permission in perms)
    keys = []
    for k in facts.keys:
        if k.get("revoked_at") or k.get("role") not in roles:
            continue
        scope = k.get(scope_field) if scope_field else None
        if resource is not None and scope is not None and not any(fnmatchcase(resource, p) for p in scope):
            continue
        keys.append(k["id"])
    return {"roles": roles, "keys": sorted(keys)}


def privacy_impact(settings: Any, facts: Facts, inventory: list[dict[str, Any]] | None) -> dict[str, Any]:
    """A draft PIA: the data stores, which PII types each holds, who can read them, how they are
    protected and kept, and the risks that stand out."""
    enc = settings.encryption.enabled
    r = settings.retention
    stores: list[dict[str, Any]] = []
    risks: list[str] = []
    for c in inventory or []:
        days = r.collections.get(c["collection"], r.collection_days)
        who = readers(settings, facts, "collections:query", c["collection"], "collections")
        found = sorted(set(c.get("pii", {})) | set(c.get("tagged", {})))
        stores.append({"store": f"collection {c['collection']} ({c['physical']})", "pii_types": found,
                       "pii_counts": c.get("pii", {}), "tagged": c.get("tagged", {}),
                       "sampled": c.get("sampled", 0), "points": c.get("points", 0),
                       "data_subjects": c.get("subjects", 0), "readers": who,
                       "encrypted_at_rest": enc, "retention_days": days})
        if found:
            risks.append(f"collection {c['collection']} holds {', '.join(found)} (in {c.get('sampled', 0)} sampled "
                         f"chunks) readable by roles {', '.join(who['roles'])} and {len(who['keys'])} key(s)"
                         + ("" if days is not None else "; kept for ever (no retention period)")
                         + ("" if settings.pii.ingest != "off" else "; pii.ingest is off: not tagged or redacted"))
    fixed = [
        ("usage ledger", ["key ids", "user ids", "teams", "request metadata"], "usage:read_all", r.usage_events_days),
        ("audit log", ["actor ids", "source IP addresses", "details (encrypted, PII redacted)"], "audit:read", None),
        ("workflow runs", ["inputs, outputs and approvals (user content, encrypted)"], "workflows:read",
         r.workflow_runs_days),
        ("API keys", ["the user and name a key was given"], "keys:read", None),
        ("conversation threads", ["questions and answers (user content, encrypted)", "key ids", "user ids"],
         "collections:query", r.threads_days),
    ]
    for name, kinds, perm, days in fixed:
        stores.append({"store": name, "pii_types": kinds, "readers": readers(settings, facts, perm),
                       "encrypted_at_rest": enc or name == "API keys", "retention_days": days})
    if inventory is None:
        risks.append("collections were not scanned (no cluster reached): their PII types are unknown")
    if not enc:
        risks.append("encryption at rest is off: every store above holds its content in plaintext")
    return {"draft": True, "stores": stores, "risks": risks,
            "method": f"up to {settings.compliance.pii_sample} chunks per collection scanned with Presidio "
                      f"(offline pattern recognizers: {', '.join(settings.pii.entities)}) plus ingest's pii: tags; "
                      "readers from the RBAC roles granting each store's read permission and the active keys "
                      "whose scopes reach it"}
