"""A/B experiments: sticky arm assignment and the per-arm report with significance tests.

Assignment hashes (experiment name, sticky id) into [0, 1) and walks the arms' cumulative
weights, so one key (or user) always lands in the same arm while the weights stay unchanged.
The report compares every arm with the first (the control): Welch's t-test on feedback scores
and on latency, Fisher's exact test on error counts (scipy).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from typing import Any

from config.settings import ArmSettings, ExperimentSettings


def bucket(name: str, sticky_id: str) -> float:
    digest = hashlib.sha256(f"{name}\x00{sticky_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign(exp: ExperimentSettings, sticky_id: str) -> ArmSettings:
    total = sum(a.weight for a in exp.arms)
    x, acc = bucket(exp.name, sticky_id) * total, 0.0
    for arm in exp.arms:
        acc += arm.weight
        if x < acc:
            return arm
    return exp.arms[-1]


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _p(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def report(exp_name: str, arm_names: Sequence[str], rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Per-arm figures from ledger rows (`arm`, `error`, `latency_s`, `cost_usd`, `feedback`: list of scores)."""
    from scipy import stats

    arms: dict[str, dict[str, list]] = {a: {"lat": [], "cost": [], "err": [], "fb": []} for a in arm_names}
    for r in rows:
        a = arms.setdefault(r.get("arm") or "?", {"lat": [], "cost": [], "err": [], "fb": []})
        a["err"].append(bool(r.get("error")))
        a["cost"].append(float(r.get("cost_usd") or 0.0))
        if not r.get("error") and r.get("latency_s") is not None:
            a["lat"].append(float(r["latency_s"]))
        a["fb"].extend(float(s) for s in r.get("feedback") or [])
    out: dict[str, Any] = {"experiment": exp_name, "control": arm_names[0] if arm_names else None, "arms": {}}
    for name, a in arms.items():
        n = len(a["err"])
        lat = sorted(a["lat"])
        out["arms"][name] = {
            "requests": n, "errors": sum(a["err"]), "error_rate": (sum(a["err"]) / n) if n else None,
            "latency_mean_s": _mean(lat), "latency_p50_s": lat[len(lat) // 2] if lat else None,
            "cost_usd": sum(a["cost"]), "cost_per_request_usd": (sum(a["cost"]) / n) if n else None,
            "feedback_n": len(a["fb"]), "feedback_mean": _mean(a["fb"]),
        }
    tests: dict[str, Any] = {}
    if arm_names:
        c = arms[arm_names[0]]
        for name in arm_names[1:]:
            t = arms[name]
            entry: dict[str, Any] = {}
            if len(c["fb"]) >= 2 and len(t["fb"]) >= 2:
                r = stats.ttest_ind(t["fb"], c["fb"], equal_var=False)
                entry["feedback_welch_t"] = {"t": _p(r.statistic), "p_value": _p(r.pvalue)}
            if len(c["lat"]) >= 2 and len(t["lat"]) >= 2:
                r = stats.ttest_ind(t["lat"], c["lat"], equal_var=False)
                entry["latency_welch_t"] = {"t": _p(r.statistic), "p_value": _p(r.pvalue)}
            if c["err"] and t["err"]:
                table = [[sum(t["err"]), len(t["err"]) - sum(t["err"])], [sum(c["err"]), len(c["err"]) - sum(c["err"])]]
                r = stats.fisher_exact(table)
                entry["error_rate_fisher"] = {"odds_ratio": _p(r.statistic), "p_value": _p(r.pvalue)}
            tests[f"{name} vs {arm_names[0]}"] = entry
    out["tests"] = tests
    return out
