"""Multi-vector MiniLM (rag.dense_window_tokens): each chunk's windows embedded at ingest and
stored as a MaxSim multi-vector, the dense list scoring a chunk by its best window. Real parts:
the shipped MiniLM and tokenizer, the ingest job on the session's Ray cluster, Qdrant Edge."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from rag.chunking import Chunker, window_texts
from rag.errors import EmbedderMismatch
from rag.ingest import EMBEDDED_SCHEMA, ROW_SCHEMA, EmbedStage, indexing_params, run_ingest
from rag.retrieval import Retriever
from rag.store import open_store

LONG = ("Ray Serve deploys models as replicas behind one HTTP proxy. It scales them with request load. "
        "Qdrant stores dense and sparse vectors for hybrid search. The Spree river flows through Berlin, "
        "the capital of Germany, and joins the Havel at Spandau. Cats sleep most of the day.")


def chunk_row(text: str) -> dict:
    return {"doc_id": "d", "source": "d.txt", "title": "Notes", "section": "", "text": text}


def test_windows_cut_a_chunk_at_sentences_and_lead_with_its_title(tokenizer):
    wins = window_texts(Chunker(tokenizer, 24, 8), chunk_row(LONG))
    assert len(wins) >= 3 and all(w.startswith("Notes\n") for w in wins)
    assert all(len(tokenizer.encode(w[len("Notes\n"):], add_special_tokens=False).ids) <= 24 for w in wins)
    assert any("Spree river" in w for w in wins) and not all("Spree" in w for w in wins)
    short = window_texts(Chunker(tokenizer, 24, 8), chunk_row("Cats sleep."))
    assert short == ["Notes\nCats sleep."]  # no longer than a window: the chunk is its own window


def test_the_encoder_writes_one_vector_per_window(minilm_dir, dense):
    stage = EmbedStage(minilm_dir, (1.2, 0.75, 200.0), 8, 1, embedder="all-minilm-l6-v2/fp32")
    wins = ["Notes\nRay Serve deploys models.", "Notes\nThe Spree flows through Berlin."]
    rows = [{"kind": "chunk", "id": "p1", "title": "Notes", "section": "", "text": "x", "embed_text": "Notes\nx",
             "window_texts": wins},
            {"kind": "chunk", "id": "p2", "title": "Notes", "section": "", "text": "y", "embed_text": "Notes\ny"},
            {"kind": "skipped", "doc_id": "z"},
            {"kind": "chunk", "id": "p3", "title": "Notes", "section": "", "text": "z", "embed_text": "Notes\nz",
             "window_texts": ["Notes\nz"]}]  # its own only window: its chunk vector
    table = stage(pa.Table.from_pylist(rows, schema=ROW_SCHEMA))
    assert table.schema == EMBEDDED_SCHEMA
    out = table.to_pylist()
    assert len(out[0]["dense_windows"]) == 2 and out[1]["dense_windows"] == [] and out[2]["dense_windows"] == []
    ref = dense.embed(wins)
    for got, want in zip(out[0]["dense_windows"], ref):
        assert float(np.asarray(got) @ want) > 0.999
    assert out[3]["dense_windows"] == [out[3]["dense"]]


def test_a_window_is_a_part_of_a_chunk():
    from pydantic import ValidationError

    from config.settings import RagSettings

    assert RagSettings(dense_window_tokens=128).dense_window_tokens == 128
    for bad in (8, 200, 300):
        with pytest.raises(ValidationError, match="dense_window_tokens"):
            RagSettings(dense_window_tokens=bad)


def test_an_ingest_with_windows_finds_a_chunk_by_its_best_window_and_refuses_an_old_version(
        ray_cluster, settings, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_text(LONG)
    (src / "other.txt").write_text("Boil the pasta in salted water for nine minutes, then drain it.")
    store = open_store(settings)
    run_ingest(str(src), "plain", settings=settings, store=store)
    off = indexing_params(settings)
    settings.rag.dense_window_tokens = 24
    assert ";win=24" in indexing_params(settings) and ";win=" not in off  # a re-ingest rewrites every document
    with pytest.raises(EmbedderMismatch, match="dense_windows"):
        run_ingest(str(src), "plain", settings=settings, store=store)  # its version has no windows: --rebuild
    summary = run_ingest(str(src), "win", settings=settings, store=store)
    assert summary.chunks == 2 and "dense_windows" in store.dense_vectors(store.resolve("win"))
    retriever = Retriever(settings, store)
    for mode in ("dense", "hybrid"):
        chunks, _ = retriever.retrieve("Which river flows through Berlin?", "win", top_k=2, mode=mode)
        assert chunks[0].doc_id.endswith("notes.txt")
    # a collection written without windows still answers with them asked for: one vector per chunk
    chunks, _ = retriever.retrieve("pasta in salted water", "plain", top_k=1, mode="dense")
    assert chunks[0].doc_id.endswith("other.txt")
