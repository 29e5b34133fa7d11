"""Dense (normalised sentence-transformers) and sparse (BM25) encoders.

The sparse side is Qdrant's own `Bm25` (from qdrant-edge-py): documents get BM25 term-frequency
weights, queries get 1.0 per unique token, and the store applies IDF (the vector's `Idf`
modifier). Both sides use the same `Bm25` object, so query and document tokenisation (word
tokeniser, lowercase, English stop words, Snowball stemmer) cannot drift apart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

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


class DenseEmbedder:
    def __init__(self, model_dir: str, batch_size: int = 64, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model_dir, device=device, local_files_only=True)
        self.batch_size = batch_size
        self.dim = int(self.model.get_embedding_dimension())

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False).astype(np.float32)

    def embed_query(self, text: str) -> list[float]:
        return self.embed([text])[0].tolist()


@lru_cache(maxsize=2)
def shared_dense(model_dir: str) -> DenseEmbedder:
    return DenseEmbedder(model_dir)


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
