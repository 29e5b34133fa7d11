"""Precision and recall of observability.anomaly on injected anomalies, against a static
threshold (the training days' mean + 4 sigma) scored on the same series in the same run.

Synthetic series of 5-minute points over 14 days (period 288 points = one day) for latency, error
rate, cost and traffic, each with its daily season, noise, and injected anomalies: spikes (1-3
points), short level shifts (6 points) and, for traffic, drops. An anomaly counts as found when
any of its points is flagged (event recall); precision is the share of flagged points that lie
in an anomaly. The first 4 days are history only (never scored, no anomalies).

    .venv/bin/python benchmarks/anomaly_detection.py [--seeds 5]

Writes benchmarks/results/anomaly_detection.json and prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from pathlib import Path

from observability.anomaly import detect_ewma, detect_seasonal

RESULTS = Path(__file__).resolve().parent / "results"
PERIOD, DAYS, HISTORY_DAYS = 288, 14, 4
THRESHOLD = 4.0


def make_series(kind: str, rng: random.Random) -> tuple[list[float], list[tuple[int, int]], str]:
    """(values, anomalies as [start, end) ranges, direction to watch)."""
    n = PERIOD * DAYS
    values = []
    for t in range(n):
        day = math.sin(2 * math.pi * (t % PERIOD) / PERIOD - math.pi / 2)  # low at night, high by day
        if kind == "latency":
            v = (0.3 + 0.15 * day) * math.exp(rng.gauss(0, 0.08))
        elif kind == "errors":
            v = max(0.0, 0.01 + 0.004 * day + rng.gauss(0, 0.0015))
        elif kind == "traffic":
            v = max(0.0, 100 + 70 * day + rng.gauss(0, 6))
        else:  # cost follows traffic
            v = max(0.0, (100 + 70 * day) * 0.002 * math.exp(rng.gauss(0, 0.06)))
        values.append(v)
    events: list[tuple[int, int]] = []
    start = PERIOD * HISTORY_DAYS
    t = start + rng.randrange(50, 150)
    while t < n - 10:
        shape = rng.choice(["spike", "spike", "shift"] + (["drop"] if kind == "traffic" else []))
        length = rng.randint(1, 3) if shape == "spike" else 6
        for i in range(t, t + length):
            if kind == "traffic":
                values[i] *= 0.35 if shape == "drop" else 1.8
            elif kind == "errors":
                values[i] += 0.03 if shape == "spike" else 0.015
            else:
                values[i] *= 2.5 if shape == "spike" else 1.6
        events.append((t, t + length))
        t += length + rng.randrange(120, 400)
    return values, events, "both" if kind == "traffic" else "up"


def static_threshold(values: list[float], direction: str) -> set[int]:
    train = values[: PERIOD * HISTORY_DAYS]
    m, s = statistics.fmean(train), statistics.pstdev(train)
    out = set()
    for i in range(PERIOD * HISTORY_DAYS, len(values)):
        z = (values[i] - m) / s
        if (direction == "up" and z > THRESHOLD) or (direction != "up" and abs(z) > THRESHOLD):
            out.add(i)
    return out


def score(flagged: set[int], events: list[tuple[int, int]]) -> dict[str, float]:
    inside = {i for a, b in events for i in range(a, b)}
    found = sum(1 for a, b in events if any(i in flagged for i in range(a, b)))
    tp = len(flagged & inside)
    return {"precision": tp / len(flagged) if flagged else 1.0, "recall": found / len(events) if events else 1.0,
            "flagged": len(flagged), "events": len(events)}


def run(seeds: int) -> dict:
    rows = {}
    for kind in ("latency", "errors", "cost", "traffic"):
        acc: dict[str, list[dict]] = {"seasonal": [], "ewma": [], "static": []}
        for seed in range(seeds):
            values, events, direction = make_series(kind, random.Random(f"{kind}-{seed}"))
            scored_from = PERIOD * HISTORY_DAYS
            seasonal = {a.index for a in detect_seasonal(values, PERIOD, seasons=HISTORY_DAYS, threshold=THRESHOLD,
                                                         direction=direction) if a.index >= scored_from}
            ewma = {a.index for a in detect_ewma(values, alpha=0.05, warmup=PERIOD, threshold=THRESHOLD,
                                                 direction=direction) if a.index >= scored_from}
            acc["seasonal"].append(score(seasonal, events))
            acc["ewma"].append(score(ewma, events))
            acc["static"].append(score(static_threshold(values, direction), events))
        rows[kind] = {m: {"precision": statistics.fmean(r["precision"] for r in rs),
                          "recall": statistics.fmean(r["recall"] for r in rs),
                          "events": sum(r["events"] for r in rs), "flagged": sum(r["flagged"] for r in rs)}
                      for m, rs in acc.items()}
    return rows


def table(rows: dict) -> str:
    out = ["| series | seasonal precision / recall | EWMA precision / recall | static threshold precision / recall "
           "| anomalies |", "|---|---|---|---|---|"]
    for kind, r in rows.items():
        cell = lambda m: f"{r[m]['precision']:.2f} / {r[m]['recall']:.2f}"  # noqa: E731
        out.append(f"| {kind} | {cell('seasonal')} | {cell('ewma')} | {cell('static')} | {r['seasonal']['events']} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    rows = run(args.seeds)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "anomaly_detection.json").write_text(json.dumps(
        {"benchmark": "anomaly_detection", "seeds": args.seeds, "period": PERIOD, "days": DAYS,
         "threshold": THRESHOLD, "rows": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
