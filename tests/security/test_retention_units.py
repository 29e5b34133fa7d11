"""Retention's pure parts: the settings refuse periods that would break budgets or make no
sense, log pruning removes only files older than the cutoff, document dates are read as UTC."""

from __future__ import annotations

import os
import time

import pytest
from pydantic import ValidationError

from config import Settings
from observability.log_retention import prune_logs
from rag.retention import _when


def test_retention_settings_defaults_and_bad_values():
    r = Settings().retention
    assert (r.usage_events_days, r.logs_days, r.workflow_runs_days, r.collection_days) == (400, 30, 90, None)
    with pytest.raises(ValidationError, match="usage_events_days"):
        Settings(retention={"usage_events_days": 7})  # a monthly budget would lose part of its month
    with pytest.raises(ValidationError, match="retention.collections"):
        Settings(retention={"collections": {"docs": 0}})
    assert Settings(retention={"usage_events_days": None}).retention.usage_events_days is None


def test_prune_logs_removes_only_old_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    old, fresh = tmp_path / "a" / "b" / "old.log", tmp_path / "a" / "fresh.log"
    old.write_text("x" * 10)
    fresh.write_text("y")
    os.utime(old, (time.time() - 3600,) * 2)
    assert prune_logs([tmp_path, tmp_path / "missing"], time.time() - 60) == {"files": 1, "bytes": 10}
    assert not (tmp_path / "a" / "b").exists() and fresh.exists() and tmp_path.exists()


def test_document_dates():
    assert _when("2026-01-01T00:00:00Z") == _when("2026-01-01T00:00:00") == 1767225600.0
    assert _when(None) is None and _when("not a date") is None
