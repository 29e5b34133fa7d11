"""The quality gate's groundedness (rag.quality) on the labelled sample the tests ship
(tests/rag/data/groundedness_sample.jsonl: short contexts with answers that restate them, and
answers that contradict them or say something they do not): for each threshold, precision and
recall of the gate as a detector of ungrounded answers, against a baseline measured in the same
run (the best cosine of the whole answer to the whole context: no sentence split).

    .venv/bin/python -m benchmarks.groundedness_gate

Writes benchmarks/results/groundedness_gate.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "rag" / "data" / "groundedness_sample.jsonl"
RESULTS = Path(__file__).resolve().parent / "results"
THRESHOLDS = (0.4, 0.5, 0.55, 0.6, 0.65, 0.7)


def load() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text().splitlines() if line]


def passages(row: dict):
    from rag.packing import Passage

    return [Passage(index=i + 1, score=1.0, chunk_ids=[f"{row['topic']}-{i}"], doc_id=f"{row['topic']}-{i}",
                    text=t, start=0, end=len(t)) for i, t in enumerate(row["context"])]


def sweep(scores: list[float], grounded: list[bool]) -> dict[str, dict]:
    """Precision/recall of "score < threshold" as a detector of ungrounded answers."""
    out = {}
    for t in THRESHOLDS:
        tp = sum(s < t and not g for s, g in zip(scores, grounded))
        fp = sum(s < t and g for s, g in zip(scores, grounded))
        fn = sum(s >= t and not g for s, g in zip(scores, grounded))
        out[str(t)] = {"precision": round(tp / (tp + fp), 3) if tp + fp else 1.0,
                       "recall": round(tp / (tp + fn), 3) if tp + fn else 1.0, "tp": tp, "fp": fp, "fn": fn}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS / "groundedness_gate.json"))
    args = ap.parse_args(argv)
    from config import Settings
    from rag.embedding import embedder_dir, shared_dense
    from rag.quality import MemoEmbed, score_answer

    embed = MemoEmbed(shared_dense(embedder_dir(Settings())).embed)
    rows = load()
    t0 = time.perf_counter()
    scored = [score_answer(r["answer"], r["question"], passages(r), embed) for r in rows]
    ms = (time.perf_counter() - t0) / len(rows) * 1e3
    whole = []
    for r in rows:
        v = embed([r["answer"], " ".join(r["context"])])
        whole.append(max(0.0, float(v[0] @ v[1])))
    grounded = [r["grounded"] for r in rows]
    out = {"created": datetime.now(timezone.utc).isoformat(), "answers": len(rows),
           "ungrounded": grounded.count(False), "ms_per_answer": round(ms, 1),
           "groundedness": sweep([q.groundedness for q in scored], grounded),
           "baseline_whole_answer_cosine": sweep(whole, grounded)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print("| threshold | groundedness P | R | whole-answer cosine P | R |\n| --- | --- | --- | --- | --- |")
    for t in THRESHOLDS:
        g, b = out["groundedness"][str(t)], out["baseline_whole_answer_cosine"][str(t)]
        print(f"| {t} | {g['precision']:.2f} | {g['recall']:.2f} | {b['precision']:.2f} | {b['recall']:.2f} |")
    print(f"\n{len(rows)} answers ({out['ungrounded']} ungrounded), {out['ms_per_answer']} ms per answer scored")
    return out


if __name__ == "__main__":
    main()
