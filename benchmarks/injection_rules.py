"""Prompt-injection detection quality (rag.injection) on the labelled samples the tests ship
(tests/rag/data/): precision, recall and F1 on the dev split (the rules were written against it)
and on the test split (written after the rules were frozen, never tuned on), against a keyword
baseline measured in the same run (text mentions "ignore", "instructions", "system prompt",
"jailbreak" or "pretend"), plus detection time per text for both. When the SciFact corpus is
next to the repository (../shared/eval/scifact), its 5,183 abstracts measure false positives on
real benign passages and the keyword prefilter's speed-up against the full regex scan (same run,
same texts, findings compared one by one).

    .venv/bin/python -m benchmarks.injection_rules [--repeat 50]

Writes benchmarks/results/injection_rules.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "rag" / "data"
RESULTS = Path(__file__).resolve().parent / "results"
SCIFACT = ROOT.parent / "shared" / "eval" / "scifact" / "corpus.jsonl"
_KEYWORDS = re.compile(r"ignore|instructions|system prompt|jailbreak|pretend", re.IGNORECASE)


def keyword_baseline(text: str) -> bool:
    return bool(_KEYWORDS.search(text))


def load(split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"injection_{split}.jsonl").read_text().splitlines() if line]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--out", default=str(RESULTS / "injection_rules.json"))
    ap.add_argument("--scifact", type=Path, default=SCIFACT, help="A BEIR corpus.jsonl of benign passages.")
    args = ap.parse_args(argv)
    from rag.injection import detect_injection, detection_scores, is_injection

    out: dict = {"created": datetime.now(timezone.utc).isoformat(), "splits": {}}
    for split in ("dev", "test"):
        rows = load(split)
        entry = {"rules": detection_scores(rows), "keyword_baseline": detection_scores(rows, keyword_baseline)}
        for where in ("input", "passage"):
            entry[f"rules_{where}"] = detection_scores([r for r in rows if r["where"] == where])
        out["splits"][split] = entry
    texts = [r["text"] for s in ("dev", "test") for r in load(s)] * args.repeat
    for name, fn in (("rules", is_injection), ("keyword_baseline", keyword_baseline)):
        t0 = time.perf_counter()
        for t in texts:
            fn(t)
        out[f"{name}_us_per_text"] = round((time.perf_counter() - t0) / len(texts) * 1e6, 2)
    out["time_ratio"] = round(out["rules_us_per_text"] / out["keyword_baseline_us_per_text"], 1)
    if args.scifact.exists():
        docs = [json.loads(line) for line in args.scifact.read_text().splitlines() if line]
        texts = [f"{d.get('title', '')}. {d['text']}" for d in docs]
        runs = {}
        for prefilter in (True, False):
            t0 = time.perf_counter()
            runs[prefilter] = [detect_injection(t, prefilter=prefilter) for t in texts]
            runs[f"ms_{prefilter}"] = (time.perf_counter() - t0) / len(texts) * 1e3
        out["scifact"] = {"passages": len(texts), "flagged": sum(bool(f) for f in runs[True]),
                          "mean_chars": round(sum(map(len, texts)) / len(texts)),
                          "ms_per_passage_prefilter": round(runs["ms_True"], 3),
                          "ms_per_passage_full_scan": round(runs["ms_False"], 3),
                          "speedup": round(runs["ms_False"] / runs["ms_True"], 1),
                          "findings_differ": sum(a != b for a, b in zip(runs[True], runs[False]))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print("| split | detector | n | precision | recall | F1 |\n| --- | --- | --- | --- | --- | --- |")
    for split, entry in out["splits"].items():
        for name in ("rules", "rules_input", "rules_passage", "keyword_baseline"):
            s = entry[name]
            print(f"| {split} | {name} | {s['n']} | {s['precision']:.2f} | {s['recall']:.2f} | {s['f1']:.2f} |")
    print(f"\nrules {out['rules_us_per_text']} µs/text, keyword baseline {out['keyword_baseline_us_per_text']} µs/text "
          f"(×{out['time_ratio']})")
    if "scifact" in out:
        sf = out["scifact"]
        print(f"SciFact: {sf['flagged']} of {sf['passages']} abstracts flagged; {sf['ms_per_passage_prefilter']} ms "
              f"per passage with the prefilter, {sf['ms_per_passage_full_scan']} ms full scan (×{sf['speedup']}), "
              f"{sf['findings_differ']} findings differ")
    return out


if __name__ == "__main__":
    main()
