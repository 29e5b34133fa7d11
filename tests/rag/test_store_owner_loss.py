"""The Edge store's owner actor lost (ray.kill, on the session cluster): a read is retried once,
transparently, on a new owner that opens the same shards (nothing lost); a write is a 503
`store_unavailable` with Retry-After, never a 500; the next call works again."""

import ray

from config import Settings
from rag.errors import StoreUnavailable
from rag.store import edge_store_actor, open_store
from serve.http.errors import error_headers


def kill_owner(settings) -> None:
    owner = edge_store_actor(settings)
    ray.kill(owner, no_restart=True)
    while True:  # ray.kill lands asynchronously: wait until the owner no longer answers
        try:
            ray.get(owner.where.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return


def test_a_lost_owner_retries_reads_once_and_answers_writes_with_503(ray_cluster, tmp_path):
    settings = Settings(data_dir=tmp_path / "data", rag={"edge_actor_name": "owner-loss"})
    store = open_store(settings)
    store.create_collection("kept", 4)
    store.upsert("kept", [{"id": 1, "dense": [1.0, 0, 0, 0], "sparse_indices": [1], "sparse_values": [1.0],
                           "payload": {"doc_id": "d", "doc_hash": "h", "n_chunks": 1, "chunk_index": 0, "text": "t"}}])
    store.flush("kept")
    assert store.count("kept") == 1

    kill_owner(settings)
    assert store.count("kept") == 1  # retried on a new owner: the same point, once

    kill_owner(settings)
    try:
        store.set_alias("a", "kept")
    except StoreUnavailable as e:
        assert e.status == 503 and error_headers(e)["Retry-After"].isdigit()
    else:
        raise AssertionError("a write to a lost owner must be refused, not silently retried")
    assert "kept" in store.list_collections() and store.count("kept") == 1  # the owner is back
