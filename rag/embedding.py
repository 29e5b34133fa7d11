"""What RAG embeds with: the configured dense model and the sparse (BM25) encoder.

The dense side is `models.embedders.DenseEmbedder` (PyTorch or ONNX Runtime, the same vectors),
the same class the embedding Serve deployment runs: `embedder_dir(settings)` finds the
`rag.embedding_model` catalog entry's directory, `shared_dense` keeps one loaded model per
process for queries and answers (`rag.query_embedding_runtime`); the ingest job's encoder actors
make their own (rag.ingest.EmbedStage).

The sparse side is Qdrant's own `Bm25` (from qdrant-edge-py): documents get BM25 term-frequency
weights, queries get 1.0 per unique token, and the store applies IDF (the vector's `Idf`
modifier). Both sides use the same `Bm25` object, so query and document tokenisation (word
tokeniser, lowercase, English stop words, Snowball stemmer) cannot drift apart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

from config import Settings
from models.embedders import DenseEmbedder, Runtime, resolve_embedder_source

log = logging.getLogger(__name__)

DENSE = "dense"
SPARSE = "bm25"
DENSE_E5 = "dense_e5"  # the second dense model's named vector (rag.second_dense)
DENSE_WINDOWS = "dense_windows"  # the dense model's vectors of each chunk's windows (rag.dense_window_tokens)


def embedder_dir(settings: Settings) -> str:
    """Directory of the configured sentence-transformers embedding model."""
    spec = settings.model(settings.rag.embedding_model)
    if spec is None:
        raise ValueError(f"rag.embedding_model {settings.rag.embedding_model!r} is not in the model catalog")
    if spec.engine != "sentence-transformers":
        raise ValueError(f"rag.embedding_model {spec.id!r} must use engine 'sentence-transformers'")
    return resolve_embedder_source(spec.source)


def dense_source(settings: Settings) -> str:
    """Where the configured dense model variant loads from: the catalog entry's directory for fp32,
    else the optimised directory (`orfeas models optimize`), which must exist."""
    r = settings.rag
    if r.embedding_variant == "fp32":
        return embedder_dir(settings)
    from models.optimize import read_manifest

    path = r.optimized_embedder_dir or str(settings.resolved_data_dir() / "models" /
                                           f"{r.embedding_model}-{r.embedding_variant}")
    manifest = read_manifest(path)  # a clear error when missing or corrupt
    if manifest.variant != r.embedding_variant:
        from rag.errors import EmbedderMismatch

        raise EmbedderMismatch(f"rag.embedding_variant is {r.embedding_variant!r} but {path} holds variant "
                               f"{manifest.variant!r}", "embedding_variant")
    return path


def embedder_id(settings: Settings) -> str:
    """What a collection records about the vectors it holds: `<catalog id>/<variant>`."""
    return f"{settings.rag.embedding_model}/{settings.rag.embedding_variant}"


def check_embedder(collection: str, stored: str | None, current: str) -> None:
    """Refuse to mix vectors of two embedder variants in one collection (points written before the
    field existed carry "", which is the catalog model's fp32)."""
    if stored is None:
        return
    stored = stored or current.split("/")[0] + "/fp32"
    if stored != current:
        from rag.errors import EmbedderMismatch

        raise EmbedderMismatch(f"collection {collection!r} was written by embedder {stored!r}; this service embeds "
                               f"with {current!r}: set rag.embedding_variant to match, or re-ingest with --rebuild",
                               "collection")


def second_embedder_id(settings: Settings) -> str:
    """What a collection records about its e5 vectors (`<model>/<precision>`), "" when
    rag.second_dense is off."""
    sd = settings.rag.second_dense
    if not sd.enabled:
        return ""
    from models.e5 import E5Embedder

    return E5Embedder(sd.model, precision=sd.precision).id


def check_second_embedder(collection: str, stored: str, current: str) -> None:
    """A query fusing e5 vectors refuses points that carry none, or another model's/precision's."""
    if stored != current:
        from rag.errors import EmbedderMismatch

        what = f"e5 vectors of {stored!r}" if stored else "no e5 vectors"
        raise EmbedderMismatch(f"collection {collection!r} holds {what}; this service fuses {current!r} "
                               "(rag.second_dense): re-ingest it with --rebuild, or switch rag.second_dense off",
                               "collection")


def second_passage_text(title: str, section: str, text: str, embed_text: str, style: str) -> str:
    """What e5 sees for a chunk (after its `passage: ` prefix): `lead` the same text as the first
    dense model (title and section on lines before the text), `sentence` `title. section. text`."""
    if style == "lead":
        return embed_text
    head = [p.strip().rstrip(".") for p in (title, section) if p and p.strip() and p not in text[: len(p) + 8]]
    return ". ".join(head + [text]) if head else text


@lru_cache(maxsize=2)
def shared_second(model: str, precision: str = "bf16"):
    """One loaded e5 model per (file, precision) in this process (queries)."""
    from models.e5 import E5Embedder

    return E5Embedder(model, precision=precision).load()


@dataclass(frozen=True)
class SparseVec:
    indices: list[int]
    values: list[float]


@lru_cache(maxsize=4)
def shared_dense(model_dir: str, runtime: Runtime = "torch") -> DenseEmbedder:
    """One loaded dense model per (directory, runtime) in this process."""
    return DenseEmbedder(model_dir, runtime=runtime).load()


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
