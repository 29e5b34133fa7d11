"""Audit chain verification speed (target: 1 M entries in <= 5 s).

Writes N entries through `AuditLog.record` (batches of 10,000, details encrypted as in
production, a signed checkpoint every 1,000), then times `verify_log` over them against a
baseline measured in the same run: reading the same file line by line and hashing each line
once (the floor of any chain check). The ratio says what the chain logic adds to that floor.

    .venv/bin/python -m benchmarks.audit_verify [--entries 1000000]

Writes benchmarks/results/audit_verify.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--out", default=str(RESULTS / "audit_verify.json"))
    args = ap.parse_args(argv)

    from security.audit import AuditLog, verify_log
    from security.crypto import FieldCipher
    from security.keyproviders import LocalKeyProvider
    from security.keyring import KeyRing

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        cipher = FieldCipher(KeyRing(d / "keys" / "dk.json", LocalKeyProvider(d / "keys" / "kek.json")))
        log = AuditLog(d / "audit", checkpoint_every=1000, cipher=cipher)
        t0 = time.perf_counter()
        batch = 10_000
        for start in range(0, args.entries, batch):
            log.record([{"action": "data.query", "actor": f"key{i % 17}", "target": "collection:docs",
                         "source": "10.0.0.7", "request_id": f"req-{i:08d}", "outcome": "ok",
                         "details": {"top_k": 8, "mode": "hybrid"}}
                        for i in range(start, min(args.entries, start + batch))])
        log.checkpoint()
        write_s = time.perf_counter() - t0
        path = d / "audit" / "audit.jsonl"
        size = path.stat().st_size

        t0 = time.perf_counter()
        n = 0
        with open(path, encoding="utf-8") as f:
            for line in f:
                hashlib.sha256(line.encode()).digest()
                n += 1
        floor_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        report = verify_log(d / "audit")
        verify_s = time.perf_counter() - t0
    assert report.ok and report.entries == args.entries, report

    result = {
        "benchmark": "audit_verify", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "entries": args.entries, "file_mb": round(size / 1e6, 1), "checkpoints": report.checkpoints,
        "write_s": round(write_s, 2), "verify_s": round(verify_s, 3), "floor_read_hash_s": round(floor_s, 3),
        "verify_entries_per_s": round(args.entries / verify_s), "ratio_to_floor": round(verify_s / floor_s, 2),
        "target_s_per_million": 5.0, "verify_s_per_million": round(verify_s * 1e6 / args.entries, 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("| entries | file | verify | read+hash floor | ratio | s per 1 M |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {args.entries:,} | {result['file_mb']} MB | {verify_s:.2f} s | {floor_s:.2f} s | "
          f"{result['ratio_to_floor']} | {result['verify_s_per_million']} |")
    return result


if __name__ == "__main__":
    main()
