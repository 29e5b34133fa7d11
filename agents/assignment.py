"""Pure decisions of the coordinator: which agent takes a task, and which answer wins when
agents disagree."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Candidate:
    agent: str
    slot: int
    load: int
    priority: int = 0


def pick(candidates: list[Candidate]) -> Candidate | None:
    """Least loaded first; ties go to the higher priority, then the name and slot (stable)."""
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c.load, -c.priority, c.agent, c.slot))


def normalise(answer: Any) -> str:
    text = answer if isinstance(answer, str) else str(answer)
    return re.sub(r"[\s\W_]+", " ", text.lower()).strip()


def resolve(answers: list[dict[str, Any]], policy: str, judge_choice: int | None = None) -> dict[str, Any]:
    """Settle several agents' answers ({agent, priority, answer}) under priority, vote or judge.

    A judge's choice (an index into `answers`) wins under the judge policy; without a usable one
    the vote decides, and the result says so. Vote ties go to the higher priority."""
    if not answers:
        raise ValueError("no answers to resolve")
    keys = [normalise(a["answer"]) for a in answers]
    conflict = len(set(keys)) > 1
    by_priority = sorted(range(len(answers)), key=lambda i: -answers[i].get("priority", 0))
    chosen, used = by_priority[0], policy
    if policy == "judge" and judge_choice is not None and 0 <= judge_choice < len(answers):
        chosen = judge_choice
    elif policy in ("vote", "judge"):
        counts = Counter(keys)
        top = max(counts.values())
        chosen = next(i for i in by_priority if counts[keys[i]] == top)
        if policy == "judge":
            used = "vote (the judge gave no usable choice)"
    votes = dict(Counter(keys))
    return {"answer": answers[chosen]["answer"], "agent": answers[chosen]["agent"], "conflict": conflict,
            "policy": used, "votes": votes,
            "candidates": [{"agent": a["agent"], "answer": a["answer"]} for a in answers]}


def judge_prompt(task: str, answers: list[dict[str, Any]]) -> list[dict[str, str]]:
    listing = "\n".join(f"{i + 1}. ({a['agent']}) {a['answer']}" for i, a in enumerate(answers))
    return [{"role": "system", "content": "You settle disagreements between agents. Reply with only the "
                                          "number of the best answer."},
            {"role": "user", "content": f"Task: {task}\n\nAnswers:\n{listing}\n\nBest answer number:"}]


def read_judge_choice(text: str, n: int) -> int | None:
    m = re.search(r"\d+", text or "")
    if not m:
        return None
    i = int(m.group()) - 1
    return i if 0 <= i < n else None
