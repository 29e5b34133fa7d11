"""The multi-LLM orchestrator: plan, run subtasks in parallel, combine.

Strategies:
  decompose   a planner model splits the task into subtasks under `PLAN_SCHEMA` (the deterministic
              `split_task` when no capable planner answers), the subtasks run in parallel across
              backends, a synthesiser combines their answers
  vote        n answers, the majority (normalised text) wins: classification and extraction
  best-of-n   n answers, a judge model picks one (the majority when the judge cannot)
  mixture     n answers, the synthesiser writes one from them
With a `json_schema` the final answer is validated and the last step retried once on violation.
Model calls go through `call` (the gateway's routed path), so every one is routed, falls back,
is priced and lands in the ledger. Everything here but `Orchestrator.run` is a pure function.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field

from config.settings import OrchestratorSettings
from serve.router.features import TASK_TYPES

PLAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["subtasks"],
    "properties": {"subtasks": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["prompt"],
        "properties": {"id": {"type": "string"}, "prompt": {"type": "string", "minLength": 1},
                       "task": {"enum": list(TASK_TYPES)}}}}},
}

PLANNER_PROMPT = (
    "Split the user's task into independent subtasks that can be answered in parallel. Reply with JSON only, "
    "matching this schema: " + json.dumps(PLAN_SCHEMA, separators=(",", ":")) + ". At most {n} subtasks.")
SYNTH_PROMPT = "Combine the answers below into one complete answer to the original task."
JUDGE_PROMPT = "Pick the best candidate answer to the task. Reply with its number only."

Strategy = Literal["decompose", "vote", "best-of-n", "mixture"]


class OrchestrateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=100_000)
    strategy: Strategy = "decompose"
    n: int = Field(3, ge=1, le=8, description="Answers for vote, best-of-n and mixture.")
    models: list[str] | None = Field(None, min_length=1, max_length=8,
                                     description="Models (or routing policies) used in turn; default: the router's.")
    json_schema: dict[str, Any] | None = None
    max_subtasks: int | None = Field(None, ge=1, le=32)
    max_tokens: int | None = Field(None, ge=1)


@dataclass
class CallResult:
    model: str
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0
    error: str | None = None


Call = Callable[[str, list[dict[str, Any]], int, "str | None", bool], Awaitable[CallResult]]


# ---------------------------------------------------------------- pure parts


def extract_json(text: str) -> Any:
    """The JSON value in a model's reply (bare, fenced, or the outermost {...} / [...])."""
    text = text.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    for open_, close in (("{", "}"), ("[", "]")):
        i, j = text.find(open_), text.rfind(close)
        if 0 <= i < j:
            try:
                return json.loads(text[i:j + 1])
            except ValueError:
                continue
    raise ValueError("no JSON value in the reply")


def parse_plan(text: str, max_subtasks: int) -> list[dict[str, Any]]:
    """Subtasks from a planner's reply; ValueError when it does not meet PLAN_SCHEMA."""
    plan = extract_json(text)
    try:
        jsonschema.validate(plan, PLAN_SCHEMA)
    except jsonschema.ValidationError as e:
        raise ValueError(f"plan violates the schema: {e.message}") from None
    subs = plan["subtasks"][:max_subtasks]
    return [{"id": s.get("id") or f"s{i + 1}", "prompt": s["prompt"], "task": s.get("task")}
            for i, s in enumerate(subs)]


_ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*\u2022])\s+(.+?)\s*$", re.M)


def split_task(task: str, max_subtasks: int) -> list[dict[str, Any]]:
    """The deterministic splitter: numbered or bulleted items, else questions, else sentences
    (a single one stays whole)."""
    parts = [m.group(1) for m in _ITEM.finditer(task)]
    if len(parts) < 2:
        parts = [q.strip() for q in re.findall(r"[^?]+\?", task) if q.strip()]
    if len(parts) < 2:
        parts = [s.strip() for s in re.split(r"(?<=[.;!])\s+", task.strip()) if s.strip()]
    if len(parts) < 2:
        parts = [task.strip()]
    if len(parts) > max_subtasks:  # fold the tail into the last subtask
        parts = parts[: max_subtasks - 1] + [" ".join(parts[max_subtasks - 1:])]
    return [{"id": f"s{i + 1}", "prompt": p, "task": None} for i, p in enumerate(parts)]


def normalise(answer: str) -> str:
    return re.sub(r"\s+", " ", answer.strip().lower()).strip(" .!?\"'")


def majority(answers: list[str]) -> tuple[int, int]:
    """(index of the winning answer, its votes); ties go to the earliest answer."""
    if not answers:
        raise ValueError("no answers to vote on")
    keys = [normalise(a) for a in answers]
    counts = Counter(keys)
    best = max(counts.values())
    winner = next(i for i, k in enumerate(keys) if counts[k] == best)
    return winner, best


def parse_judge(text: str, n: int) -> int | None:
    """The 0-based candidate a judge picked (it answers 1..n), or None."""
    for m in re.finditer(r"\d+", text):
        k = int(m.group())
        if 1 <= k <= n:
            return k - 1
    return None


def check_schema(text: str, schema: dict[str, Any]) -> tuple[Any, str | None]:
    """(parsed value, None) when the text is JSON meeting the schema, else (None, why)."""
    try:
        value = extract_json(text)
    except ValueError as e:
        return None, str(e)
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as e:
        return None, e.message
    return value, None


# ---------------------------------------------------------------- the run


class Orchestrator:
    def __init__(self, cfg: OrchestratorSettings, call: Call):
        self.cfg, self.call = cfg, call
        self.calls: list[CallResult] = []

    async def _call(self, model: str, messages: list[dict[str, Any]], max_tokens: int, task: str | None = None,
                    json_mode: bool = False) -> CallResult:
        start = time.perf_counter()
        try:
            r = await self.call(model, messages, max_tokens, task, json_mode)
        except Exception as e:
            r = CallResult(model=model, text="", error=f"{type(e).__name__}: {getattr(e, 'message', e)}"[:500])
        r.seconds = time.perf_counter() - start
        self.calls.append(r)
        return r

    async def run(self, req: OrchestrateRequest) -> dict[str, Any]:
        t0 = time.perf_counter()
        max_tokens = req.max_tokens or self.cfg.max_tokens
        models = req.models or ["auto"]
        timings: dict[str, float] = {}
        plan: dict[str, Any] = {}
        if req.strategy == "decompose":
            n_max = req.max_subtasks or self.cfg.max_subtasks
            p = await self._call(self.cfg.planner, [
                {"role": "system", "content": PLANNER_PROMPT.replace("{n}", str(n_max))},
                {"role": "user", "content": req.task}], max_tokens, "extraction", True)
            try:
                if p.error:
                    raise ValueError(p.error)
                subtasks = parse_plan(p.text, n_max)
                plan = {"source": "planner", "model": p.model, "subtasks": subtasks}
            except ValueError as e:
                subtasks = split_task(req.task, n_max)
                plan = {"source": "fallback-splitter", "planner_error": str(e)[:300], "subtasks": subtasks}
            timings["plan_s"] = p.seconds
            prompts = [(s["prompt"], s.get("task")) for s in subtasks]
        else:
            prompts = [(req.task, None)] * req.n
            plan = {"source": req.strategy, "subtasks": [{"id": f"a{i + 1}", "prompt": req.task, "task": None}
                                                         for i in range(req.n)]}
        t1 = time.perf_counter()
        results = await asyncio.gather(*(
            self._call(models[i % len(models)], [{"role": "user", "content": prompt}], max_tokens, task)
            for i, (prompt, task) in enumerate(prompts)))
        timings["subtasks_wall_s"] = time.perf_counter() - t1
        timings["subtasks_sum_s"] = sum(r.seconds for r in results)
        ok = [(s, r) for s, r in zip(plan["subtasks"], results) if r.error is None]
        if not ok:
            raise RuntimeError("every subtask failed: " + "; ".join(r.error or "" for r in results))
        t2 = time.perf_counter()
        selected: dict[str, Any] = {}
        if req.strategy == "vote":
            i, votes = majority([r.text for _, r in ok])
            answer, selected = ok[i][1].text, {"index": i, "votes": votes, "of": len(ok)}
        elif req.strategy == "best-of-n":
            listing = "\n\n".join(f"[{k + 1}] {r.text}" for k, (_, r) in enumerate(ok))
            j = await self._call(self.cfg.judge, [{"role": "system", "content": JUDGE_PROMPT},
                                                  {"role": "user", "content": f"Task: {req.task}\n\n{listing}"}], 8)
            pick = parse_judge(j.text, len(ok)) if j.error is None else None
            if pick is None:
                pick, _ = majority([r.text for _, r in ok])
                selected = {"index": pick, "by": "majority (judge gave no valid pick)", "judge_error": j.error}
            else:
                selected = {"index": pick, "by": "judge", "judge_model": j.model}
            answer = ok[pick][1].text
        else:
            answer = await self._synthesise(req.task, ok, max_tokens, None)
        validation = None
        if req.json_schema is not None:
            value, why = check_schema(answer, req.json_schema)
            retried = False
            if why is not None:
                retried = True
                answer = await self._synthesise(req.task, ok, max_tokens, (req.json_schema, why, answer))
                value, why = check_schema(answer, req.json_schema)
            validation = {"valid": why is None, "error": why, "retried": retried, "value": value}
        timings["combine_s"] = time.perf_counter() - t2
        timings["total_s"] = time.perf_counter() - t0
        return {
            "object": "orchestration", "strategy": req.strategy, "answer": answer, "plan": plan,
            "subtasks": [{**s, **asdict(r)} for s, r in zip(plan["subtasks"], results)],
            "selected": selected or None, "validation": validation, "timings": timings,
            "calls": [asdict(c) for c in self.calls],
            "usage": {"prompt_tokens": sum(c.prompt_tokens for c in self.calls),
                      "completion_tokens": sum(c.completion_tokens for c in self.calls)},
            "cost_usd": sum(c.cost_usd for c in self.calls),
        }

    async def _synthesise(self, task: str, ok: list[tuple[dict, CallResult]], max_tokens: int,
                          repair: tuple[dict, str, str] | None) -> str:
        parts = "\n\n".join(f"## {s['prompt']}\n{r.text}" for s, r in ok)
        system = SYNTH_PROMPT
        if repair is not None:
            schema, why, previous = repair
            system += (f" Reply with JSON only, matching this schema: {json.dumps(schema)}. The previous reply "
                       f"was rejected ({why}): {previous[:2000]}")
        s = await self._call(self.cfg.synthesizer, [{"role": "system", "content": system},
                                                    {"role": "user", "content": f"Task: {task}\n\n{parts}"}],
                             max_tokens, "summarisation", repair is not None)
        if s.error is None and s.text.strip():
            return s.text
        if len(ok) == 1:
            return ok[0][1].text
        return "\n\n".join(r.text for _, r in ok)  # no synthesiser answered: the parts in order
