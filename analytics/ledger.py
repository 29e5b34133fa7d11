"""The cost ledger: every priced response, aggregated by key, team and model; feedback on
responses; spend per budget period. A detached named Ray actor owns an append-only JSON-lines
file under the data directory and rebuilds its totals from it on start, so a restart (or the
actor's loss) loses nothing that was acknowledged.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any


from config.actors import detached_actor
from security.encryption import LEDGER_SCOPE, field_cipher

# Fields of a ledger record that carry what a user wrote (request metadata, feedback comments):
# encrypted at rest when encryption is on; the figures the ledger sums stay plain.
CONTENT_FIELDS = ("comment", "metadata", "user")

PERIODS = ("day", "month")


def period_start(period: str, now: float) -> float:
    """Start (UTC) of the budget period that contains `now`."""
    t = time.gmtime(now)
    if period == "day":
        return float(calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)))
    if period == "month":
        return float(calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0)))
    raise ValueError(f"budget period must be one of {', '.join(PERIODS)}, not {period!r}")


def _zero() -> dict[str, float]:
    return {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}


def _add(acc: dict[str, float], e: dict[str, Any]) -> None:
    acc["requests"] += 1
    acc["errors"] += 1 if e.get("error") else 0
    acc["prompt_tokens"] += int(e.get("prompt_tokens") or 0)
    acc["completion_tokens"] += int(e.get("completion_tokens") or 0)
    acc["cost_usd"] += float(e.get("cost_usd") or 0.0)


def aggregate(entries: list[dict[str, Any]]) -> dict[str, Any]:
    totals, by_key, by_team, by_model = _zero(), {}, {}, {}
    for e in entries:
        _add(totals, e)
        _add(by_key.setdefault(e.get("key_id") or "-", _zero()), e)
        _add(by_team.setdefault(e.get("team") or "-", _zero()), e)
        _add(by_model.setdefault(e.get("model") or "-", _zero()), e)
    return {"totals": totals, "by_key": by_key, "by_team": by_team, "by_model": by_model}


class Ledger:
    """Ledger operations over one file; run as a Ray actor (see `ledger`)."""

    def __init__(self, path: str, settings: dict | None = None):
        from config import Settings, settings_from_dict

        self.path = Path(path)
        conf = settings_from_dict(settings) if settings else Settings(data_dir=self.path.parent.parent)
        self.cipher = field_cipher(conf)
        self.entries: list[dict[str, Any]] = []
        self.by_id: dict[str, dict[str, Any]] = {}
        self.feedback: dict[str, list[float]] = {}
        # Spend by (scope, id, period, period start): budgets read it in O(1).
        self.spent: dict[tuple[str, str, str, float], float] = {}
        # Budget reservations of calls in flight: id -> (budget keys, amount, expires at).
        self.reserved: dict[str, tuple[list[tuple[str, str, str]], float, float]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a torn last line from a crash mid-write
                self._apply(self._open(rec))
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _apply(self, rec: dict[str, Any]) -> None:
        if rec.get("type") == "feedback":
            self.feedback.setdefault(rec["response_id"], []).append(float(rec["score"]))
        else:
            self.entries.append(rec)
            if rec.get("response_id"):
                self.by_id[rec["response_id"]] = rec
            cost = float(rec.get("cost_usd") or 0.0)
            if cost:
                for scope, who in (("key", rec.get("key_id")), ("team", rec.get("team")), ("user", rec.get("user"))):
                    if who:
                        for period in PERIODS:
                            k = (scope, who, period, period_start(period, rec["ts"]))
                            self.spent[k] = self.spent.get(k, 0.0) + cost

    def _seal(self, rec: dict[str, Any]) -> dict[str, Any]:
        if self.cipher is None or not any(rec.get(f) for f in CONTENT_FIELDS):
            return rec
        out = dict(rec)
        for f in CONTENT_FIELDS:
            if out.get(f):
                out[f] = self.cipher.encrypt_json(out[f], scope=LEDGER_SCOPE, record_id=str(rec.get("response_id")),
                                                  field=f)
        return out

    def _open(self, rec: dict[str, Any]) -> dict[str, Any]:
        if self.cipher is None:
            return rec
        for f in CONTENT_FIELDS:
            if rec.get(f):
                rec[f] = self.cipher.decrypt_json(rec[f], scope=LEDGER_SCOPE, record_id=str(rec.get("response_id")),
                                                  field=f)
        return rec

    def _append(self, recs: list[dict[str, Any]]) -> None:
        with self.path.open("a") as f:
            f.write("".join(json.dumps(self._seal(r), separators=(",", ":")) + "\n" for r in recs))
            f.flush()
            os.fsync(f.fileno())

    def record(self, entries: list[dict[str, Any]]) -> int:
        recs = [{"type": "usage", "ts": time.time(), **e} for e in entries
                if not e.get("response_id") or e["response_id"] not in self.by_id]
        if not recs:
            return len(self.entries)
        self._append(recs)  # on disk first
        for r in recs:
            self._apply(r)
        return len(self.entries)

    def spend(self, key_id: str, period: str, now: float | None = None) -> float:
        return self.spend_of("key", key_id, period, now)

    def spend_of(self, scope: str, who: str, period: str, now: float | None = None) -> float:
        """What a key, team or user spent in the budget period that contains `now`."""
        return self.spent.get((scope, who, period, period_start(period, now or time.time())), 0.0)

    # ------------------------------------------------------------ budget reservations

    def held(self, scope: str, who: str, period: str, now: float) -> float:
        """What calls in flight hold against this budget."""
        self._expire(now)
        return sum(amount for keys, amount, _ in self.reserved.values() if (scope, who, period) in keys)

    def _expire(self, now: float) -> None:
        for rid in [r for r, (_, _, until) in self.reserved.items() if until <= now]:
            del self.reserved[rid]

    def reserve(self, reservation: str, budgets: list[tuple[str, str, float, str]], amount: float,
                ttl_s: float = 300.0, now: float | None = None) -> float:
        """Hold `amount` USD against every budget (scope, id, limit, period), all or none: a
        budget that cannot cover spend + held + amount refuses with BudgetExceeded naming it.
        Returns the amount held. Being one actor, reservations never race each other."""
        from models.errors import BudgetExceeded

        now = time.time() if now is None else now
        for scope, who, limit, period in budgets:
            spent, held = self.spend_of(scope, who, period, now), self.held(scope, who, period, now)
            if spent + held >= limit or spent + held + amount > limit + 1e-12:
                what = {"key": "API key", "team": "team", "user": "user"}.get(scope, scope)
                raise BudgetExceeded(
                    f"{what} {who} has spent ${spent:.6f} of its {period}ly budget of ${limit:g}, with "
                    f"${held:.6f} held by calls in flight; this call may cost up to ${amount:.6f}. Ask an admin "
                    "to raise the budget or wait for calls to finish or for the next period")
        self.reserved[reservation] = ([(s, w, p) for s, w, _, p in budgets], amount, now + ttl_s)
        return amount

    def settle(self, reservation: str, entry: dict[str, Any]) -> int:
        """Record the call's real cost and drop its reservation, in one step."""
        self.reserved.pop(reservation, None)
        return self.record([entry])

    def release(self, reservation: str) -> None:
        self.reserved.pop(reservation, None)

    def budget_state(self, scope: str, who: str, period: str) -> dict[str, float]:
        now = time.time()
        return {"spent_usd": self.spend_of(scope, who, period, now), "held_usd": self.held(scope, who, period, now),
                "reservations": len(self.reserved)}

    def usage(self, key_id: str | None = None, since: float | None = None) -> dict[str, Any]:
        rows = [e for e in self.entries if (key_id is None or e.get("key_id") == key_id)
                and (since is None or e["ts"] >= since)]
        return aggregate(rows)

    def add_feedback(self, response_id: str, score: float, key_id: str | None, comment: str = "") -> dict[str, Any]:
        """Feedback on a response; `key_id` None means an admin (any response). KeyError if unknown."""
        entry = self.by_id.get(response_id)
        if entry is None or (key_id is not None and entry.get("key_id") != key_id):
            raise KeyError(response_id)
        rec = {"type": "feedback", "ts": time.time(), "response_id": response_id, "score": score,
               "key_id": key_id, "comment": comment[:2000]}
        self._append([rec])
        self._apply(rec)
        return {"response_id": response_id, "score": score, "experiment": entry.get("experiment"),
                "arm": entry.get("arm"), "model": entry.get("model")}

    # ------------------------------------------------------------ erasure and retention

    def _rewrite(self, change) -> dict[str, int]:
        """Rewrite the file through `change(record) -> record | None` (None drops it), atomically,
        and rebuild the totals from what is left. Returns how many records were changed and dropped."""
        import tempfile

        kept, changed, dropped = [], 0, 0
        for line in self.path.read_text().splitlines() if self.path.exists() else []:
            try:
                rec = self._open(json.loads(line))
            except ValueError:
                continue
            new = change(rec)
            if new is None:
                dropped += 1
                continue
            changed += new != rec
            kept.append(new)
        if not changed and not dropped:  # nothing to do: the file stays as it is
            return {"changed": 0, "dropped": 0}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".usage.")
        with os.fdopen(fd, "w") as f:
            f.write("".join(json.dumps(self._seal(r), separators=(",", ":")) + "\n" for r in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)  # the old file (the erased ciphertext with it) is gone at once
        self.entries, self.by_id, self.feedback, self.spent = [], {}, {}, {}
        for rec in kept:
            self._apply(rec)
        return {"changed": changed, "dropped": dropped}

    def erase_subject(self, user: str, key_ids: list[str] | None = None) -> dict[str, int]:
        """Remove a data subject's details: every record of their calls (theirs by `user`, or made
        with one of `key_ids`) keeps only its figures (tokens, cost, model, key, team), so the
        spend totals stay right; their request metadata, their user id and their feedback
        comments are gone from the file and from memory."""
        keys = set(key_ids or ())
        theirs = {e.get("response_id") for e in self.entries
                  if e.get("response_id") and ((user and e.get("user") == user) or e.get("key_id") in keys)}

        def scrub(rec: dict[str, Any]) -> dict[str, Any]:
            mine = (user and rec.get("user") == user) or rec.get("key_id") in keys or \
                (rec.get("type") == "feedback" and rec.get("response_id") in theirs)
            return {k: v for k, v in rec.items() if k not in CONTENT_FIELDS} if mine else rec

        return self._rewrite(scrub)

    def expire(self, before: float) -> dict[str, int]:
        """Retention: drop every record (usage and feedback) older than `before` (epoch seconds)."""
        return self._rewrite(lambda rec: rec if float(rec.get("ts") or 0) >= before else None)

    def experiment_rows(self, name: str) -> list[dict[str, Any]]:
        return [{**e, "feedback": self.feedback.get(e.get("response_id") or "", [])}
                for e in self.entries if e.get("experiment") == name]

    def entry(self, response_id: str) -> dict[str, Any] | None:
        return self.by_id.get(response_id)


def ledger_name(data_dir: str | Path) -> tuple[str, Path]:
    path = Path(data_dir).expanduser().resolve() / "ledger" / "usage.jsonl"
    return "orfeas-ledger-" + hashlib.sha1(str(path).encode()).hexdigest()[:10], path


def ledger(data_dir: str | Path, settings=None):
    """The cluster's ledger actor for this data directory (created on first use, restarted on loss);
    `settings` (whose encryption section it uses) where the caller has them."""
    name, path = ledger_name(data_dir)
    # max_task_retries: calls made while it restarts wait for it; record() ignores a repeated response id.
    return detached_actor(Ledger, name, str(path), settings.to_dict() if settings is not None else None,
                          durable=True, max_task_retries=-1)
