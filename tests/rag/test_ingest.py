"""The ingest job on a real Ray cluster and Qdrant Edge (through its owner actor): idempotent
re-runs, incremental changes and deletions, a killed run re-run, versions and rollback, bad sources."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rag.ingest import run_ingest
from rag.errors import CollectionNotFound, SourceNotAllowed, SourceUnreadable
from rag.store import open_store
from rag.versions import list_versions, rollback

REPO = Path(__file__).resolve().parents[2]


def _write_corpus(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "ray.md").write_text("# Ray\n\nRay Serve runs model replicas. It scales them with load.\n\n"
                              "## Data\n\nRay Data streams batches through actor pools.")
    (d / "qdrant.txt").write_text("Qdrant stores dense and sparse vectors. Hybrid queries fuse both.")
    (d / "cities.jsonl").write_text('{"_id": "p", "title": "Paris", "text": "Paris is the capital of France."}\n'
                                    '{"_id": "b", "title": "Berlin", "text": "Berlin is the capital of Germany."}\n')
    (d / "broken.pdf").write_bytes(b"%PDF-1.4 nope")


def _points(store, collection):
    target = store.resolve(collection)
    return sorted((p["doc_id"], p["chunk_index"], p["doc_hash"], p["hash"])
                  for p in store.scroll_payloads(target, ["doc_id", "chunk_index", "doc_hash", "hash"]))


@pytest.fixture
def store(ray_cluster, settings):
    return open_store(settings)


def test_ingest_is_idempotent_and_incremental(store, settings, tmp_path):
    src = tmp_path / "docs"
    _write_corpus(src)
    s1 = run_ingest(str(src), "kb", settings=settings, store=store)
    assert s1.failed == [{"path": str(src / "broken.pdf"), "reason": s1.failed[0]["reason"]}]
    assert "unreadable PDF" in s1.failed[0]["reason"]
    assert s1.documents == 4 and s1.indexed == 4 and s1.chunks >= 5 and s1.alias_flipped
    first = _points(store, "kb")
    assert len(first) == s1.chunks

    s2 = run_ingest(str(src), "kb", settings=settings, store=store)
    assert (s2.indexed, s2.chunks, s2.skipped, s2.deleted) == (0, 0, 4, 0)
    assert _points(store, "kb") == first

    # change one document (fewer chunks), delete another
    (src / "ray.md").write_text("# Ray\n\nRay is a framework for distributed Python.")
    (src / "qdrant.txt").unlink()
    s3 = run_ingest(str(src), "kb", settings=settings, store=store)
    assert (s3.indexed, s3.skipped, s3.deleted) == (1, 2, 1)
    now = _points(store, "kb")
    ray_chunks = [p for p in now if p[0].endswith("ray.md")]
    assert len(ray_chunks) == 1 and len({p[2] for p in ray_chunks}) == 1
    assert not any(p[0].endswith("qdrant.txt") for p in now)
    assert store.count(store.resolve("kb")) == len(now)


def test_versions_rebuild_and_rollback(store, settings, tmp_path):
    src = tmp_path / "docs"
    _write_corpus(src)
    uri = f"file://{src}"  # object-storage path: listed and read through pyarrow filesystems
    first = run_ingest(uri, "vers", settings=settings, store=store)
    assert first.indexed == 4 and first.failed[0]["path"] == f"file://{src}/broken.pdf"
    (src / "extra.txt").write_text("An extra document about rollbacks.")
    s = run_ingest(uri, "vers", settings=settings, store=store, rebuild=True)
    assert s.version_collection == "vers__v2" and s.alias_flipped and s.indexed == 5
    rows = list_versions(store, "vers")
    assert [(r.version, r.active) for r in rows] == [(1, False), (2, True)]
    assert rows[1].points == rows[0].points + 1
    back = rollback(store, "vers")
    assert back.version == 1 and store.resolve("vers") == "vers__v1"
    with pytest.raises(Exception):
        rollback(store, "vers")  # nothing older than v1
    with pytest.raises(CollectionNotFound):
        rollback(store, "never-made")


def test_bad_sources_write_nothing(store, settings, tmp_path):
    before = store.list_collections()
    with pytest.raises(SourceUnreadable):
        run_ingest(str(tmp_path / "missing"), "bad", settings=settings, store=store)
    outside = tmp_path / "outside"
    _write_corpus(outside)
    settings.rag.allowed_roots = [str(tmp_path / "allowed")]
    with pytest.raises(SourceNotAllowed):
        run_ingest(str(outside), "bad", settings=settings, store=store, enforce_roots=True)
    with pytest.raises(SourceNotAllowed):
        run_ingest(str(tmp_path / "allowed" / ".." / "outside"), "bad", settings=settings, store=store,
                   enforce_roots=True)
    assert store.list_collections() == before


def test_killed_job_rerun_ends_with_one_clean_run(store, settings, tmp_path, ray_cluster):
    src = tmp_path / "many"
    src.mkdir()
    rnd = random.Random(7)
    words = "alpha beta gamma delta vector ray serve qdrant chunk token embed model query answer cite".split()
    for i in range(20):
        sents = [" ".join(rnd.choice(words) for _ in range(14)).capitalize() + "." for _ in range(12)]
        (src / f"doc{i:03d}.txt").write_text(" ".join(sents))
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address,
               ORFEAS_DATA_DIR=str(settings.data_dir), ORFEAS_RAG__UPSERT_BATCH_SIZE="4",
               # The fixture's batch size: the warm pool's name hashes it, so the job finds the
               # module's warm embedders (another size made a second pool, two more model loads).
               ORFEAS_RAG__EMBED_BATCH_SIZE=str(settings.rag.embed_batch_size),
               ORFEAS_CONFIG=str(tmp_path / "none.yaml"),
               # Calls of 4 chunks: the points land a few at a time whichever pool embeds them (a
               # warm pool's one call of 256 rows came back at once, all 40 between two polls).
               ORFEAS_RAG__EMBED_CALL_ROWS="4", ORFEAS_RAG__EMBED_POOL="warm",
               # two embedders, as the fixture's settings: unset, the job sized its pool to the
               # session cluster's 8 logical CPUs, eight model loads on two cores
               ORFEAS_RAG__EMBED_ACTORS="2")
    (tmp_path / "none.yaml").write_text("{}\n")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.ingest", str(src), "--collection", "killed"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(tmp_path))
    partial = 0
    killed_running = False
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            cols = [c for c in store.list_collections() if c.startswith("killed__v")]
            if cols:
                partial = store.count(cols[0])
                if partial >= 8:
                    break
            time.sleep(0.05)
    finally:
        killed_running = proc.poll() is None
        if killed_running:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    # Killed mid-run: some points written, the job not finished (how many depends on the CPU).
    assert killed_running and partial > 0, f"the job should be killed while running (had {partial} points)"
    with pytest.raises(CollectionNotFound):
        store.resolve("killed")  # the alias flips only when a run completes

    rerun = run_ingest(str(src), "killed", settings=settings, store=store)
    # The reference run loses an ingest worker (issue 18's chaos list): one of Ray Data's embedding
    # actors is SIGKILLed once the first points are upserted; Ray restarts it and sends its call
    # again. Small calls, so that more are in flight when it dies.
    settings.rag.embed_call_rows = settings.rag.embed_batch_size = settings.rag.upsert_batch_size = 4
    settings.rag.embed_pool = "job"  # the default pool, Ray Data's (the warm pool's loss has its own test)
    settings.rag.embed_actors = 1  # one model load, and one more when Ray restarts the killed actor
    victims: list[str] = []

    def kill_a_worker(_progress) -> None:
        if not victims:
            victims.extend(_kill_an_embedding_worker())

    clean = run_ingest(str(src), "clean", settings=settings, store=store, progress=kill_a_worker)
    assert victims, "no embedding worker was running to kill"
    assert partial < clean.chunks, f"the killed job had written all {clean.chunks} points"
    assert rerun.version_collection == "killed__v1"
    got, want = _points(store, "killed"), _points(store, "clean")
    assert got == want and len(got) == clean.chunks  # the worker's loss lost nothing...
    assert len(set(want)) == len(want) == store.count(store.resolve("clean"))  # ...and upserted nothing twice
    assert rerun.skipped > 0  # documents finished before the kill were not redone
    print(f"\nCHAOS ingest worker killed mid-job ({victims[0]}): {clean.chunks} chunks, as the undisturbed run, "
          "none twice")


def _kill_an_embedding_worker() -> list[str]:
    """SIGKILL one process of the ingest job's embedding actor pool (one busy with a call when there
    is one: Ray titles a worker process after the task it runs); its title, or nothing."""
    import psutil

    workers = []
    for proc in psutil.process_iter(["cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        # Ray Data's actor pool (only the embedding stage is one): "ray::_MapWorker[.submit]" or
        # titled by its repr, "ray::MapWorker(MapBatches(EmbedStage))[.submit]"
        if title.startswith("ray::") and ("EmbedStage" in title or "MapWorker" in title):
            workers.append((title, proc))
    workers.sort(key=lambda w: "." not in w[0].split(")")[-1])  # busy ones ("...).submit") first
    for title, proc in workers:
        try:
            proc.kill()
            return [title]
        except psutil.NoSuchProcess:
            continue
    return []


def _pool_actors(ray) -> dict[str, str]:
    from config.names import ACTOR_NAMESPACE

    return {a["name"]: ray.get_actor(a["name"], namespace=ACTOR_NAMESPACE)._actor_id.hex()
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == ACTOR_NAMESPACE and a["name"].startswith("orfeas-embedder-")}


def test_warm_embedders_serve_the_next_job_and_a_lost_call_is_sent_again(store, settings, tmp_path, ray_cluster):
    """rag.embed_pool warm: the second job finds the first job's actors (no model load); a call whose
    actor ends for good mid-job goes to a new actor under its name, and every chunk comes back."""
    import pyarrow as pa

    from rag.embed_pool import WarmPool
    from rag.ingest import ROW_SCHEMA

    settings.rag.embed_pool = "warm"
    src = tmp_path / "docs"
    _write_corpus(src)
    run_ingest(str(src), "warm1", settings=settings, store=store)
    first = _pool_actors(ray_cluster)
    assert first  # the pool outlives the job
    second = run_ingest(str(src / "cities.jsonl"), "warm2", settings=settings, store=store)
    assert second.chunks == 2 and _pool_actors(ray_cluster) == first  # the same actors: no new model load

    rows = [{"kind": "chunk", "id": f"c{i}", "embed_text": f"chunk number {i} about vectors"} for i in range(6)]
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    r = settings.rag
    from rag.embedding import dense_source, embedder_id

    pool = WarmPool(1, dict(model_dir=dense_source(settings), bm25=(r.bm25_k, r.bm25_b, r.bm25_avg_len),
                            batch_size=r.embed_batch_size, threads=r.embed_threads, embedder=embedder_id(settings)),
                    r.embed_pool_idle_s)

    def batches():
        yield table.slice(0, 3)
        ray_cluster.kill(pool.actors[0], no_restart=True)  # ended for good, its call in flight with it
        yield table.slice(3, 3)

    out = pa.concat_tables(list(pool.map(batches())))
    assert _pool_actors(ray_cluster)[pool.names[0]] != first[pool.names[0]]  # a new actor took the name
    assert sorted(out.column("id").to_pylist()) == [f"c{i}" for i in range(6)]
    assert all(len(v) == 384 for v in out.column("dense").to_pylist())
