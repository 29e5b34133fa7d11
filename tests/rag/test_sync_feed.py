"""The cluster side of the edge sync without Ray: the change feed's versions and pages over a
Qdrant Edge store in this process, and a version that changes while it is paged."""

from __future__ import annotations

import pytest

from rag.store import EdgeStore
from rag.sync import ChangeFeed, VersionGone, index_checksum, point_hash


def _points(n: int, text: str = "t") -> list[dict]:
    return [{"id": f"00000000-0000-0000-0000-{i:012d}", "dense": [1.0, 0.0, 0.0, float(i)], "sparse_indices": [i],
             "sparse_values": [1.0], "payload": {"doc_id": f"d{i}", "text": f"{text}{i}"}} for i in range(n)]


def test_pages_cover_the_index_once_and_the_version_is_its_checksum(tmp_path):
    store = EdgeStore(tmp_path)
    store.create_collection("c__v1", 4)
    store.set_alias("c", "c__v1")
    store.upsert("c__v1", _points(5))
    feed = ChangeFeed(store)
    first = feed.changes("c", limit=2)
    entries = list(first.entries)
    cursor = first.next_cursor
    while cursor is not None:
        page = feed.changes("c", cursor=cursor, version=first.version, limit=2)
        entries += page.entries
        cursor = page.next_cursor
    assert len(entries) == first.total == 5 and len({e.id for e in entries}) == 5
    assert first.version == index_checksum({e.id: e.hash for e in entries})
    assert feed.changes("c", since=first.version).unchanged  # nothing new: no entries sent
    got = feed.points("c", [entries[0].id])
    assert got[0]["hash"] == entries[0].hash == point_hash(got[0]["payload"]) and len(got[0]["dense"]) == 4

    store.upsert("c__v1", _points(1, text="changed"))  # a changed point: a new version, its hash differs
    second = feed.changes("c", since=first.version)
    assert not second.unchanged and second.version != first.version
    changed = {e.id: e.hash for e in second.entries}
    old = {e.id: e.hash for e in entries}
    assert [i for i in old if changed[i] != old[i]] == ["00000000-0000-0000-0000-000000000000"]
    store.close()


def test_a_page_of_a_version_that_is_gone_is_a_409_asking_to_start_over(tmp_path):
    store = EdgeStore(tmp_path)
    store.create_collection("c__v1", 4)
    store.set_alias("c", "c__v1")
    store.upsert("c__v1", _points(3))
    feed = ChangeFeed(store)
    feed.changes("c", limit=1)
    with pytest.raises(VersionGone) as e:
        feed.changes("c", cursor=1, version="not-a-version", limit=1)
    assert e.value.status == 409 and e.value.code == "version_gone"
    store.close()
