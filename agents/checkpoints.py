"""Durable run checkpoints: `<root>/runs/<run_id>/run.json` (the whole run state, rewritten
atomically after every step transition) and `events.jsonl` next to it. The root is a local
directory or any fsspec URI (s3://, gs://, abfs://, memory://).

With a field cipher (encryption on) both hold user content only encrypted: run.json is
`{"orfeas_encrypted": <token>}` and each event line `{"orfeas_encrypted": <token>}`, tokens
bound to the run id (security/crypto.py)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from agents.scheduling import RunState
from security.crypto import FieldCipher, NotEncrypted
from security.encryption import WORKFLOWS_SCOPE

ENC = "orfeas_encrypted"

RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class CheckpointStore:
    def __init__(self, root: str, cipher: FieldCipher | None = None):
        self.cipher = cipher
        self.root = root.rstrip("/")
        self.local = "://" not in root or root.startswith("file://")
        if self.local:
            self.root = root.removeprefix("file://")
            Path(self.root, "runs").mkdir(parents=True, exist_ok=True)
            self.fs = None
        else:
            import fsspec

            self.fs, _ = fsspec.core.url_to_fs(root)

    def _path(self, run_id: str, name: str) -> str:
        if not RUN_ID.match(run_id):
            raise ValueError(f"invalid run id {run_id!r}")
        return f"{self.root}/runs/{run_id}/{name}"

    def _seal(self, text: str, run_id: str, field: str) -> str:
        if self.cipher is None:
            return text
        return json.dumps({ENC: self.cipher.encrypt(text, scope=WORKFLOWS_SCOPE, record_id=run_id, field=field)})

    def _open(self, text: str, run_id: str, field: str) -> str:
        if text.startswith('{"' + ENC + '"'):
            if self.cipher is None:
                raise NotEncrypted(f"{field} of run {run_id!r} is encrypted but encryption is off "
                                   "(encryption.enabled): it cannot be read")
            return self.cipher.decrypt(json.loads(text)[ENC], scope=WORKFLOWS_SCOPE, record_id=run_id, field=field)
        if self.cipher is not None and not self.cipher.allow_plaintext:
            raise NotEncrypted(f"{field} of run {run_id!r} is stored in plaintext (encryption.allow_plaintext_reads "
                               "is off)")
        return text

    def save(self, run: RunState) -> None:
        data = self._seal(run.model_dump_json(), run.run_id, "run")
        path = self._path(run.run_id, "run.json")
        if self.local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=".run.")
            with os.fdopen(fd, "w") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            with self.fs.open(path, "w") as f:
                f.write(data)

    def _read(self, path: str) -> str | None:
        """A file's text, None when it does not exist."""
        try:
            if self.local:
                return Path(path).read_text()
            with self.fs.open(path, "r") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def load(self, run_id: str) -> RunState | None:
        text = self._read(self._path(run_id, "run.json"))
        return None if text is None else RunState.model_validate_json(self._open(text, run_id, "run"))

    def run_ids(self) -> list[str]:
        if self.local:
            return sorted(p.name for p in Path(self.root, "runs").iterdir() if (p / "run.json").exists())
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(f"{self.root}/runs", detail=False))
        except FileNotFoundError:
            return []

    def append_events(self, run_id: str, events: list[dict[str, Any]]) -> None:
        lines = "".join(self._seal(json.dumps(e, default=str), run_id, "event") + "\n" for e in events)
        path = self._path(run_id, "events.jsonl")
        if self.local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(lines)
        else:  # object stores cannot append: rewrite
            old = self._read(path) or ""
            with self.fs.open(path, "w") as f:
                f.write(old + lines)

    def events(self, run_id: str) -> list[dict[str, Any]]:
        text = self._read(self._path(run_id, "events.jsonl")) or ""
        return [json.loads(self._open(line, run_id, "event")) for line in text.splitlines() if line.strip()]

    def delete(self, run_id: str) -> bool:
        """Remove a run's checkpoint and events (erasure, retention); False when there was none."""
        folder = self._path(run_id, "").rstrip("/")
        if self.local:
            import shutil

            if not Path(folder).exists():
                return False
            shutil.rmtree(folder)
            return True
        try:
            self.fs.rm(folder, recursive=True)
        except FileNotFoundError:
            return False
        return True
