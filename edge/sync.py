"""The edge's sync with the cluster: pull a collection's delta, push the writes made offline.

Pull (`Syncer.pull`): ask the cluster's change feed (`rag.sync`) for the changes since the version
last synced. Unchanged: done. Otherwise build the next local version beside the one queries use:
a staging collection, first a local copy of the active one, then the delta applied to it (whole
points fetched only for ids whose content hash differs, ids the cluster no longer has deleted).
Every fetched point is checked against its hash, the finished staging collection against the
version's checksum, and only then the alias flips to it (queries keep answering from the old one
until that instant). A sync killed anywhere leaves the staging collection; the next one keeps it
and fetches only what it still lacks, so it ends identical to a clean sync.

Push (`Outbox`): writes made at the edge (feedback, locally ingested notes) go to a SQLite queue
first (durable across restarts) and are pushed in order when the cluster answers; the cluster
lands each once by its id. Conflict rule: the cluster's version of a document wins (the next pull
overwrites any local copy); the edge's own notes are documents `edge:<id>`, kept locally until the
cluster's copy of them arrives.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import httpx

from models.errors import APIError, AuthenticationFailed, ModelUnavailable, UpstreamError
from rag.store import EdgeStore
from rag.sync import index_checksum, point_hash
from rag.versions import parse_physical, physical, version_numbers

log = logging.getLogger(__name__)

FETCH_BATCH = 128
LOCAL_PREFIX = "edge:"


class ClusterUnreachable(ModelUnavailable):
    code = "cluster_unreachable"


class SyncVerifyError(UpstreamError):
    """What arrived does not match what the cluster announced: nothing was swapped in."""

    code = "sync_verify_failed"


class ClusterClient:
    """The cluster's RAG routes over HTTPS, with the edge's API key."""

    def __init__(self, url: str, key: str | None, timeout_s: float = 30.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def _call(self, method: str, path: str, **kw) -> dict[str, Any]:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise ClusterUnreachable(f"cluster {self.url} is unreachable: {type(e).__name__}: {e}", "from") from None
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
            except (ValueError, KeyError, TypeError):
                err = {"message": r.text[:300], "code": None}
            if r.status_code == 401:
                raise AuthenticationFailed(f"the cluster refused the key: {err.get('message')}", "key")
            e = APIError(f"cluster {self.url}{path}: {err.get('message')}", err.get("param"), err.get("code"))
            e.status, e.type = r.status_code, err.get("type") or "api_error"
            raise e
        return r.json()

    def changes(self, name: str, since: str | None, cursor: int = 0, version: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in {"since": since, "cursor": cursor, "version": version}.items() if v}
        return self._call("GET", f"/v1/rag/collections/{name}/changes", params=params)

    def points(self, name: str, ids: list[str]) -> list[dict[str, Any]]:
        return self._call("POST", f"/v1/rag/collections/{name}/points", json={"ids": ids})["data"]

    def push(self, name: str, write: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", f"/v1/rag/collections/{name}/edge-writes", json=write)

    def close(self) -> None:
        self.http.close()


class Outbox:
    """Writes made at the edge, queued durably (SQLite) until the cluster has them."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS writes (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE, "
                       "kind TEXT, collection TEXT, data TEXT, created REAL, pushed REAL, error TEXT)")

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, isolation_level=None)

    def add(self, kind: str, collection: str, data: dict[str, Any], write_id: str | None = None) -> str:
        write_id = write_id or uuid.uuid4().hex
        with self._lock, self._db() as db:
            db.execute("INSERT INTO writes (id, kind, collection, data, created) VALUES (?, ?, ?, ?, ?)",
                       (write_id, kind, collection, json.dumps(data), time.time()))
        return write_id

    def pending(self) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT id, kind, collection, data FROM writes WHERE pushed IS NULL AND error IS NULL "
                              "ORDER BY seq").fetchall()
        return [{"id": i, "kind": k, "collection": c, "data": json.loads(d)} for i, k, c, d in rows]

    def notes(self, collection: str) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT id, data FROM writes WHERE kind = 'note' AND collection = ? ORDER BY seq",
                              (collection,)).fetchall()
        return [{"id": i, "data": json.loads(d)} for i, d in rows]

    def mark(self, write_id: str, error: str | None = None) -> None:
        with self._lock, self._db() as db:
            if error:
                db.execute("UPDATE writes SET error = ? WHERE id = ?", (error[:500], write_id))
            else:
                db.execute("UPDATE writes SET pushed = ? WHERE id = ?", (time.time(), write_id))

    def push(self, client: ClusterClient) -> dict[str, int]:
        """Push pending writes in order; stop at the first sign the cluster is away (they stay queued)."""
        pushed = refused = 0
        for w in self.pending():
            try:
                client.push(w["collection"], {"id": w["id"], "kind": w["kind"], "data": w["data"]})
            except (ClusterUnreachable, AuthenticationFailed):
                break
            except APIError as e:
                if e.status >= 500:
                    break
                self.mark(w["id"], f"refused by the cluster: {e.message}")  # kept, never retried blindly
                refused += 1
                continue
            self.mark(w["id"])
            pushed += 1
        return {"pushed": pushed, "refused": refused, "pending": len(self.pending())}


class Syncer:
    """Pulls one collection from the cluster into the edge's local store (see the module docstring)."""

    def __init__(self, store: EdgeStore, state_path: Path, client: ClusterClient, collection: str,
                 fetch_batch: int = FETCH_BATCH, after_swap: Callable[[str], None] | None = None):
        self.store, self.state_path, self.client, self.name = store, state_path, client, collection
        self.fetch_batch = fetch_batch
        self.after_swap = after_swap
        self.progress: Callable[[dict[str, Any]], None] | None = None  # called after each fetched batch

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def _write_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state_path)

    def _index(self, since: str | None) -> tuple[dict[str, Any], dict[str, str] | None]:
        """The cluster's current version and its whole index (None: unchanged since `since`)."""
        for _ in range(3):
            first = self.client.changes(self.name, since)
            if first["unchanged"]:
                return first, None
            index = {e["id"]: e["hash"] for e in first["entries"]}
            cursor = first["next_cursor"]
            try:
                while cursor is not None:
                    page = self.client.changes(self.name, None, cursor, first["version"])
                    index.update((e["id"], e["hash"]) for e in page["entries"])
                    cursor = page["next_cursor"]
            except APIError as e:
                if e.code == "version_gone":
                    continue  # the collection changed under us: page it again
                raise
            return first, index
        raise SyncVerifyError(f"collection {self.name!r} kept changing while it was paged", "version")

    def _staging(self, active: str | None) -> str:
        """The next local version: an interrupted sync's, or a fresh local copy of the active one."""
        state = self.state()
        staging = state.get("staging")
        if staging and self.store.collection_exists(staging):
            return staging
        versions = version_numbers(self.store, self.name)
        staging = physical(self.name, (versions[-1] + 1) if versions else 1)
        if self.store.collection_exists(staging):
            self.store.drop_collection(staging)  # left from a copy that never finished
        self.store.create_collection(staging, self.store_dim(active))
        if active:
            offset = None
            while True:
                points, offset = self.store.scroll_points(active, offset, 512)
                self.store.upsert(staging, points)
                if offset is None:
                    break
            self.store.flush(staging)
        self._write_state({**state, "staging": staging})
        return staging

    def store_dim(self, active: str | None) -> int:
        if active:
            meta = json.loads((self.store.root / "collections" / active / "orfeas.json").read_text())
            return int(meta["dim"])
        return 384

    def local_index(self, collection: str) -> dict[str, tuple[str, str]]:
        """id -> (hash, doc_id) of a local collection."""
        out, offset = {}, None
        while True:
            points, offset = self.store.scroll_points(collection, offset, 1024, with_vectors=False)
            out.update((p["id"], (point_hash(p["payload"]), p["payload"].get("doc_id", ""))) for p in points)
            if offset is None:
                return out

    def pull(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        state = self.state()
        active = self.store.get_alias(self.name)
        if active and not self.store.collection_exists(active):
            active = None
        first, index = self._index(state.get("version") if active else None)
        if index is None:
            return {"collection": self.name, "version": first["version"], "unchanged": True, "fetched": 0,
                    "deleted": 0, "seconds": round(time.perf_counter() - t0, 2)}
        staging = self._staging(active)
        local = self.local_index(staging)
        fetch = [pid for pid, h in index.items() if local.get(pid, ("",))[0] != h]
        # Ids the cluster no longer has, except the edge's own notes not yet back from it.
        delete = [pid for pid, (_, doc) in local.items() if pid not in index and not doc.startswith(LOCAL_PREFIX)]
        fetched = 0
        for i in range(0, len(fetch), self.fetch_batch):
            ids = fetch[i:i + self.fetch_batch]
            points = self.client.points(self.name, ids)
            got = {p["id"] for p in points}
            for p in points:
                if point_hash(p["payload"]) != index.get(p["id"]) or p.get("hash") != index.get(p["id"]):
                    raise SyncVerifyError(f"point {p['id']} of {self.name!r} does not match its announced hash",
                                          "points")
            if got != set(ids):
                raise SyncVerifyError(f"the cluster did not return {len(set(ids) - got)} announced point(s) of "
                                      f"{self.name!r}: it changed during the sync; sync again", "points")
            self.store.upsert(staging, points)
            self.store.flush(staging)
            fetched += len(points)
            if self.progress:
                self.progress({"fetched": fetched, "to_fetch": len(fetch)})
        if delete:
            self.store.delete_points(staging, delete)
        self.store.flush(staging)
        # Verify: the staging collection, less the edge's own notes, is exactly the announced version.
        mine = {pid: h for pid, (h, doc) in self.local_index(staging).items()
                if pid in index or not doc.startswith(LOCAL_PREFIX)}
        if index_checksum(mine) != first["version"]:
            raise SyncVerifyError(f"local copy of {self.name!r} does not match version {first['version']}: "
                                  "it was kept aside; sync again", "version")
        self.store.set_alias(self.name, staging)  # the swap: one atomic file replace
        self._write_state({"version": first["version"], "physical": staging, "remote_physical": first["physical"],
                           "synced_at": time.time()})
        for old in version_numbers(self.store, self.name):
            name = physical(self.name, old)
            if name != staging:
                self.store.drop_collection(name)
        if self.after_swap:
            self.after_swap(staging)
        return {"collection": self.name, "version": first["version"], "unchanged": False, "fetched": fetched,
                "deleted": len(delete), "points": len(index), "seconds": round(time.perf_counter() - t0, 2)}


__all__ = ["ClusterClient", "ClusterUnreachable", "Outbox", "SyncVerifyError", "Syncer", "parse_physical"]
