"""Request traces: the Azure LLM inference 2023 CSV format, time compression, and a synthetic
multi-day diurnal series built from real traces (one hour of trace has no daily cycle).

A trace is three parallel arrays: arrival seconds from the start, prompt tokens, output tokens.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def shared_traces_dir(repo: Path) -> Path:
    """The evaluation traces beside the checkout (../shared/eval/traces), also from a worktree
    one folder deeper (../../shared)."""
    for base in (repo.parent, repo.parent.parent):
        if (base / "shared" / "eval" / "traces").is_dir():
            return base / "shared" / "eval" / "traces"
    return repo.parent / "shared" / "eval" / "traces"


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file, the line and the field."""


@dataclass(frozen=True)
class Trace:
    name: str
    t: np.ndarray  # arrival, seconds from the first request, sorted
    prompt: np.ndarray
    output: np.ndarray

    def __len__(self) -> int:
        return len(self.t)

    @property
    def duration_s(self) -> float:
        return float(self.t[-1]) if len(self.t) else 0.0

    def compressed(self, factor: float) -> "Trace":
        """The same requests `factor` times faster (the rate is `factor` times higher)."""
        if factor <= 0:
            raise TraceError(f"compression factor must be > 0, not {factor}")
        return Trace(f"{self.name} x{factor:g}", self.t / factor, self.prompt, self.output)


def _parse_time(text: str) -> float:
    text = text.strip()
    head, _, frac = text.partition(".")
    base = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def load_csv(path: str | Path) -> Trace:
    """An Azure-format trace (TIMESTAMP, ContextTokens, GeneratedTokens)."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace {path} does not exist")
    ts, prompt, output = [], [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise TraceError(f"{path}: missing column(s) {', '.join(missing)} (has {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):
            try:
                ts.append(_parse_time(row["TIMESTAMP"]))
                prompt.append(int(row["ContextTokens"]))
                output.append(int(row["GeneratedTokens"]))
            except (ValueError, TypeError) as e:
                raise TraceError(f"{path}:{line}: {e}") from None
    if not ts:
        raise TraceError(f"{path} has no requests")
    t = np.asarray(ts, dtype=float)
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order][0]
    return Trace(path.stem, t, np.asarray(prompt)[order], np.maximum(np.asarray(output)[order], 1))


def diurnal(sources: list[Trace], *, days: float = 2.0, mean_rate: float = 2.0, amplitude: float = 0.7,
            seed: int = 0) -> Trace:
    """A multi-day series: a daily sinusoid (trough at 04:00, peak at 16:00) times the real traces'
    minute-to-minute burstiness (their per-minute rate, normalised and tiled), as a
    non-homogeneous Poisson process; prompt/output tokens drawn from the real requests."""
    rng = np.random.default_rng(seed)
    minute_shape = []
    for s in sources:
        counts = np.bincount((s.t // 60).astype(int))
        minute_shape.extend(counts / counts.mean())
    shape = np.asarray(minute_shape)
    horizon = days * 86400.0
    minutes = int(math.ceil(horizon / 60))
    hours = (np.arange(minutes) * 60.0) / 3600.0
    daily = 1 + amplitude * np.sin(2 * math.pi * (hours - 10.0) / 24.0)
    rate = mean_rate * daily * shape[np.arange(minutes) % len(shape)]
    counts = rng.poisson(rate * 60.0)
    t = np.concatenate([m * 60.0 + np.sort(rng.uniform(0, 60.0, c)) for m, c in enumerate(counts)])
    pool_p = np.concatenate([s.prompt for s in sources])
    pool_o = np.concatenate([s.output for s in sources])
    pick = rng.integers(0, len(pool_p), len(t))
    return Trace(f"diurnal {days:g}d", t, pool_p[pick], pool_o[pick])
