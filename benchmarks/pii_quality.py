"""PII detection quality and cost on the labelled synthetic sample the tests ship
(tests/security/data/pii_sample.json): precision and recall per entity type and overall (a
finding counts when its type and text equal a labelled one), and analysis time per text
against a baseline measured in the same run (one compiled email regex over the same texts).

    .venv/bin/python -m benchmarks.pii_quality [--repeat 20]

Writes benchmarks/results/pii_quality.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "security" / "data" / "pii_sample.json"
RESULTS = Path(__file__).resolve().parent / "results"


def score(detector, sample: list[dict]) -> dict:
    tp, fp, fn = Counter(), Counter(), Counter()
    for ex in sample:
        got = Counter((f.entity, f.text) for f in detector.analyze(ex["text"]))
        want = Counter(tuple(x) for x in ex["pii"])
        for k in got | want:
            tp[k[0]] += min(got[k], want[k])
            fp[k[0]] += max(0, got[k] - want[k])
            fn[k[0]] += max(0, want[k] - got[k])
    out = {}
    for e in sorted(set(tp) | set(fp) | set(fn)) + ["ALL"]:
        t = sum(tp.values()) if e == "ALL" else tp[e]
        p_ = sum(fp.values()) if e == "ALL" else fp[e]
        n = sum(fn.values()) if e == "ALL" else fn[e]
        out[e] = {"tp": t, "fp": p_, "fn": n, "precision": round(t / (t + p_), 3) if t + p_ else 1.0,
                  "recall": round(t / (t + n), 3) if t + n else 1.0}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", default=str(RESULTS / "pii_quality.json"))
    args = ap.parse_args(argv)
    from security.pii import PiiDetector

    sample = json.loads(SAMPLE.read_text())
    t0 = time.perf_counter()
    d = PiiDetector()
    init_s = time.perf_counter() - t0
    quality = score(d, sample)
    texts = [ex["text"] for ex in sample] * args.repeat
    t0 = time.perf_counter()
    for t in texts:
        d.analyze(t)
    analyze_s = time.perf_counter() - t0
    email = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
    t0 = time.perf_counter()
    for t in texts:
        email.findall(t)
    regex_s = time.perf_counter() - t0
    result = {"benchmark": "pii_quality", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "texts": len(sample), "labelled_entities": sum(len(ex["pii"]) for ex in sample), "quality": quality,
              "init_s": round(init_s, 2), "ms_per_text": round(analyze_s * 1e3 / len(texts), 3),
              "regex_ms_per_text": round(regex_s * 1e3 / len(texts), 4),
              "ratio_to_one_regex": round(analyze_s / regex_s, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("| entity | tp | fp | fn | precision | recall |")
    print("| --- | --- | --- | --- | --- | --- |")
    for e, q in quality.items():
        print(f"| {e} | {q['tp']} | {q['fp']} | {q['fn']} | {q['precision']} | {q['recall']} |")
    print(f"\nanalyzer start {init_s:.1f} s; {result['ms_per_text']} ms per text "
          f"({result['ratio_to_one_regex']}x one email regex)")
    return result


if __name__ == "__main__":
    main()
