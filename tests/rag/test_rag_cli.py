"""The RAG CLI commands through typer, against the session's Ray cluster and the Edge owner actor."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from cluster.rag_cli import register
from rag.chunking import Chunker, embedding_text
from rag.documents import parse_bytes
from rag.store import open_store


@pytest.fixture
def cli(ray_cluster, settings, tmp_path, monkeypatch, tokenizer, dense, sparse):
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.get_runtime_context().gcs_address)
    cfg = tmp_path / "orfeas.yaml"
    cfg.write_text(f"data_dir: {settings.data_dir}\n")
    store = open_store(settings)
    chunker = Chunker(tokenizer, 100, 10)
    docs = parse_bytes("faq.md", b"# FAQ\n\nThe office opens at nine. Lunch is served at noon in the canteen.")
    chunks = [c for d in docs for c in chunker.split(d)]
    texts = [embedding_text(c.title, c.section, c.text) for c in chunks]
    dv, sv = dense.embed(texts), sparse.embed_documents(texts)
    pts = [{"id": c.id, "dense": dv[i].tolist(), "sparse_indices": sv[i].indices, "sparse_values": sv[i].values,
            "payload": c.payload()} for i, c in enumerate(chunks)]
    for v in ("faq__v1", "faq__v2"):
        store.create_collection(v, 384)
        store.upsert(v, pts)
    store.set_alias("faq", "faq__v2")
    app = typer.Typer()
    register(app)
    runner = CliRunner()

    def invoke(*args):
        result = runner.invoke(app, [*args, "--config", str(cfg)])
        result.text = " ".join(result.output.split())  # rich wraps long lines
        return result

    return invoke


def test_collections_list_and_rollback(cli):
    r = cli("collections")
    assert r.exit_code == 0, r.output
    assert "faq__v1" in r.text and "faq__v2" in r.text
    r = cli("collections", "rollback", "faq")
    assert r.exit_code == 0 and "faq now serves v1" in r.text
    r = cli("collections", "rollback", "faq")
    assert r.exit_code == 2 and "no version older" in r.text


def test_ask_prints_answer_and_sources(cli):
    r = cli("ask", "When is lunch served?", "--collection", "faq")
    assert r.exit_code == 0, r.output
    assert "Lunch is served at noon in the canteen. [1]" in r.text
    assert "[1] FAQ — faq.md" in r.text and "model: extractive" in r.text
    r = cli("ask", "  ", "--collection", "faq")
    assert r.exit_code == 2 and "query must be a non-empty string" in r.text
    r = cli("ask", "x", "--collection", "missing")
    assert r.exit_code == 2 and "does not exist" in r.text


def test_eval_and_ingest_refuse_bad_paths(cli, tmp_path):
    r = cli("eval", "retrieval", "--dataset", str(tmp_path), "--split", "train")
    assert r.exit_code == 2 and "not a BEIR dataset" in r.text
    r = cli("ingest", str(tmp_path / "missing"))
    assert r.exit_code == 1 and "does not exist" in r.text
