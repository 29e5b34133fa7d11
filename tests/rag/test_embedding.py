"""The dense model on its two runtimes: ONNX Runtime must give PyTorch's vectors, in input order."""

import numpy as np
import pytest
from pydantic import ValidationError

from config import Settings
from models.embedders import DenseEmbedder


@pytest.fixture(scope="module")
def runtimes(minilm_dir):
    return DenseEmbedder(minilm_dir, batch_size=4), DenseEmbedder(minilm_dir, batch_size=4, runtime="onnx")


def test_onnx_runtime_gives_pytorchs_vectors_in_input_order(runtimes):
    torch_side, onnx_side = runtimes
    texts = ["short", "A medium sentence about Ray Serve replicas and their queues.",
             "word " * 400,  # past the model's 256-token window: both truncate the same way
             "Qdrant Edge keeps BM25 and HNSW in process.", "", "x" * 3, "Tokens, tokens; and more tokens!"]
    a, b = torch_side.embed(texts), onnx_side.embed(texts)
    assert a.shape == b.shape == (len(texts), 384) and b.dtype == np.float32
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert (a * b).sum(axis=1).min() > 0.9999  # same vector for every text, order kept across batches
    assert onnx_side.embed([]).shape == (0, 384)
    assert np.allclose(onnx_side.embed([texts[1]])[0], b[1], atol=1e-5)  # alone or in a batch


def test_unknown_runtime_is_refused_naming_the_field():
    with pytest.raises(ValidationError) as e:
        Settings(rag={"query_embedding_runtime": "tensorflow"})
    assert "query_embedding_runtime" in str(e.value)


def test_the_embedding_deployment_and_rag_use_one_embedder_with_the_same_vectors(runtimes):
    torch_side, _ = runtimes
    spec = Settings().model("all-minilm-l6-v2")
    served = DenseEmbedder.from_spec(spec)  # what serve.model_apps.EmbeddingServer hosts
    assert served.spec is spec and served.model is None  # loads on load(), where the server catches failures
    texts = ["Ray Serve scales replicas.", "Qdrant fuses dense and sparse results."]
    assert np.allclose(served.load().embed(texts), torch_side.embed(texts), atol=1e-6)
    assert served.dim == 384
    counts = served.token_counts(texts + ["word " * 400])
    assert counts[0] == len(served.model.tokenizer(texts[0])["input_ids"]) and counts[2] <= 512
    assert served.token_counts([]) == []


def test_a_missing_model_fails_on_load_not_on_construction(tmp_path):
    spec = Settings().model("all-minilm-l6-v2").model_copy(update={"source": str(tmp_path / "absent")})
    embedder = DenseEmbedder.from_spec(spec)
    with pytest.raises(Exception):
        embedder.load()


def test_ingest_threads_set_the_torch_runtime_threads(minilm_dir):
    import torch

    before = torch.get_num_threads()
    try:
        DenseEmbedder(minilm_dir, batch_size=8, threads=1).load()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
