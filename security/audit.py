"""The audit chain: a tamper-evident, append-only log of who did what, when, from where, with
what outcome (modelled on AWS CloudTrail's log-file integrity validation).

Each line of `data_dir/audit/audit.jsonl` is

    {"hash":"<64 hex>","entry":<canonical JSON of the entry>}

where hash = SHA-256(previous line's hash, as hex, + the canonical entry bytes) and the first
entry's previous hash is 64 zeros. Entries are appended with fsync before the call returns.
Every `audit.checkpoint_every` entries (and at least every `audit.checkpoint_s` while entries
are pending) a checkpoint {seq, hash, ts} signed with the log's Ed25519 key is appended to
`checkpoints.jsonl`. `verify_log` recomputes the chain (no JSON parsing on the happy path: the
line layout is fixed) and checks every checkpoint's signature and hash, naming the first bad
position: an edited, deleted, inserted or reordered entry breaks the chain at that line; a
re-hashed chain contradicts a signed checkpoint; a truncated tail falls short of the last one.

Entry details may carry user content: they are encrypted (security/crypto.py, scope
`store:audit`, bound to the entry's seq) before they are hashed, after PII redaction
(security/pii.py) when that is on. The chain verifies without keys.

In a cluster one detached actor (`audit_actor`) appends; `audit_event` sends it an entry
without waiting. Without Ray the entry is appended in this process under a file lock.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from config.actors import detached_actor

log = logging.getLogger(__name__)

GENESIS = "0" * 64
_HEAD = '{"hash":"'
_MID = '","entry":'
_BODY_AT = len(_HEAD) + 64 + len(_MID)
Outcome = Literal["ok", "denied", "error"]


class AuditError(Exception):
    """The audit log cannot be read or written; the message says which file and why."""


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def chain_hash(prev: str, body: str) -> str:
    return hashlib.sha256(prev.encode() + body.encode()).hexdigest()


def audit_dir(settings: Any) -> Path:
    return Path(settings.audit.dir) if settings.audit.dir else settings.resolved_data_dir() / "audit"


# --- signing key ----------------------------------------------------------------------------------

def _signing_key(directory: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = directory / "signing.key"
    if path.exists():
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    key = Ed25519PrivateKey.generate()
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    (directory / "signing.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key


def _public_key(path: Path):
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as e:
        raise AuditError(f"cannot read the audit public key {path}: {e}") from e


# --- the log --------------------------------------------------------------------------------------

class AuditLog:
    """Appends entries to one directory's chain; not thread-safe by itself (the actor serialises)."""

    def __init__(self, directory: str | Path, checkpoint_every: int = 1000, checkpoint_s: float = 60.0,
                 cipher=None, redactor=None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "audit.jsonl"
        self.cp_path = self.dir / "checkpoints.jsonl"
        self.checkpoint_every, self.checkpoint_s = checkpoint_every, checkpoint_s
        self.cipher, self.redactor = cipher, redactor
        self.key = _signing_key(self.dir)
        self.seq, self.head = self._tail()
        self._size = self.path.stat().st_size if self.path.exists() else 0
        self.signed_seq = self._last_checkpoint_seq()
        self.last_cp_time = time.monotonic()

    def _tail(self) -> tuple[int, str]:
        """The last entry's seq and hash; a torn last line (a crash mid-write, never acknowledged) is cut."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return 0, GENESIS
        with open(self.path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            back = min(size, 1 << 16)
            while True:
                f.seek(size - back)
                tail = f.read(back)
                lines = tail.split(b"\n")
                if len(lines) > 2 or back == size:
                    break
                back = min(size, back * 4)
            last = lines[-1] if lines[-1] else lines[-2]
            if lines[-1]:  # no newline at the end: torn
                log.warning("audit log %s: cutting a torn last line (%d bytes)", self.path, len(lines[-1]))
                f.truncate(size - len(lines[-1]))
                last = lines[-2] if len(lines) > 1 else b""
                if not last:
                    return 0, GENESIS
        try:
            rec = json.loads(last)
            return int(rec["entry"]["seq"]), rec["hash"]
        except (ValueError, KeyError, TypeError) as e:
            raise AuditError(f"audit log {self.path}: the last entry is unreadable ({e}); run `orfeas audit verify`") from e

    def _last_checkpoint_seq(self) -> int:
        if not self.cp_path.exists():
            return 0
        lines = self.cp_path.read_text().splitlines()
        return int(json.loads(lines[-1])["seq"]) if lines else 0

    def record(self, entries: list[dict[str, Any]]) -> list[int]:
        """Append entries (each: action, actor, target, outcome, source, request_id, details);
        fsynced before returning their seq numbers."""
        if self.cipher is not None:
            from security.encryption import AUDIT_SCOPE

            # Get (or create) the details key before taking the file lock: creating it is itself
            # audited, which in-process would otherwise wait on the lock this call holds.
            self.cipher.keys.current(AUDIT_SCOPE)
        with open(self.path, "a", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # another process appending (the CLI beside the actor) waits
            if f.seek(0, os.SEEK_END) != self._size:
                self.seq, self.head = self._tail()
            seqs = self._append(f, entries)
            self._size = f.tell()
        if self.seq - self.signed_seq >= self.checkpoint_every or \
                (self.seq > self.signed_seq and time.monotonic() - self.last_cp_time > self.checkpoint_s):
            self.checkpoint()
        return seqs

    def _append(self, f, entries: list[dict[str, Any]]) -> list[int]:
        lines, seqs = [], []
        seq, head = self.seq, self.head
        for e in entries:
            seq += 1
            entry = {"seq": seq, "ts": float(e.get("ts") or time.time()), "action": str(e["action"]),
                     "actor": str(e.get("actor") or ""), "target": str(e.get("target") or ""),
                     "outcome": str(e.get("outcome") or "ok"), "source": str(e.get("source") or ""),
                     "request_id": str(e.get("request_id") or ""), "details": self._details(seq, e.get("details"))}
            body = canonical(entry)
            head = chain_hash(head, body)
            lines.append(f"{_HEAD}{head}{_MID}{body}}}\n")
            seqs.append(seq)
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())
        self.seq, self.head = seq, head
        return seqs

    def _details(self, seq: int, details: Any) -> Any:
        if not details:
            return {}
        if self.redactor is not None:
            details = self.redactor(details)
        if self.cipher is not None:
            from security.encryption import AUDIT_SCOPE

            return self.cipher.encrypt_json(details, scope=AUDIT_SCOPE, record_id=str(seq), field="details")
        return details

    def checkpoint(self) -> dict[str, Any] | None:
        """Sign the current head (nothing to do when no entry came since the last checkpoint)."""
        self.last_cp_time = time.monotonic()
        if self.seq <= self.signed_seq:
            return None
        body = canonical({"seq": self.seq, "hash": self.head, "ts": time.time()})
        cp = {**json.loads(body), "signature": base64.b64encode(self.key.sign(body.encode())).decode()}
        with open(self.cp_path, "a") as f:
            f.write(canonical(cp) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.signed_seq = self.seq
        return cp


# --- reading and verifying ------------------------------------------------------------------------

@dataclass
class VerifyReport:
    ok: bool
    entries: int
    checkpoints: int
    unsigned_tail: int = 0
    first_bad: int | None = None          # 1-based position (line) of the first bad entry
    problem: str = ""
    head: str = GENESIS
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def verify_log(directory: str | Path, public_key: str | Path | None = None) -> VerifyReport:
    """Recompute the chain and check every signed checkpoint against it."""
    d = Path(directory)
    path, cp_path = d / "audit.jsonl", d / "checkpoints.jsonl"
    if not path.exists():
        raise AuditError(f"no audit log at {path}")
    hashes: list[str] = []
    prev = GENESIS
    with open(path, "r", encoding="utf-8") as f:
        for pos, line in enumerate(f, 1):
            stored, body = line[len(_HEAD):len(_HEAD) + 64], line[_BODY_AT:-2]
            if not line.endswith("}\n") or not line.startswith(_HEAD) or line[len(_HEAD) + 64:_BODY_AT] != _MID:
                return VerifyReport(False, pos - 1, 0, first_bad=pos, head=prev,
                                    problem=f"entry at position {pos} is malformed or truncated")
            h = hashlib.sha256(prev.encode() + body.encode()).hexdigest()
            if h != stored:
                return VerifyReport(False, pos - 1, 0, first_bad=pos, head=prev,
                                    problem=_chain_problem(pos, body, stored, h))
            seq = _seq_of(body)
            if seq != pos:
                return VerifyReport(False, pos - 1, 0, first_bad=pos, head=prev,
                                    problem=f"entry at position {pos} carries seq {seq}: an entry was deleted, "
                                    "inserted or reordered before it and the chain re-hashed")
            hashes.append(h)
            prev = h
    n = len(hashes)
    report = VerifyReport(True, n, 0, head=prev)
    pub = _public_key(Path(public_key) if public_key else d / "signing.pub")
    cps = cp_path.read_text().splitlines() if cp_path.exists() else []
    last_seq = 0
    for i, raw in enumerate(cps, 1):
        try:
            cp = json.loads(raw)
            body = canonical({"seq": cp["seq"], "hash": cp["hash"], "ts": cp["ts"]})
            pub.verify(base64.b64decode(cp["signature"]), body.encode())
        except Exception as e:  # InvalidSignature, bad JSON, missing fields
            return _fail(report, None, f"checkpoint {i} is not validly signed ({type(e).__name__})")
        seq = int(cp["seq"])
        if seq <= last_seq:
            return _fail(report, None, f"checkpoint {i} (seq {seq}) does not follow checkpoint {i - 1} (seq {last_seq})")
        last_seq = seq
        if seq > n:
            return _fail(report, n + 1, f"signed checkpoint {i} covers {seq} entries but the log holds {n}: "
                         f"entries from position {n + 1} were deleted")
        if hashes[seq - 1] != cp["hash"]:
            # The chain is self-consistent but differs from what was signed: find where it diverges
            # is not possible from one hash; the earliest position it can be is after the previous checkpoint.
            prev_seq = int(json.loads(cps[i - 2])["seq"]) if i > 1 else 0
            return _fail(report, prev_seq + 1, f"entries {prev_seq + 1}..{seq} differ from signed checkpoint {i}: "
                         "edited and re-hashed")
        report.checkpoints = i
    report.unsigned_tail = n - last_seq
    if report.unsigned_tail:
        report.notes.append(f"{report.unsigned_tail} entr{'y' if report.unsigned_tail == 1 else 'ies'} after the "
                            "last checkpoint are chained but not yet signed")
    return report


def _fail(report: VerifyReport, pos: int | None, problem: str) -> VerifyReport:
    report.ok, report.first_bad, report.problem = False, pos, problem
    return report


def _seq_of(body: str) -> int | None:
    # Keys are sorted: after "seq" come only string values (source, target, ts), and a string never
    # holds `"seq":` unescaped, so the last occurrence is the entry's own key (details come before it).
    i = body.rfind('"seq":')
    if i < 0:
        return None
    j = i + 6
    k = j
    while k < len(body) and body[k].isdigit():
        k += 1
    return int(body[j:k]) if k > j else None


def _chain_problem(pos: int, body: str, stored: str, computed: str) -> str:
    return (f"entry at position {pos} does not chain: its stored hash {stored[:12]}... is not SHA-256 of the "
            f"previous hash and its content ({computed[:12]}...): it was edited, or an entry before it was "
            "deleted, inserted or moved")


def read_entries(directory: str | Path, cipher=None) -> Iterator[dict[str, Any]]:
    """Every entry in order, details decrypted when `cipher` is given."""
    path = Path(directory) / "audit.jsonl"
    if not path.exists():
        return
    from security.encryption import AUDIT_SCOPE

    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            e = json.loads(line)["entry"]
            if cipher is not None and isinstance(e.get("details"), str):
                e["details"] = cipher.decrypt_json(e["details"], scope=AUDIT_SCOPE, record_id=str(e["seq"]),
                                                   field="details")
            yield e


def matches(e: dict[str, Any], *, action: str | None = None, actor: str | None = None, outcome: str | None = None,
            target: str | None = None, request_id: str | None = None, since: float | None = None,
            until: float | None = None) -> bool:
    return ((action is None or e["action"] == action or e["action"].startswith(action.rstrip("*")) and
             action.endswith("*"))
            and (actor is None or e["actor"] == actor) and (outcome is None or e["outcome"] == outcome)
            and (target is None or e["target"] == target) and (request_id is None or e["request_id"] == request_id)
            and (since is None or e["ts"] >= since) and (until is None or e["ts"] <= until))


_SYSLOG_SEVERITY = {"ok": 6, "denied": 4, "error": 3}  # informational, warning, error


def to_syslog(e: dict[str, Any], hostname: str | None = None) -> str:
    """RFC 5424 with the entry as structured data (facility 13: log audit)."""
    from datetime import datetime, timezone

    pri = 13 * 8 + _SYSLOG_SEVERITY.get(e.get("outcome", "ok"), 5)
    ts = datetime.fromtimestamp(e["ts"], timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def esc(v: Any) -> str:
        return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")

    sd = " ".join(f'{k}="{esc(e.get(k, ""))}"' for k in ("seq", "action", "actor", "target", "outcome", "source",
                                                          "request_id"))
    msg = canonical(e.get("details") or {})
    return f"<{pri}>1 {ts} {hostname or socket.gethostname()} orfeas - AUDIT [orfeas@32473 {sd}] {msg}"


# --- the actor and the helper every room calls -----------------------------------------------------

class AuditActor:
    """The one appender of a data directory's audit log."""

    def __init__(self, settings: dict):
        from config import settings_from_dict

        self.settings = settings_from_dict(settings)
        self.log = _open_log(self.settings)

    def record(self, entries: list[dict[str, Any]]) -> list[int]:
        return self.log.record(entries)

    def checkpoint(self) -> dict[str, Any] | None:
        return self.log.checkpoint()

    def head(self) -> dict[str, Any]:
        return {"seq": self.log.seq, "hash": self.log.head, "signed_seq": self.log.signed_seq}

    def query(self, filters: dict[str, Any], limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        from security.encryption import field_cipher

        cipher = field_cipher(self.settings)
        out = []
        skipped = 0
        for e in read_entries(self.log.dir, None):
            if not matches(e, **filters):
                continue
            if skipped < offset:
                skipped += 1
                continue
            if cipher is not None and isinstance(e.get("details"), str):
                from security.encryption import AUDIT_SCOPE

                e["details"] = cipher.decrypt_json(e["details"], scope=AUDIT_SCOPE, record_id=str(e["seq"]),
                                                   field="details")
            out.append(e)
            if len(out) >= limit:
                break
        return out


def _open_log(settings: Any) -> AuditLog:
    from security.encryption import field_cipher

    redactor = None
    if settings.pii.enabled and settings.pii.audit != "off":
        from security.pii import redact_value

        redactor = lambda details: redact_value(details, settings)  # noqa: E731
    return AuditLog(audit_dir(settings), settings.audit.checkpoint_every, settings.audit.checkpoint_s,
                    cipher=field_cipher(settings), redactor=redactor)


_HANDLES: dict[str, Any] = {}


def audit_actor(settings: Any):
    """The data directory's audit actor (created on first use; the handle is kept per process)."""
    where = str(audit_dir(settings))
    handle = _HANDLES.get(where)
    if handle is None:
        name = "orfeas-audit-" + hashlib.sha1(where.encode()).hexdigest()[:10]
        handle = _HANDLES[where] = detached_actor(AuditActor, name, settings.to_dict(), durable=True,
                                                  max_task_retries=-1)
    return handle


_LOCAL: dict[str, AuditLog] = {}


def audit_event(settings: Any, action: str, details: dict[str, Any] | None = None, *, actor: str = "",
                target: str = "", outcome: Outcome = "ok", source: str = "", request_id: str = "",
                wait: bool = False) -> Any:
    """Record one audit entry: sent to the audit actor without waiting (unless `wait`), or
    appended in this process when Ray is not connected. Never raises for a caller's sake: a
    failure to audit is logged as an error (the entry is what is lost, not the caller's work)."""
    if not settings.audit.enabled:
        return None
    entry = {"ts": time.time(), "action": action, "actor": actor, "target": target, "outcome": outcome,
             "source": source, "request_id": request_id, "details": details or {}}
    try:
        import ray

        if ray.is_initialized():
            ref = audit_actor(settings).record.remote([entry])
            return ray.get(ref) if wait else ref
        where = str(audit_dir(settings))
        log_ = _LOCAL.get(where)
        if log_ is None:
            log_ = _LOCAL[where] = _open_log(settings)
        return log_.record([entry])
    except Exception:
        log.exception("could not record audit entry %s", action)
        if wait:
            raise
        return None
