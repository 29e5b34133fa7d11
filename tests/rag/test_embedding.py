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
