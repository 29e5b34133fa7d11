"""Erasure and retention on the stores themselves, without a cluster: the usage ledger rewrites
its file without a subject's details (or without expired records) and rebuilds its totals; a
workflow run's checkpoint folder is removed. With encryption off, so a left-over detail would be
plain text in the file."""

from __future__ import annotations

import json
import time

from analytics.ledger import Ledger
from config import Settings


def _ledger(tmp_path) -> Ledger:
    settings = Settings(data_dir=tmp_path, encryption={"enabled": False})
    return Ledger(str(tmp_path / "ledger" / "usage.jsonl"), settings.to_dict())


def test_ledger_erasure_scrubs_a_subjects_details_and_keeps_the_figures(tmp_path):
    book = _ledger(tmp_path)
    book.record([{"response_id": "a", "key_id": "k1", "user": "s-42", "team": "t", "cost_usd": 0.5,
                  "metadata": {"note": "Quokka-9981"}},
                 {"response_id": "b", "key_id": "k9", "user": "", "cost_usd": 0.1, "metadata": {"note": "via key"}},
                 {"response_id": "c", "key_id": "k2", "user": "u-1", "cost_usd": 0.25, "metadata": {"note": "kept"}}])
    book.add_feedback("a", 1.0, None, "Quokka-9981 liked it")
    assert b"Quokka-9981" in book.path.read_bytes()

    out = book.erase_subject("s-42", ["k9"])
    assert out == {"changed": 3, "dropped": 0}
    text = book.path.read_text()
    assert "Quokka-9981" not in text and "via key" not in text and "s-42" not in text and "kept" in text
    assert book.usage()["totals"]["cost_usd"] == 0.85 and book.spend_of("team", "t", "month") == 0.5
    assert book.spend_of("user", "s-42", "month") == 0.0 and book.spend_of("user", "u-1", "month") == 0.25
    assert "metadata" not in book.entry("a") and book.feedback == {"a": [1.0]}
    # What is on disk is what a restarted ledger sees.
    again = _ledger(tmp_path)
    assert again.usage() == book.usage() and "metadata" not in again.entry("b")
    assert book.erase_subject("nobody") == {"changed": 0, "dropped": 0}


def test_ledger_expiry_drops_records_older_than_the_cutoff(tmp_path):
    book = _ledger(tmp_path)
    now = time.time()
    book.record([{"response_id": "old", "key_id": "k", "cost_usd": 1.0, "ts": now - 90 * 86400},
                 {"response_id": "new", "key_id": "k", "cost_usd": 2.0, "ts": now}])
    assert book.expire(now - 30 * 86400) == {"changed": 0, "dropped": 1}
    assert book.entry("old") is None and book.usage()["totals"]["cost_usd"] == 2.0
    assert [json.loads(line)["response_id"] for line in book.path.read_text().splitlines()] == ["new"]


def test_checkpoint_store_deletes_a_run(tmp_path):
    from agents.checkpoints import CheckpointStore
    from agents.scheduling import RunState
    from agents.spec import WorkflowSpec

    store = CheckpointStore(str(tmp_path / "workflows"))
    wf = WorkflowSpec.parse({"name": "w", "steps": [{"id": "gate", "kind": "approval", "message": "ok?"}]})
    store.save(RunState.new("run_1", wf, {"who": "Quokka-9981"}))
    store.append_events("run_1", [{"seq": 1, "event": "run.created"}])
    assert store.run_ids() == ["run_1"]
    assert store.delete("run_1") is True and store.run_ids() == [] and store.load("run_1") is None
    assert not (tmp_path / "workflows" / "runs" / "run_1").exists() and store.delete("run_1") is False
