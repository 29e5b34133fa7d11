"""Request featurisation for routing: pure functions of the request, no cluster needed.

A request becomes `RequestFeatures`: its task type (fast keyword rules, then — when the rules
are unsure — the nearest labelled prototype in MiniLM embedding space), an estimate of its
prompt tokens, the capabilities it cannot do without (tools, JSON mode, images), and an optional
latency budget. The gateway adds the caller's side (allowed models, remaining budget) in
`selection.SelectionContext`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

TASK_TYPES = ("code", "math", "summarisation", "extraction", "qa", "creative", "general")

# Keyword rules: (task, pattern, weight). A task's score is the sum of its matching weights.
_RULES: list[tuple[str, str, float]] = [
    ("code", r"```|\bdef |\bclass \w+|\bfunction\b|\bimport \w+|#include|\bSELECT\b.+\bFROM\b", 2.0),
    ("code", r"\b(python|javascript|typescript|rust|golang|java|c\+\+|sql|regex|bash|code|compile|bug|stack ?trace|"
             r"refactor|unit tests?|function|api endpoint)\b", 1.0),
    ("math", r"\b(solve|equation|integral|derivative|prove|theorem|probability|calculate|compute)\b", 1.0),
    ("math", r"\d+\s*[-+*/^=]\s*\d+|\bx\s*=|√|∫|\bsum of\b", 1.5),
    ("summarisation", r"\b(summari[sz]e|summary|tl;?dr|condense|key points|in (a few|\d+) (sentences|words|bullets))\b",
     2.0),
    ("extraction", r"\b(extract|parse|pull out|list (all|every)|find all|named entities|fields?|as json|into json|"
                   r"to json|table of)\b", 1.5),
    ("creative", r"\b(poem|story|haiku|lyrics|limerick|novel|fiction|imagine|creative|slogan|joke)\b", 2.0),
    ("qa", r"^\s*(who|what|when|where|why|how|which|is|are|does|do|can)\b.*\?\s*$", 1.0),
    ("qa", r"\b(explain|what is|what are|define|difference between)\b", 0.8),
]
_COMPILED = [(t, re.compile(p, re.IGNORECASE | re.MULTILINE | re.DOTALL), w) for t, p, w in _RULES]

# Rules decide alone at or above this score; below it the embedding classifier is asked.
RULE_CONFIDENT = 1.5

# Labelled prototypes for the embedding classifier (MiniLM): a few typical requests per type.
PROTOTYPES: dict[str, list[str]] = {
    "code": ["Write a Python function that reverses a linked list.",
             "Why does this JavaScript code throw undefined is not a function?",
             "Refactor this class to use dependency injection."],
    "math": ["What is the integral of x squared from 0 to 3?",
             "Solve for x: 3x + 7 = 22.",
             "What is the probability of rolling two sixes with two dice?"],
    "summarisation": ["Summarise the following article in three sentences.",
                      "Give me the key points of this meeting transcript.",
                      "Condense this report into a short abstract."],
    "extraction": ["Extract every person and organisation named in this text.",
                   "Pull the invoice number, date and total out of this email.",
                   "List all the dates mentioned in the document as JSON."],
    "qa": ["Who was the first person to walk on the moon?",
           "What is the capital city of Australia?",
           "How does photosynthesis work?"],
    "creative": ["Write a short poem about the sea at night.",
                 "Tell me a bedtime story about a brave little fox.",
                 "Come up with a catchy slogan for a coffee shop."],
    "general": ["Hello, how are you today?",
                "Thanks, that helps a lot.",
                "Can you help me plan my week?"],
}


@dataclass(frozen=True)
class RequestFeatures:
    task: str = "general"
    task_source: str = "default"  # rules | embedding | default | given
    task_confidence: float = 0.0
    prompt_tokens: int = 0
    max_output_tokens: int = 256
    required: frozenset[str] = field(default_factory=frozenset)
    latency_budget_s: float | None = None
    text: str = ""

    @property
    def context_needed(self) -> int:
        return self.prompt_tokens + self.max_output_tokens


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate (about four characters per token, at least one per word)."""
    if not text:
        return 0
    return max(math.ceil(len(text) / 4), len(text.split()))


def rule_scores(text: str) -> dict[str, float]:
    scores: dict[str, float] = {}
    for task, pattern, weight in _COMPILED:
        if pattern.search(text):
            scores[task] = scores.get(task, 0.0) + weight
    return scores


def classify_rules(text: str) -> tuple[str, float]:
    """(task, score) from the keyword rules; ('general', 0) when none fires. Ties go to the earlier type."""
    scores = rule_scores(text)
    if not scores:
        return "general", 0.0
    best = max(TASK_TYPES, key=lambda t: (scores.get(t, 0.0), -TASK_TYPES.index(t)))
    return best, scores[best]


def centroids(vectors_by_task: dict[str, Sequence[Sequence[float]]]) -> dict[str, list[float]]:
    """Unit-length mean vector of each task's prototype embeddings."""
    out: dict[str, list[float]] = {}
    for task, vecs in vectors_by_task.items():
        dim = len(vecs[0])
        mean = [sum(v[i] for v in vecs) / len(vecs) for i in range(dim)]
        norm = math.sqrt(sum(x * x for x in mean)) or 1.0
        out[task] = [x / norm for x in mean]
    return out


def classify_embedding(vector: Sequence[float], cents: dict[str, list[float]]) -> tuple[str, float]:
    """Nearest centroid by cosine similarity: (task, similarity)."""
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    best, best_sim = "general", -2.0
    for task, c in cents.items():
        sim = sum(a * b for a, b in zip(vector, c)) / norm
        if sim > best_sim:
            best, best_sim = task, sim
    return best, best_sim


def message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def _has_image(messages: Sequence[dict[str, Any]]) -> bool:
    for m in messages:
        content = m.get("content")
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in ("image_url", "input_image")
                                             for p in content):
            return True
    return False


def required_capabilities(body: dict[str, Any], messages: Sequence[dict[str, Any]]) -> frozenset[str]:
    needs = {"chat"}
    if body.get("tools") or body.get("functions"):
        needs.add("tools")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        needs.add("json")
    if _has_image(messages):
        needs.add("vision")
    return frozenset(needs)


def featurise(body: dict[str, Any], *, max_output_tokens: int, latency_budget_ms: float | None = None,
              task_hint: str | None = None) -> RequestFeatures:
    """Features of a chat (`messages`) or completion (`prompt`) request body, rules only.

    `task_hint` (the `x-orfeas-task` header or an orchestrator subtask) overrides the classifier.
    """
    if "messages" in body:
        messages = body["messages"]
        all_text = "\n".join(message_text(m) for m in messages)
        users = [message_text(m) for m in messages if m.get("role") == "user"]
        text = users[-1] if users else all_text
        overhead = 4 * len(messages)
    else:
        messages = []
        all_text = text = body.get("prompt") or ""
        overhead = 0
    if task_hint in TASK_TYPES:
        task, source, conf = task_hint, "given", 1.0
    else:
        task, conf = classify_rules(text)
        source = "rules" if conf > 0 else "default"
    return RequestFeatures(
        task=task, task_source=source, task_confidence=conf,
        prompt_tokens=estimate_tokens(all_text) + overhead,
        max_output_tokens=max_output_tokens,
        required=required_capabilities(body, messages),
        latency_budget_s=latency_budget_ms / 1000 if latency_budget_ms is not None else None,
        text=text,
    )


def needs_embedding(features: RequestFeatures) -> bool:
    """Whether the prototype classifier should be asked (rules unsure, no task given)."""
    return features.task_source in ("rules", "default") and features.task_confidence < RULE_CONFIDENT \
        and bool(features.text.strip())


def with_task(features: RequestFeatures, task: str, confidence: float, source: str) -> RequestFeatures:
    from dataclasses import replace

    return replace(features, task=task, task_confidence=confidence, task_source=source)
