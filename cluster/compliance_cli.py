"""`orfeas audit ...` and `orfeas encryption ...`: the audit chain (verify, export, checkpoint)
and key management (list, rotate the KEK, rotate a data key and re-encrypt); `orfeas privacy
erase`, `orfeas lineage`, and `orfeas compliance check|schedule`. `cluster/cli.py` calls `register(app)`.

`audit verify` and `audit export` read the files under the data directory and need no cluster
(an auditor can run them on a copy); the rest talk to the cluster's actors."""

from __future__ import annotations

import getpass
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from cluster.console import ConfigOpt, JsonOpt, connected, console, fail, print_json, settings_or_exit, table

audit_app = typer.Typer(help="The tamper-evident audit chain: verify, export, checkpoint.", no_args_is_help=True)
encryption_app = typer.Typer(help="Encryption keys: list, rotate the KEK, rotate a data key.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
    app.add_typer(encryption_app, name="encryption")
    app.add_typer(privacy_app, name="privacy")
    app.add_typer(compliance_app, name="compliance")
    app.command("lineage")(lineage)


def cli_actor() -> str:
    return f"cli:{getpass.getuser()}"


@audit_app.command("verify")
def audit_verify(config: ConfigOpt = None, as_json: JsonOpt = False,
                 public_key: Annotated[Optional[Path], typer.Option(
                     "--public-key", help="The log's Ed25519 public key (PEM) to trust; default: signing.pub "
                     "beside the log (pin your own copy: whoever can rewrite the log can rewrite that file).")] = None,
                 directory: Annotated[Optional[Path], typer.Option("--dir", help="An audit directory (a copy); "
                                                                   "default: the configured one.")] = None):
    """Recompute the hash chain and check every signed checkpoint; exit 1 naming the first bad position."""
    from security.audit import AuditError, audit_dir, verify_log

    d = directory or audit_dir(settings_or_exit(config))
    try:
        report = verify_log(d, public_key)
    except AuditError as e:
        fail(str(e))
    if as_json:
        print_json(report.to_dict())
    elif report.ok:
        console.print(f"audit log {d}: OK, {report.entries} entries, {report.checkpoints} signed checkpoints, "
                      f"head {report.head[:16]}")
        for n in report.notes:
            console.print(f"  note: {n}")
    else:
        console.print(f"audit log {d}: FAILED at position {report.first_bad}: {report.problem}", highlight=False)
    if not report.ok:
        raise typer.Exit(1)


@audit_app.command("export")
def audit_export(config: ConfigOpt = None,
                 fmt: Annotated[str, typer.Option("--format", help="jsonl or syslog (RFC 5424)")] = "jsonl",
                 out: Annotated[Optional[Path], typer.Option("--out", help="File to write; default stdout.")] = None,
                 action: Annotated[Optional[str], typer.Option(help="An action, or a prefix ending in *")] = None,
                 actor: Annotated[Optional[str], typer.Option(help="Who (a key id, cli:<user>, ...)")] = None,
                 since: Annotated[Optional[float], typer.Option(help="Unix time")] = None,
                 until: Annotated[Optional[float], typer.Option(help="Unix time")] = None):
    """Write the entries (details decrypted) as JSON lines or syslog lines for a SIEM."""
    from security.audit import audit_dir, canonical, matches, read_entries, to_syslog
    from security.crypto import EncryptionError
    from security.encryption import field_cipher

    if fmt not in ("jsonl", "syslog"):
        fail(f"--format must be jsonl or syslog, not {fmt!r}", 2)
    settings = settings_or_exit(config)
    stream = open(out, "w") if out else sys.stdout
    n = 0
    try:
        for e in read_entries(audit_dir(settings), field_cipher(settings)):
            if matches(e, action=action, actor=actor, since=since, until=until):
                stream.write((canonical(e) if fmt == "jsonl" else to_syslog(e)) + "\n")
                n += 1
    except EncryptionError as e:
        fail(f"cannot decrypt audit details: {e}")
    finally:
        if out:
            stream.close()
    if out:
        console.print(f"wrote {n} entries to {out}")


@audit_app.command("checkpoint")
def audit_checkpoint(config: ConfigOpt = None):
    """Sign the log's current head now (the audit actor also does so periodically)."""
    import ray

    from security.audit import audit_actor

    cp = ray.get(audit_actor(connected(config)).checkpoint.remote())
    console.print("nothing new to sign" if cp is None else f"signed checkpoint at entry {cp['seq']}")


def _keys(config: Path | None):
    from security.keyring import key_service

    settings = connected(config)
    return settings, key_service(settings)


@encryption_app.command("keys")
def encryption_keys(config: ConfigOpt = None, as_json: JsonOpt = False):
    """Data keys: scope, state (active, retired, shredded) and the KEK version wrapping each."""
    import ray

    _, svc = _keys(config)
    rows = ray.get(svc.call.remote("list"))
    if as_json:
        return print_json(rows)
    t = table("key id", "scope", "state", "kek", "created")
    for r in rows:
        t.add_row(r["key_id"], r["scope"], r["state"], r["kek"], time.strftime("%Y-%m-%d %H:%M",
                                                                             time.localtime(r["created_at"])))
    console.print(t)


@encryption_app.command("rotate-kek")
def encryption_rotate_kek(config: ConfigOpt = None):
    """A new KEK version; every data key is rewrapped under it online (the data is untouched)."""
    import ray

    from security.audit import audit_event

    settings, svc = _keys(config)
    try:
        out = ray.get(svc.call.remote("rotate_kek"))
    except Exception as e:
        audit_event(settings, "key.rotate_kek", {"error": str(e)[:300]}, actor=cli_actor(), outcome="error")
        fail(f"KEK rotation failed: {getattr(e, 'cause', e)}")
    audit_event(settings, "admin.rotate_kek", out, actor=cli_actor(), wait=True)
    console.print(f"KEK {out['from']} -> {out['to']}: {out['rewrapped']} data keys rewrapped")


@encryption_app.command("rotate-data-key")
def encryption_rotate_data_key(
        collection: Annotated[str, typer.Argument(help="The logical collection whose data key to rotate.")],
        config: ConfigOpt = None, as_json: JsonOpt = False):
    """A new data key for a collection and its chunks re-encrypted under it (a Ray job's work, here
    run by the CLI's driver: jobs/reencrypt.py is the same library call for `ray job submit`)."""
    from rag.reencrypt import reencrypt_collection

    settings = connected(config)
    try:
        out = reencrypt_collection(settings, collection, actor=cli_actor())
    except Exception as e:
        fail(f"re-encryption failed: {getattr(e, 'cause', e)}")
    if as_json:
        return print_json(out)
    console.print(f"collection {collection}: data key {out['retired']} -> {out['key_id']}, "
                  f"{out['points']} chunks re-encrypted, old key destroyed: {out['destroyed']}")


privacy_app = typer.Typer(help="Data subjects: erasure with crypto-shredding.", no_args_is_help=True)


@privacy_app.command("erase")
def privacy_erase(subject: Annotated[str, typer.Option("--subject", help="The data subject's id.")],
                  config: ConfigOpt = None, as_json: JsonOpt = False):
    """Erase a data subject: their chunks from every collection (their data key crypto-shredded),
    their usage-ledger details and their workflow runs (agents/privacy.py; also POST
    /v1/admin/privacy/erase)."""
    from agents.privacy import erase_subject

    settings = connected(config)
    try:
        out = erase_subject(settings, subject, actor=cli_actor())
    except ValueError as e:
        fail(str(e), 2)
    if as_json:
        return print_json(out)
    docs = sum(out["documents"].values())
    console.print(f"subject {subject}: {docs} document(s) removed from {len(out['documents'])} collection(s), "
                  f"{len(out['shredded_keys'])} data key(s) shredded, {out['ledger']['changed']} ledger record(s) "
                  f"scrubbed, {len(out['workflow_runs'])} workflow run(s) removed")


def lineage(answer_id: Annotated[str, typer.Argument(help="A RAG answer's id (rag-...).")],
            config: ConfigOpt = None, as_json: JsonOpt = False):
    """A RAG answer's lineage: the collection version and points it cited, their documents (and
    their current version), the ingest runs that wrote the collection (rag/lineage.py)."""
    from rag.lineage import LineageNotFound, answer_lineage

    settings = connected(config)
    try:
        out = answer_lineage(settings, answer_id)
    except LineageNotFound as e:
        fail(str(e), 1)
    if as_json:
        return print_json(out)
    console.print(f"answer {answer_id} ({time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(out['ts']))} UTC, by "
                  f"{out['actor']}, request {out['request_id'] or '-'})", highlight=False)
    console.print(f"  collection {out['collection']} version {out['collection_version'] or '-'}: "
                  f"{len(out['points'])} cited point(s)", highlight=False)
    for d in out["documents"]:
        console.print(f"  document {d['doc_id']} {d['source']} version {d.get('version') or 'gone'}", highlight=False)
    for r in out["ingest_runs"]:
        console.print(f"  ingest run {r['run_id']} by {r['actor']} from {r['source']}", highlight=False)


compliance_app = typer.Typer(help="Compliance: check the platform against GDPR, HIPAA or SOC 2 controls; "
                             "scheduled audits.", no_args_is_help=True)

ProfileOpt = Annotated[Optional[str], typer.Option("--profile", help="gdpr, hipaa or soc2 (default: "
                                                   "compliance.profile).")]
OverlayOpt = Annotated[Optional[str], typer.Option("--overlay", "-o", help="The KubeRay overlay to render and "
                                                   "check (dev, gpu, aws, gcp, azure); default dev.")]
ManifestsOpt = Annotated[Optional[Path], typer.Option("--manifests", help="Rendered manifests (a YAML file, e.g. "
                                                      "`orfeas k8s render -o dev > m.yaml`) instead of rendering.")]
NoManifestsOpt = Annotated[bool, typer.Option("--no-manifests", help="Check the configuration only.")]
NoScanOpt = Annotated[bool, typer.Option("--no-scan", help="Do not sample the collections for PII.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Report folder; default compliance.report_dir "
                                                "(data_dir/compliance).")]


def _manifests(overlay: str | None, manifests: Path | None, none: bool) -> tuple[list | None, str]:
    """The manifest objects to check and where they came from; bad input ends the command."""
    from security.compliance import ComplianceError, load_manifests

    if none:
        return None, "not evaluated (--no-manifests)"
    if manifests is not None:
        try:
            return load_manifests(manifests), str(manifests)
        except ComplianceError as e:
            fail(str(e), 2)
    from cluster import k8s_render

    name = overlay or "dev"
    try:
        return k8s_render.render(name), f"`orfeas k8s render -o {name}` ({k8s_render.OVERLAYS_DIR / name})"
    except k8s_render.RenderError as e:
        fail(f"cannot render the manifests of overlay {name!r}: {e} (or give --manifests FILE / --no-manifests)", 2)


def _profile(settings, profile: str | None) -> str:
    from security.compliance import ComplianceError, check_profile

    try:
        return check_profile(profile or settings.compliance.profile)
    except ComplianceError as e:
        fail(str(e), 2)


def _scan_connected(settings, no_scan: bool) -> bool:
    """Join the cluster when one runs (the collections are read through it); else no scan."""
    if no_scan:
        return False
    from cluster.local import ClusterError, connect

    try:
        connect(settings)
        return True
    except ClusterError as e:
        console.print(f"note: collections not scanned for PII: {e}", highlight=False)
        return False


@compliance_app.command("check")
def compliance_check(profile: ProfileOpt = None, config: ConfigOpt = None, overlay: OverlayOpt = None,
                     manifests: ManifestsOpt = None, no_manifests: NoManifestsOpt = False, no_scan: NoScanOpt = False,
                     out: OutOpt = None, as_json: JsonOpt = False):
    """Evaluate the configuration, the data directory and the rendered manifests against the
    profile's controls; write the report (JSON and PDF) with evidence per control and a privacy
    impact assessment draft. Exit 1 when a required control fails."""
    from agents.compliance import run_check
    from security.compliance import ComplianceError
    from security.compliance_report import report_dir, write_report

    settings = settings_or_exit(config)
    name = _profile(settings, profile)
    objs, source = _manifests(overlay, manifests, no_manifests)
    try:
        report = run_check(settings, name, objs, manifests_source=source, scan=_scan_connected(settings, no_scan),
                           actor=cli_actor())
    except ComplianceError as e:
        fail(str(e), 2)
    paths = write_report(report, out or report_dir(settings))
    if as_json:
        print_json({**report, "files": paths})
    else:
        t = table("control", "required", "status", "evidence")
        for c in report["controls"]:
            bad = [e["text"] for e in c["evidence"] if e["ok"] is False]
            t.add_row(c["id"], "yes" if c["required"] else "advisory", c["status"],
                      (bad or [e["text"] for e in c["evidence"]] or [""])[0])
        console.print(t)
        console.print(f"{name}: {report['result'].upper()} ({report['summary']['pass']} pass, "
                      f"{report['summary']['fail']} fail, {report['summary']['skipped']} skipped of the required "
                      f"controls); report {paths['json']} and {paths['pdf']}", highlight=False)
    if report["result"] == "fail":
        raise typer.Exit(1)


@compliance_app.command("schedule")
def compliance_schedule(profile: ProfileOpt = None, config: ConfigOpt = None, overlay: OverlayOpt = None,
                        manifests: ManifestsOpt = None, no_manifests: NoManifestsOpt = False,
                        no_scan: NoScanOpt = False, out: OutOpt = None,
                        every: Annotated[Optional[float], typer.Option("--every", help="Seconds between rounds "
                                                                       "(default compliance.schedule_interval_s).")] = None,
                        once: Annotated[bool, typer.Option("--once", help="One round, then exit (1 when it failed).")] = False):
    """Run the check and `audit verify` on a schedule, here in the foreground (on Kubernetes the
    RayCronJob orfeas-compliance does it). A failed round is logged, audited and alerted."""
    import logging

    from agents.compliance import scheduled_audit
    from security.compliance import ComplianceError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_or_exit(config)
    name = _profile(settings, profile)
    interval = every or settings.compliance.schedule_interval_s
    if interval <= 0:
        fail(f"--every must be a positive number of seconds, not {interval:g}", 2)
    objs, source = _manifests(overlay, manifests, no_manifests)
    scan = _scan_connected(settings, no_scan)
    while True:
        try:
            out_ = scheduled_audit(settings, name, objs, manifests_source=source, scan=scan, actor=cli_actor(),
                                   out_dir=str(out) if out else None)
        except ComplianceError as e:
            fail(str(e), 2)
        console.print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {name}: {out_['result']}"
                      + (f", failed {', '.join(out_['failed'])}" if out_["failed"] else "")
                      + (f"; alert {'sent' if out_['alert']['sent'] else 'not sent: ' + str(out_['alert']['error'])}"
                         if "alert" in out_ else "") + f"; report {out_['report']['json']}", highlight=False)
        if once:
            raise typer.Exit(1 if out_["result"] == "fail" else 0)
        time.sleep(interval)
