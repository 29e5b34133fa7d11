"""Model optimisation: a sentence-transformers embedder exported to ONNX and made smaller.

    orfeas models optimize SOURCE --int8 --out DIR       (CPU: dynamic INT8, per-channel)
    orfeas models optimize SOURCE --fp16 --out DIR       (GPU: float16 weights and activations)

The output directory is self-contained: `model.onnx`, the tokenizer and pooling files the model
needs, and `manifest.json` (`OptimizedManifest`: the source's hash, the method, the CPU kernel set
it was quantised for, the cosine of its vectors to the fp32 model's and, with `--eval`, dense
retrieval quality against fp32 on a BEIR dataset). `models.embedders.DenseEmbedder` runs such a
directory with ONNX Runtime and the `tokenizers` library alone (no PyTorch).

INT8 is ONNX Runtime's dynamic quantisation (weights int8 per output channel, activations
quantised per batch at run time). The kernel set matters: on x86 without VNNI, u8 x s8 products
can saturate, so weights use 7 bits there (`reduce_range`); with AVX-512 VNNI or on arm64 they use
all 8. Pruning (`prune`): L1 magnitude pruning of every Linear layer's weights before export, tried
as a compression method (the report is in docs/benchmarks.md).

Nothing is half-written: everything goes to a temporary directory beside `out`, which replaces
`out` only once the model has loaded and been measured.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel

from models.errors import InvalidRequest

log = logging.getLogger(__name__)

Method = Literal["int8", "fp16"]
METHODS = ("int8", "fp16")
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
# What the ONNX directory needs besides the graph (tokenizer, pooling, sentence-transformers config).
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "config.json",
                "sentence_bert_config.json", "modules.json", "config_sentence_transformers.json")
COPIED_DIRS = ("1_Pooling",)

PROBE_TEXTS = [
    "The capital of France is Paris.",
    "Vitamin D deficiency is associated with an increased risk of fractures in older adults.",
    "Ray Serve scales model deployments on a cluster.",
    "A dog runs across the park chasing a red ball.",
    "Quantisation stores weights in eight bits instead of thirty-two.",
    "Mitochondria are the powerhouse of the cell.",
    "How do I reset my password?",
    "The stock market fell sharply after the announcement of higher interest rates.",
]


class OptimizeError(InvalidRequest):
    """A model that cannot be optimised as asked (unknown method, missing or unreadable source)."""


class OptimizedManifest(BaseModel):
    format: Literal["orfeas-optimized-embedder"] = "orfeas-optimized-embedder"
    variant: str                    # what a collection records: "int8", "fp16", "int8-pruned30"
    method: Method
    source: str
    source_sha256: str              # of the source's weight files
    model_file: str = MODEL_FILE
    model_sha256: str
    model_bytes: int
    kernel_set: str                 # avx512_vnni / avx2 / arm64 / generic: what INT8 was made for
    reduce_range: bool
    per_channel: bool
    prune: float = 0.0
    dim: int
    max_seq_length: int
    pooling: Literal["mean", "cls"]
    cosine_to_fp32: dict[str, float]   # mean and min over probe texts
    retrieval: dict | None = None      # dense nDCG@10, this variant and fp32, on a BEIR subset
    created: str
    seconds: float


def cpu_kernel_set() -> str:
    """The CPU's integer kernel set ONNX Runtime will use: avx512_vnni, avx2, arm64 or generic."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return "arm64"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return "avx512_vnni"
    if " avx2" in flags:
        return "avx2"
    return "generic"


def is_optimized_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | os.PathLike) -> OptimizedManifest:
    """The manifest of an optimised directory; a missing, corrupt or mismatched one is an error."""
    p = Path(path)
    try:
        m = OptimizedManifest.model_validate_json((p / MANIFEST).read_text())
    except FileNotFoundError:
        raise OptimizeError(f"{p} is not an optimised model directory (no {MANIFEST})", "model") from None
    except ValueError as e:
        raise OptimizeError(f"{p / MANIFEST} is not a valid manifest: {e}", "model") from None
    model = p / m.model_file
    if not model.is_file():
        raise OptimizeError(f"optimised model file {model} is missing", "model")
    if model.stat().st_size != m.model_bytes:
        raise OptimizeError(f"optimised model file {model} is truncated or corrupt: {model.stat().st_size} bytes, "
                            f"the manifest says {m.model_bytes}", "model")
    return m


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_hash(model_dir: Path) -> str:
    """sha256 over the source's weight files (name and content), in name order."""
    h = hashlib.sha256()
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".onnx", ".pt"))
    if not weights:
        raise OptimizeError(f"{model_dir} has no model weights (.safetensors/.bin)", "source")
    for p in weights:
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def export_onnx(model, path: Path | None = None) -> bytes:
    """A SentenceTransformer's transformer module as an ONNX graph: inputs the tokenizer's tensors,
    output `token_embeddings` (pooling stays outside). Written to `path` when given."""
    import io
    import warnings

    import torch

    names = [k for k, v in model.preprocess(["probe"]).items() if isinstance(v, torch.Tensor)]
    hf = model[0].auto_model.eval()

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
                          output_names=["token_embeddings"], dynamic_axes=axes, opset_version=17, dynamo=False)
    data = buf.getvalue()
    if path is not None:
        path.write_bytes(data)
    return data


def prune_linear(model, amount: float) -> None:
    """L1 magnitude pruning: zero the `amount` smallest weights of every Linear layer, made permanent."""
    import torch
    from torch.nn.utils import prune

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            prune.l1_unstructured(module, "weight", amount=amount)
            prune.remove(module, "weight")


def optimize(source: str, method: str, out: str | os.PathLike, *, prune: float = 0.0, eval_dataset: str | None = None,
             eval_docs: int = 1000, eval_queries: int = 200, threads: int | None = None) -> OptimizedManifest:
    """Export `source` (a sentence-transformers directory or the shipped package name) to ONNX,
    apply `method`, measure it against the fp32 model and write it all to `out`."""
    from models.embedders import DenseEmbedder, resolve_embedder_source

    t0 = time.perf_counter()
    if method not in METHODS:
        raise OptimizeError(f"unknown quantisation {method!r}: use one of {', '.join(METHODS)}", "method")
    if not 0.0 <= prune < 1.0:
        raise OptimizeError(f"prune must be in [0, 1), got {prune}", "prune")
    src = Path(resolve_embedder_source(source))
    if not src.is_dir() or not (src / "modules.json").is_file():
        raise OptimizeError(f"source {source!r} is not a sentence-transformers model directory ({src})", "source")
    out = Path(out).expanduser().resolve()
    if out.exists() and not is_optimized_dir(out) and any(out.iterdir()):
        raise OptimizeError(f"--out {out} exists and is not an optimised model directory: not overwriting it", "out")
    digest = source_hash(src)
    kernels = cpu_kernel_set()
    reduce_range = method == "int8" and kernels not in ("avx512_vnni", "arm64")

    from sentence_transformers import SentenceTransformer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # Exported with eager attention (plain MatMul/Softmax): quantised, it embedded SciFact's
        # chunks ~10% faster on one thread than the SDPA export, with the same cosine to fp32.
        model = SentenceTransformer(str(src), device="cpu", local_files_only=True,
                                    model_kwargs={"attn_implementation": "eager"})
        if prune:
            prune_linear(model[0].auto_model, prune)
        fp32_path = tmp / "fp32.onnx"
        export_onnx(model, fp32_path)
        target = tmp / MODEL_FILE
        if method == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(fp32_path, target, per_channel=True, reduce_range=reduce_range,
                             weight_type=QuantType.QInt8)
        else:
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            onnx.save(convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True), str(target))
        fp32_path.unlink()
        for name in COPIED_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        for name in COPIED_DIRS:
            if (src / name).is_dir():
                shutil.copytree(src / name, tmp / name)
        pool = json.loads((src / "1_Pooling" / "config.json").read_text()) if (src / "1_Pooling").is_dir() else {}
        variant = method + (f"-pruned{round(prune * 100)}" if prune else "")
        manifest = OptimizedManifest(
            variant=variant, method=method, source=str(src), source_sha256=digest, model_sha256=sha256_file(target),
            model_bytes=target.stat().st_size, kernel_set=kernels, reduce_range=reduce_range,
            per_channel=method == "int8", prune=prune, dim=model.get_embedding_dimension(),
            max_seq_length=model.max_seq_length,
            pooling="cls" if pool.get("pooling_mode_cls_token") else "mean",
            cosine_to_fp32={}, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), seconds=0.0)
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))

        # Measure against the unpruned fp32 model, as a collection written with it would see.
        fp32 = DenseEmbedder(str(src), threads=threads)
        opt = DenseEmbedder(str(tmp), threads=threads).load()
        a, b = fp32.embed(PROBE_TEXTS), opt.embed(PROBE_TEXTS)
        cos = np.sum(a * b, axis=1)
        manifest.cosine_to_fp32 = {"mean": round(float(cos.mean()), 5), "min": round(float(cos.min()), 5),
                                   "texts": len(PROBE_TEXTS)}
        if eval_dataset:
            manifest.retrieval = dense_retrieval_quality(eval_dataset, fp32, opt, docs=eval_docs, queries=eval_queries)
        manifest.seconds = round(time.perf_counter() - t0, 2)
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("optimised %s -> %s (%s, %d bytes)", src, out, manifest.variant, manifest.model_bytes)
    return manifest


def dense_retrieval_quality(dataset: str, fp32, variant, *, docs: int = 1000, queries: int = 200,
                            split: str = "train") -> dict:
    """Dense nDCG@10 of the fp32 model and of `variant` on a BEIR split, in memory: the first
    `queries` judged queries, over their relevant documents plus the corpus's first documents up to
    `docs` (whole documents, truncated by the model). A quick check for the manifest; the gate is
    the full ingest + `rag.evaluation` run of benchmarks/embedding_int8.py. (models/ may not import
    rag/, so the few lines of BEIR reading and nDCG are here.)"""
    import csv
    import math

    d = Path(dataset)
    qrels: dict[str, dict[str, int]] = {}
    with open(d / "qrels" / f"{split}.tsv") as f:
        for row in csv.reader(f, delimiter="\t"):
            if row and row[0] not in ("query-id", "query_id") and int(row[2]) > 0:
                qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    qtext = {}
    with open(d / "queries.jsonl") as f:
        for line in f:
            q = json.loads(line)
            if str(q["_id"]) in qrels and len(qtext) < queries:
                qtext[str(q["_id"])] = q["text"]
    wanted = {doc for q in qtext for doc in qrels[q]}
    corpus: dict[str, str] = {}
    with open(d / "corpus.jsonl") as f:
        for line in f:
            c = json.loads(line)
            cid = str(c["_id"])
            if cid in wanted or len(corpus) < docs:
                corpus[cid] = (c.get("title", "") + "\n" + c.get("text", "")).strip()
    ids, texts = list(corpus), list(corpus.values())
    qids = list(qtext)

    def ndcg(model) -> float:
        dv, qv = model.embed(texts), model.embed([qtext[q] for q in qids])
        top = np.argsort(-(qv @ dv.T), axis=1)[:, :10]
        total = 0.0
        for i, q in enumerate(qids):
            rels = qrels[q]
            dcg = sum(rels.get(ids[j], 0) / math.log2(r + 2) for r, j in enumerate(top[i]))
            idcg = sum(v / math.log2(r + 2) for r, v in enumerate(sorted(rels.values(), reverse=True)[:10]))
            total += dcg / idcg
        return total / len(qids)

    base, got = ndcg(fp32), ndcg(variant)
    return {"dataset": str(d), "split": split, "docs": len(ids), "queries": len(qids), "metric": "dense ndcg@10",
            "fp32": round(base, 4), "variant": round(got, 4), "delta": round(got - base, 4)}
