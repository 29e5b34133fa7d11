"""Ingest documents into a versioned collection with Ray Data (the library behind `jobs.ingest`).

Pipeline: list files (local file/dir/glob, or s3:// gs:// abfs:// through pyarrow/fsspec) ->
parse + chunk (Ray Data tasks) -> embed dense + BM25 (Ray Data actor pool) -> upsert in
batches into the store (the Edge owner actor or a Qdrant server).

Idempotent: point ids are uuid5(doc id, chunk index); a document whose points all carry its
current hash and are all present is skipped; a changed document's chunks are overwritten and its
older chunks removed; documents gone from the source are removed. A killed run leaves documents
half-written, which the next run sees (missing points or mixed hashes) and redoes, so a re-run
ends with exactly the chunks of one clean run. `--rebuild` writes a new version and flips the
alias only at the end.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import logging
import os
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import pyarrow as pa
from pydantic import BaseModel, Field

from config import Settings, load_settings
from observability import metrics, tracing
from rag.chunking import Chunk, Chunker, embedding_text, load_tokenizer, window_texts
from rag.errors import ParseError, SourceNotAllowed, SourceUnreadable
from rag.graph_llm import FALLBACK as GRAPH_FALLBACK
from rag.graph_llm import extractor_name as graph_extractor_name
from rag.payload import PAYLOAD_FIELDS, arrow_schema

log = logging.getLogger(__name__)

PROGRESS_TAG = "ORFEAS_PROGRESS"
SUMMARY_TAG = "ORFEAS_SUMMARY"
_URI_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "abfss://", "az://", "hdfs://", "file://", "memory://")

BLOCK_BYTES = 512 * 1024
CHUNK_ROWS_OUT = 256
EMBED_ACTORS_AUTO_MAX = 8
SECOND_DIM = 384  # multilingual-e5-small's width (rag.second_dense)


class StreamRow(Chunk):
    """A row between the parse and embed stages: a chunk (kind=chunk), or one row per unchanged
    document (skipped) or unparseable file (failed). Rows are plain dicts; this model only gives
    their columns (ROW_SCHEMA), the chunk payload's among them."""

    kind: Literal["chunk", "skipped", "failed"] = "chunk"
    id: str = ""
    embed_text: str = ""     # what the encoders see (embedding_text)
    window_texts: list[str] = []  # what the dense encoder sees per window (rag.dense_window_tokens), else empty
    error: str = ""          # why a file failed


class EmbeddedRow(StreamRow):
    """A row after the embed stage: its dense and BM25 vectors (empty for skipped and failed rows)."""

    dense: list[float] = []
    dense_e5: list[float] = []   # the second dense model's vector (rag.second_dense), else empty
    dense_windows: list[list[float]] = []  # the dense model's vector of each window, else empty
    sparse_indices: list[int] = []
    sparse_values: list[float] = []


ROW_SCHEMA = arrow_schema(StreamRow)
EMBEDDED_SCHEMA = arrow_schema(EmbeddedRow)
GRAPH_FALLBACK_MARK = f'"{GRAPH_FALLBACK}":'  # only such chunks' graph JSON is parsed while writing


class IngestSummary(BaseModel):
    source: str
    collection: str
    version_collection: str
    alias_flipped: bool
    files: int
    documents: int          # documents seen in the source (indexed + skipped)
    indexed: int            # documents (re)written this run
    chunks: int             # chunks written this run
    skipped: int            # unchanged documents
    deleted: int            # documents removed (gone from the source)
    failed: list[dict[str, str]]   # [{"path", "reason"}]
    seconds: float
    chunks_per_s: float
    # chunks whose LLM graph extraction (rag.graph.extractor: llm) fell back to the rules, by reason
    graph_fallbacks: dict[str, int] = Field(default_factory=dict)


# --- sources ------------------------------------------------------------------------------------

def is_uri(source: str) -> bool:
    return source.startswith(_URI_SCHEMES)


def check_allowed(source: str, settings: Settings) -> None:
    """API-triggered ingest may read only under rag.allowed_roots (default: data_dir/uploads)."""
    roots = settings.rag.allowed_roots or [str(settings.resolved_data_dir() / "uploads")]
    if is_uri(source):
        ok = any(source.startswith(r.rstrip("/") + "/") or source == r for r in roots if is_uri(r))
    else:
        real = os.path.realpath(os.path.expanduser(source.split("*")[0] or "."))
        ok = False
        for r in roots:
            if is_uri(r):
                continue
            rr = os.path.realpath(os.path.expanduser(r))
            if real == rr or real.startswith(rr.rstrip(os.sep) + os.sep):
                ok = True
    if not ok:
        raise SourceNotAllowed(f"source {source!r} is outside the allowed ingest roots", "source")


def _filesystem(uri: str):
    """(filesystem, path) for a URI: pyarrow's own filesystems, else fsspec through pyarrow."""
    from pyarrow import fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def list_sources(source: str) -> tuple[list[dict[str, Any]], str]:
    """Files under a source (file, directory, glob or URI) with their modification dates, and the
    normalised source root that scopes deletions."""
    from rag.documents import supported

    files: list[dict[str, Any]] = []
    if is_uri(source):
        from pyarrow import fs as pafs

        has_glob = any(ch in source for ch in "*?[")
        base = source.split("*")[0].rsplit("/", 1)[0] if has_glob else source
        try:
            fs, path = _filesystem(base)
            info = fs.get_file_info(path)
            scheme = source.split("://", 1)[0] + "://"
            if info.type == pafs.FileType.NotFound:
                raise SourceUnreadable(f"source {source!r} does not exist", "source")
            infos = [info] if info.type == pafs.FileType.File else \
                fs.get_file_info(pafs.FileSelector(path, recursive=True))
            for i in infos:
                if i.type != pafs.FileType.File:
                    continue
                uri = i.path if "://" in i.path else scheme + i.path.lstrip("/") if scheme != "file://" else scheme + i.path
                if has_glob and not fnmatch.fnmatch(uri, source):
                    continue
                if supported(uri):
                    files.append({"path": uri, "mtime": i.mtime.isoformat() if i.mtime else None})
        except SourceUnreadable:
            raise
        except Exception as e:
            raise SourceUnreadable(f"cannot list {source!r}: {type(e).__name__}: {e}", "source") from e
        return sorted(files, key=lambda f: f["path"]), source.rstrip("/")

    expanded = os.path.expanduser(source)
    if any(ch in expanded for ch in "*?["):
        paths = [p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p)]
        root = os.path.abspath(expanded)
    else:
        p = Path(expanded)
        if not p.exists():
            raise SourceUnreadable(f"source {source!r} does not exist", "source")
        if not os.access(p, os.R_OK):
            raise SourceUnreadable(f"source {source!r} is not readable", "source")
        if p.is_dir():
            paths = [str(f) for f in p.rglob("*") if f.is_file()
                     and not any(part.startswith(".") for part in f.relative_to(p).parts)]
        else:
            paths = [str(p)]
        root = str(p.resolve())
    for path in sorted(paths):
        if not supported(path) and not (len(paths) == 1):
            continue  # in a directory, skip files of unknown type silently
        st = os.stat(path)
        files.append({"path": str(Path(path).resolve()),
                      "mtime": datetime.fromtimestamp(st.st_mtime, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
    return files, root


def read_bytes(path: str) -> bytes:
    if is_uri(path):
        fs, p = _filesystem(path)
        with fs.open_input_stream(p) as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


# --- Ray Data stages ----------------------------------------------------------------------------

def index_hash(doc_hash: str, params: str) -> str:
    """A document's hash together with the indexing parameters: changing either re-indexes it."""
    return hashlib.sha256(f"{doc_hash}|{params}".encode()).hexdigest()[:32]


def _norm_date(value: str | None) -> str | None:
    if not value:
        return None
    try:
        d = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    if d.tzinfo is None:
        d = d.replace(tzinfo=timezone.utc)
    return d.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_STATE_CACHE: dict[str, dict[str, str]] = {}


def _complete_hashes(ref) -> dict[str, str]:
    import ray

    key = ref.hex() if hasattr(ref, "hex") else str(id(ref))
    if key not in _STATE_CACHE:
        _STATE_CACHE.clear()
        _STATE_CACHE[key] = ray.get(ref)
    return _STATE_CACHE[key]


def apply_pii_policy(row: dict[str, Any], policy: str, detector) -> dict[str, Any]:
    """pii.ingest on one chunk row: `tag` adds pii:<TYPE> tags, `redact` replaces the values by
    placeholders in the stored text (before it is embedded, so vectors never see them either)."""
    if policy == "tag":
        row["tags"] = sorted(set(row.get("tags") or []) | set(detector.tags(row["text"])))
    elif policy == "redact":
        row["text"] = detector.redact(row["text"])[0]
    return row


def parse_and_chunk(batch: pa.Table, *, model_dir: str, size: int, overlap: int, params: str, root: str,
                    states_ref, with_title: bool = True, pii: dict[str, Any] | None = None,
                    graph: dict[str, Any] | None = None, window: int = 0) -> Iterator[pa.Table]:
    """Files -> chunk rows (kind=chunk), plus one row per unchanged (skipped) doc or failed file;
    with `graph` (`rag.graph` as a dict), each chunk's entities and relations (rag/graph.py, after the PII policy: a
    redacted name is no entity).
    Yields every CHUNK_ROWS_OUT rows, so one file holding a whole corpus still streams to the
    encoder instead of arriving all at once."""
    from rag.documents import parse_bytes
    from rag.graph_llm import chunk_extractor

    extract_graph = chunk_extractor(graph) if graph else None
    complete = _complete_hashes(states_ref)
    chunker = Chunker(load_tokenizer(model_dir), size, overlap)
    windower = Chunker(chunker.tok, window, min(overlap, window - 1)) if window else None
    detector = None
    if pii and pii["ingest"] != "off":
        from security.pii import detector_for

        detector = detector_for(pii["entities"], pii["spacy_model"], pii["min_score"])
    rows: list[dict[str, Any]] = []
    for f in batch.to_pylist():
        path = f["path"]
        try:
            docs = parse_bytes(path, read_bytes(path), date=f.get("mtime"))
        except ParseError as e:
            rows.append({"kind": "failed", "source": path, "root": root, "error": e.reason})
            continue
        except OSError as e:
            rows.append({"kind": "failed", "source": path, "root": root, "error": f"unreadable: {e}"})
            continue
        except Exception as e:  # a parser bug must not sink the job: report the file
            rows.append({"kind": "failed", "source": path, "root": root, "error": f"{type(e).__name__}: {e}"})
            continue
        for d in docs:
            h = index_hash(d.doc_hash, params)
            if complete.get(d.doc_id) == h:
                rows.append({"kind": "skipped", "doc_id": d.doc_id, "source": d.source, "root": root, "doc_hash": h})
                continue
            d.date = _norm_date(d.date)
            try:
                chunks = chunker.split(d)
            except Exception as e:
                rows.append({"kind": "failed", "source": f"{path}#{d.record_id or d.doc_id}", "root": root,
                             "error": f"chunking failed: {type(e).__name__}: {e}"})
                continue
            for c in chunks:
                r = c.model_dump()
                if detector is not None:
                    r = apply_pii_policy(r, pii["ingest"], detector)
                r.update(kind="chunk", root=root, doc_hash=h,
                         embed_text=embedding_text(r["title"], r["section"], r["text"], with_title))
                if extract_graph is not None:
                    r["graph"] = extract_graph(r["text"])
                if windower is not None:
                    r["window_texts"] = window_texts(windower, r, with_title)
                rows.append(r)
            if len(rows) >= CHUNK_ROWS_OUT:
                yield pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
                rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


class EmbedStage:
    """Ray Data actor: loads the dense model once, embeds dense + BM25 for chunk rows, and the
    second dense model's vector too when `second` ({model, precision, passage_title}) is given."""

    def __init__(self, model_dir: str, bm25: tuple[float, float, float], batch_size: int, threads: int,
                 embedder: str = "", second: dict[str, str] | None = None):
        from models.embedders import DenseEmbedder
        from rag.embedding import SparseEncoder

        # `threads` intra-op threads (PyTorch, or ONNX Runtime for an optimised model directory):
        # the actor's own process, its num_cpus.
        self.dense = DenseEmbedder(model_dir, batch_size=batch_size, threads=threads).load()
        self.sparse = SparseEncoder(*bm25)
        self.embedder = embedder  # recorded on every point: which model/variant wrote the vector
        self.second = self.second_id = None
        if second:
            from models.e5 import E5Embedder

            self.second = E5Embedder(second["model"], precision=second["precision"], threads=threads,
                                     max_batch=batch_size).load()
            self.second_id, self.passage_title = self.second.id, second["passage_title"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        idx = [i for i, r in enumerate(rows) if r["kind"] == "chunk"]
        texts = [rows[i]["embed_text"] for i in idx]
        dense = self.dense.embed(texts)
        sparse = self.sparse.embed_documents(texts)
        windows = [rows[i]["window_texts"] or [] for i in idx]
        # a chunk that is its own only window has its chunk vector as its window's
        flat = [t for j, ws in enumerate(windows) if ws != [texts[j]] for t in ws]
        window_vecs = iter(self.dense.embed(flat)) if flat else iter(())
        second = None
        if self.second is not None:
            from rag.embedding import second_passage_text

            second = self.second.embed([second_passage_text(rows[i]["title"], rows[i]["section"], rows[i]["text"],
                                                            rows[i]["embed_text"], self.passage_title) for i in idx],
                                       is_query=False)
        for r in rows:
            r["dense"], r["dense_e5"], r["sparse_indices"], r["sparse_values"] = [], [], [], []
            r["dense_windows"] = []
        for j, i in enumerate(idx):
            rows[i]["embedder"] = self.embedder
            rows[i]["dense"] = dense[j].tolist()
            rows[i]["dense_windows"] = ([dense[j].tolist()] if windows[j] == [texts[j]]
                                        else [next(window_vecs).tolist() for _ in windows[j]])
            if second is not None:
                rows[i]["second_embedder"] = self.second_id
                rows[i]["dense_e5"] = second[j].tolist()
            rows[i]["sparse_indices"] = sparse[j].indices
            rows[i]["sparse_values"] = sparse[j].values
        return pa.Table.from_pylist(rows, schema=EMBEDDED_SCHEMA)


# --- the job ------------------------------------------------------------------------------------

def embed_actors(settings: Settings) -> int:
    """The embedding pool's largest size: rag.embed_actors, else one actor per embed_threads CPUs
    of the cluster, at most EMBED_ACTORS_AUTO_MAX (each holds its own copy of the model)."""
    import ray

    if settings.rag.embed_actors:
        return settings.rag.embed_actors
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(EMBED_ACTORS_AUTO_MAX, cpus // settings.rag.embed_threads))


def indexing_params(settings: Settings) -> str:
    """What a document's stored chunks depend on besides its content. Encryption at rest is part of
    it: a document indexed in plaintext is re-written when encryption is switched on (else the
    re-ingest skips it, and every query of it is refused), and in plaintext when it is off."""
    r = settings.rag
    pii = f";pii={settings.pii.ingest}" if settings.pii.enabled and settings.pii.ingest != "off" else ""
    enc = ";enc" if settings.encryption.enabled else ""
    graph = f";graph={graph_extractor_name(r.graph.model_dump())}" if r.graph.extract else ""
    second = ""
    if r.second_dense.enabled:
        from rag.embedding import second_embedder_id

        second = f";e5={second_embedder_id(settings)}/{r.second_dense.passage_title}"
    windows = f";win={r.dense_window_tokens}" if r.dense_window_tokens else ""
    return (f"chunk={r.chunk_tokens}/{r.chunk_overlap};bm25={r.bm25_k}/{r.bm25_b}/{r.bm25_avg_len};"
            f"model={r.embedding_model}{graph}{second}{windows}{enc}{pii}")


def run_ingest(source: str, collection: str | None = None, *, settings: Settings | None = None,
               rebuild: bool = False, store=None, enforce_roots: bool = False,
               progress: Callable[[dict[str, Any]], None] | None = None) -> IngestSummary:
    """Run the ingest pipeline on the connected Ray cluster and return its summary (traced as
    `ingest.run` with a span per stage: list, stream with its upserts, clean-up, alias flip)."""
    with tracing.span("ingest.run", {"orfeas.ingest.source": source, "orfeas.ingest.rebuild": rebuild}) as s:
        try:
            summary = _run_ingest(source, collection, settings=settings, rebuild=rebuild, store=store,
                                  enforce_roots=enforce_roots, progress=progress)
        except Exception:
            metrics.ingest_finished("failed")
            raise
        metrics.ingest_finished("succeeded", summary.chunks, summary.chunks_per_s, len(summary.failed))
        s.set_attributes({"orfeas.ingest.collection": summary.collection, "orfeas.ingest.files": summary.files,
                          "orfeas.ingest.chunks": summary.chunks, "orfeas.ingest.failed": len(summary.failed),
                          "orfeas.ingest.chunks_per_s": summary.chunks_per_s})
        _audit_run(settings or load_settings(), summary)
        return summary


def _audit_run(settings: Settings, summary: IngestSummary) -> None:
    """The run in the audit chain (`data.ingest.run`): which Ray job wrote which collection
    version; an answer's lineage (rag/lineage.py) leads back to it."""
    import ray

    from security.audit import audit_event

    job = ray.get_runtime_context().get_job_id() if ray.is_initialized() else ""
    audit_event(settings, "data.ingest.run", {"job_id": job, "version_collection": summary.version_collection,
                                              "documents": summary.documents, "indexed": summary.indexed,
                                              "chunks": summary.chunks, "failed": len(summary.failed)},
                actor=f"job:{job}" if job else "ingest", target=f"collection:{summary.collection}")


def _run_ingest(source: str, collection: str | None, *, settings: Settings | None, rebuild: bool, store,
                enforce_roots: bool, progress: Callable[[dict[str, Any]], None] | None) -> IngestSummary:
    import ray

    from rag.embedding import check_embedder, dense_source, embedder_dir, embedder_id
    from rag.store import open_store
    from rag.versions import check_logical_name, ingest_target

    t0 = time.perf_counter()
    settings = settings or load_settings()
    r = settings.rag
    collection = collection or r.collection
    check_logical_name(collection)
    if enforce_roots:
        check_allowed(source, settings)
    with tracing.span("ingest.list") as s:
        files, root = list_sources(source)
        s.set_attribute("orfeas.ingest.files", len(files))
    if not files:
        raise SourceUnreadable(f"no ingestible files under {source!r}", "source")
    store = store or open_store(settings)
    model_dir = embedder_dir(settings)
    dense_dir = dense_source(settings)  # the variant's model (fp32, or an optimised directory)
    dim = 384 if r.embedding_model == "all-minilm-l6-v2" else _dimension(model_dir)
    second_dim = SECOND_DIM if r.second_dense.enabled else None
    target, flip = ingest_target(store, collection, dim, rebuild, second_dim, windows=bool(r.dense_window_tokens))
    if r.dense_window_tokens:
        from rag.embedding import DENSE_WINDOWS
        from rag.errors import EmbedderMismatch

        if DENSE_WINDOWS not in store.dense_vectors(target):
            raise EmbedderMismatch(f"collection {collection!r} ({target}) was made without {DENSE_WINDOWS!r} vectors "
                                   "and rag.dense_window_tokens is set: ingest with --rebuild to write a version that "
                                   "has them", "collection")
    if second_dim:
        from rag.embedding import DENSE_E5
        from rag.errors import EmbedderMismatch

        if DENSE_E5 not in store.dense_vectors(target):
            raise EmbedderMismatch(f"collection {collection!r} ({target}) was made without {DENSE_E5!r} vectors and "
                                   "rag.second_dense is on: ingest with --rebuild to write a version that has them",
                                   "collection")
    log.info("ingesting %d file(s) from %s into %s (version %s)", len(files), source, collection, target)

    states = store.doc_states(target)
    for stored in {s["embedder"] for s in states.values()}:
        check_embedder(collection, stored, embedder_id(settings))  # never mix two variants' vectors
    complete = {d: next(iter(s["hashes"])) for d, s in states.items()
                if len(s["hashes"]) == 1 and s["count"] == s["n_chunks"]}
    states_ref = ray.put(complete)

    # Small blocks keep the stream moving: embedded chunks reach the upserts (and the progress
    # report) while later ones are still being embedded, even when one file holds the corpus.
    ctx = ray.data.DataContext.get_current()
    saved_block_size, ctx.target_max_block_size = ctx.target_max_block_size, BLOCK_BYTES
    try:
        return _pipeline(settings, store, files=files, model_dir=model_dir, dense_dir=dense_dir, root=root, states_ref=states_ref,
                         target=target, states=states, flip=flip, collection=collection,
                         source=source, t0=t0, progress=progress)
    finally:
        ctx.target_max_block_size = saved_block_size


def _pipeline(settings: Settings, store, *, files, model_dir, dense_dir, root, states_ref, target, states, flip,
              collection, source, t0, progress) -> IngestSummary:
    """Ray Data: parse + chunk -> embed (actor pool) -> upserts from the stream; then clean-up."""
    import ray

    from rag.embedding import embedder_id

    r = settings.rag
    ds = ray.data.from_items(files, override_num_blocks=max(1, min(len(files), 64)))
    # Parsing runs as its own tasks, not fused into the embedding actors (its other num_cpus keeps
    # Ray Data from fusing them): it overlaps the actors' model load, the encoders never stop to
    # chunk, and the chunks of one big file spread over every actor. Half a CPU: it is light
    # next to embedding, and an actor can start beside it on a 2-CPU node.
    # At most parse_tasks at once: each task is a worker process that imports the tokenizer, and a
    # local head's logical CPUs are several per core (16 half-CPU parsers started on 2 cores took
    # ~18 s before a small job's first chunk).
    ds = ds.map_batches(parse_and_chunk, batch_size=1, batch_format="pyarrow", num_cpus=0.5,
                        compute=ray.data.TaskPoolStrategy(size=min(len(files), r.parse_tasks or embed_actors(settings))),
                        fn_kwargs=dict(model_dir=model_dir, size=r.chunk_tokens, overlap=r.chunk_overlap,
                                       params=indexing_params(settings), root=root, states_ref=states_ref,
                                       pii=settings.pii.model_dump() if settings.pii.enabled else None,
                                       graph=r.graph.model_dump() if r.graph.extract else None,
                                       window=r.dense_window_tokens))
    stage = dict(model_dir=dense_dir, bm25=(r.bm25_k, r.bm25_b, r.bm25_avg_len), batch_size=r.embed_batch_size,
                 threads=r.embed_threads, embedder=embedder_id(settings))
    if r.second_dense.enabled:
        sd = r.second_dense
        stage["second"] = {"model": sd.model, "precision": sd.precision, "passage_title": sd.passage_title}
    call_rows = max(r.embed_call_rows, r.embed_batch_size)
    if r.embed_pool == "warm":
        # Actors that outlive the job (rag/embed_pool.py): a job after the first pays no model load.
        from rag.embed_pool import WarmPool

        pool = WarmPool(embed_actors(settings), stage, r.embed_pool_idle_s)
        embedded = _slices(pool.map(ds.iter_batches(batch_size=call_rows, batch_format="pyarrow")),
                           r.upsert_batch_size)
    else:
        # Each call gets embed_call_rows chunks; the encoder sorts them by length into batches of
        # embed_batch_size, so batches pad little. The pool grows from one actor while chunks queue
        # up; two tasks in flight per actor keep the small blocks spread over all of them.
        ds = ds.map_batches(EmbedStage, batch_size=call_rows, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=embed_actors(settings),
                                                               max_tasks_in_flight_per_actor=2),
                            num_cpus=r.embed_threads, fn_constructor_kwargs=stage)
        embedded = ds.iter_batches(batch_size=r.upsert_batch_size, batch_format="pyarrow")

    seen_docs: dict[str, str] = {}     # doc_id -> index hash (written or skipped)
    written_docs: set[str] = set()
    failed: list[dict[str, str]] = []
    graph_fallbacks: Counter = Counter()
    chunks = skipped = 0
    last = 0.0
    # parse, chunk and embed run in Ray Data's tasks and actors; this span covers the stream they
    # feed, with one child span per upsert batch
    stream = tracing.start("ingest.stream", {"orfeas.ingest.files": len(files)})
    for batch in embedded:
        points = []
        for row in batch.to_pylist():
            kind = row["kind"]
            if kind == "failed":
                failed.append({"path": row["source"], "reason": row["error"]})
                log.warning("could not ingest %s: %s", row["source"], row["error"])
                continue
            if kind == "skipped":
                seen_docs[row["doc_id"]] = row["doc_hash"]
                skipped += 1
                continue
            seen_docs[row["doc_id"]] = row["doc_hash"]
            written_docs.add(row["doc_id"])
            if row["graph"] and GRAPH_FALLBACK_MARK in row["graph"]:
                graph_fallbacks[json.loads(row["graph"]).get(GRAPH_FALLBACK, "")] += 1
            points.append({"id": row["id"], "dense": row["dense"], "dense_e5": row["dense_e5"] or None,
                           "dense_windows": row["dense_windows"] or None,
                           "sparse_indices": row["sparse_indices"],
                           "sparse_values": row["sparse_values"], "payload": {k: row[k] for k in PAYLOAD_FIELDS}})
        if points:
            with tracing.current(stream), tracing.span("ingest.upsert", {"orfeas.ingest.points": len(points)}):
                store.upsert(target, points)
            chunks += len(points)
        now = time.perf_counter()
        if progress and now - last > 0.5:
            last = now
            progress({"files": len(files), "documents": len(seen_docs), "chunks": chunks, "skipped": skipped,
                      "failed": len(failed), "seconds": round(now - t0, 1)})

    stream.set_attributes({"orfeas.ingest.chunks": chunks, "orfeas.ingest.skipped": skipped,
                           "orfeas.ingest.failed": len(failed)})
    stream.end()
    cleanup = tracing.start("ingest.cleanup")
    # Older versions of rewritten documents, and documents gone from this source.
    for doc_id in written_docs:
        if doc_id in states:
            store.delete_stale(target, doc_id, seen_docs[doc_id])
    failed_sources = {f["path"] for f in failed}
    gone = [d for d, s in states.items() if s.get("root") == root and d not in seen_docs
            and s.get("source") not in failed_sources]
    if gone:
        store.delete_docs(target, gone)
    with tracing.current(cleanup):
        store.flush(target)
    cleanup.end()
    if flip:
        with tracing.span("ingest.flip", {"orfeas.ingest.collection": collection, "orfeas.ingest.version": target}):
            store.set_alias(collection, target)
    secs = time.perf_counter() - t0
    summary = IngestSummary(
        source=source, collection=collection, version_collection=target, alias_flipped=flip, files=len(files),
        documents=len(seen_docs), indexed=len(written_docs), chunks=chunks, skipped=skipped, deleted=len(gone),
        failed=failed, seconds=round(secs, 2), chunks_per_s=round(chunks / secs, 1) if secs > 0 else 0.0,
        graph_fallbacks=dict(graph_fallbacks))
    log.info("ingest done: %s", summary.model_dump_json())
    return summary


def _slices(tables: Iterator[pa.Table], rows: int) -> Iterator[pa.Table]:
    """Tables of at most `rows` rows (the upsert batches) from tables of any size."""
    for t in tables:
        for offset in range(0, t.num_rows, rows):
            yield t.slice(offset, rows)


def _dimension(model_dir: str) -> int:
    from rag.embedding import shared_dense

    return shared_dense(model_dir).dim


def format_summary(s: IngestSummary) -> str:
    lines = [f"ingested {s.source} into {s.collection} ({s.version_collection}"
             + (", alias flipped" if s.alias_flipped else "") + ")",
             f"  documents {s.documents}  indexed {s.indexed}  chunks {s.chunks}  skipped {s.skipped}  "
             f"deleted {s.deleted}  failed {len(s.failed)}",
             f"  {s.seconds:.1f} s  {s.chunks_per_s:.1f} chunks/s"]
    if s.graph_fallbacks:
        lines.append("  graph: LLM extraction fell back to the rules for "
                     + ", ".join(f"{n} chunk(s) ({why})" for why, n in sorted(s.graph_fallbacks.items())))
    for f in s.failed:
        lines.append(f"  failed: {f['path']}: {f['reason']}")
    return "\n".join(lines)

