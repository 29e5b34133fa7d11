"""Dense (normalised sentence-transformers) and sparse (BM25) encoders.

The dense model runs on one of two runtimes with the same weights, tokenizer and pooling:
PyTorch (sentence-transformers' own `encode`) or ONNX Runtime (the model's transformer exported
in memory at load; pooling and normalisation stay sentence-transformers' modules). ONNX Runtime
embeds one short query ~4x faster on CPU, which is most of a RAG query's own time; the vectors
agree with PyTorch's to float precision, so either runtime can read a collection the other wrote.

The sparse side is Qdrant's own `Bm25` (from qdrant-edge-py): documents get BM25 term-frequency
weights, queries get 1.0 per unique token, and the store applies IDF (the vector's `Idf`
modifier). Both sides use the same `Bm25` object, so query and document tokenisation (word
tokeniser, lowercase, English stop words, Snowball stemmer) cannot drift apart.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

from config import Settings

log = logging.getLogger(__name__)

DENSE = "dense"
SPARSE = "bm25"


def embedder_dir(settings: Settings) -> str:
    """Directory of the configured sentence-transformers embedding model."""
    from models.engines.sentence_embedder import resolve_embedder_source

    spec = settings.model(settings.rag.embedding_model)
    if spec is None:
        raise ValueError(f"rag.embedding_model {settings.rag.embedding_model!r} is not in the model catalog")
    if spec.engine != "sentence-transformers":
        raise ValueError(f"rag.embedding_model {spec.id!r} must use engine 'sentence-transformers'")
    return resolve_embedder_source(spec.source)


@dataclass(frozen=True)
class SparseVec:
    indices: list[int]
    values: list[float]


Runtime = Literal["torch", "onnx"]


def default_threads() -> int:
    """Intra-op threads for an ONNX session: the node's cores, at most 4 (replicas share nodes)."""
    return max(1, min(4, os.cpu_count() or 1))


class OnnxTransformer:
    """A sentence-transformers model's transformer module exported to ONNX (in memory, ~2 s) and
    run by ONNX Runtime. Tokenisation and the modules after the transformer (pooling,
    normalisation) stay the model's own, so the embedding is the model's embedding."""

    def __init__(self, model, threads: int | None = None):
        import onnxruntime as ort
        import torch

        self.model = model
        self.inputs = [k for k, v in model.preprocess(["probe"]).items() if isinstance(v, torch.Tensor)]
        hf = model[0].auto_model.eval()
        names = self.inputs

        class Forward(torch.nn.Module):  # positional ONNX inputs -> the HF model's keyword call
            def __init__(self):
                super().__init__()
                self.hf = hf

            def forward(self, *args):
                return self.hf(**dict(zip(names, args))).last_hidden_state

        sample = model.preprocess(["export sample"])
        buf = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            axes = {n: {0: "batch", 1: "tokens"} for n in [*names, "token_embeddings"]}
            torch.onnx.export(Forward(), tuple(sample[n] for n in names), buf, input_names=names,
                              output_names=["token_embeddings"], dynamic_axes=axes, opset_version=17,
                              dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
        self.post = list(model)[1:]

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        import torch

        # Longest first, as sentence-transformers does: batches of similar length pad less.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.empty((len(texts), self.model.get_embedding_dimension()), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            features = self.model.preprocess([texts[i] for i in idx])
            hidden = self.session.run(None, {n: features[n].numpy() for n in self.inputs})[0]
            features["token_embeddings"] = torch.from_numpy(hidden)
            with torch.inference_mode():
                for module in self.post:
                    features = module(features)
            out[idx] = features["sentence_embedding"].numpy()
        return out


class DenseEmbedder:
    def __init__(self, model_dir: str, batch_size: int = 64, device: str = "cpu", runtime: Runtime = "torch",
                 threads: int | None = None):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model_dir, device=device, local_files_only=True)
        self.batch_size = batch_size
        self.dim = int(self.model.get_embedding_dimension())
        self.runtime: Runtime = runtime if device == "cpu" else "torch"
        self._onnx = OnnxTransformer(self.model, threads) if self.runtime == "onnx" else None

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self._onnx is not None:
            vecs = self._onnx.encode(texts, self.batch_size)
            return vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        return self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False).astype(np.float32)

    def embed_query(self, text: str) -> list[float]:
        return self.embed([text])[0].tolist()


@lru_cache(maxsize=4)
def shared_dense(model_dir: str, runtime: Runtime = "torch") -> DenseEmbedder:
    return DenseEmbedder(model_dir, runtime=runtime)


class SparseEncoder:
    def __init__(self, k: float = 1.2, b: float = 0.75, avg_len: float = 200.0):
        from qdrant_edge import Bm25, Bm25Config

        self.k, self.b, self.avg_len = k, b, avg_len
        self._bm25 = Bm25(Bm25Config(k=k, b=b, avg_len=avg_len, language="english"))

    @classmethod
    def from_settings(cls, settings: Settings) -> "SparseEncoder":
        r = settings.rag
        return cls(r.bm25_k, r.bm25_b, r.bm25_avg_len)

    def embed_documents(self, texts: list[str]) -> list[SparseVec]:
        out = []
        for t in texts:
            v = self._bm25.embed_document(t)
            out.append(SparseVec(list(v.indices), list(v.values)))
        return out

    def embed_query(self, text: str) -> SparseVec:
        v = self._bm25.embed_query(text)
        return SparseVec(list(v.indices), list(v.values))
