"""The LLM-based graph extractor (`rag.graph.extractor: llm`): a chat model at an OpenAI-compatible
URL gives each chunk's entities and typed relations, in `rag.graph.extract`'s payload format, with
the rules as the per-chunk fallback; and the choice of extractor that ingest and the edge sync use."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from typing import Any

from pydantic import BaseModel, Field

from rag.graph import EXTRACTOR, RELATION, extract, extract_json, normal

log = logging.getLogger(__name__)


class _LLMEntity(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    kind: str = "entity"


class _LLMRelation(BaseModel):
    source: str = Field(min_length=1, max_length=200)
    relation: str = Field(min_length=1, max_length=80)
    target: str = Field(min_length=1, max_length=200)


class _LLMReply(BaseModel):
    entities: list[_LLMEntity] = Field(default_factory=list)
    relations: list[_LLMRelation] = Field(default_factory=list)


LLM_PROMPT = ("Extract the named entities and the relations between them from the text. Reply with JSON "
              'only: {"entities":[{"name":...,"kind":...}],"relations":[{"source":...,"relation":...,'
              '"target":...}]}. Relation names are short verbs in snake_case.')
LLM_FALLBACKS: Counter = Counter()  # why a chunk fell back to the rules: "http", "json"
# A fallen-back chunk's payload says so ({"e", "r", "fallback": reason}): ingest counts them in its
# summary (the counter above is per worker process), and they can be found and re-extracted later.
FALLBACK = "fallback"


def llm_extractor_name(model: str) -> str:
    return f"llm-1:{model}"


def _relation_name(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or RELATION


def _parse_llm(content: str) -> _LLMReply:
    start, end = content.find("{"), content.rfind("}")
    if start < 0 or end < start:
        raise ValueError("no JSON object in the reply")
    return _LLMReply.model_validate_json(content[start:end + 1])


def extract_llm(text: str, *, url: str, model: str, timeout: float = 30.0,
                api_key: str | None = None, max_tokens: int = 384) -> dict[str, Any]:
    """One chunk's extraction by a chat model at an OpenAI-compatible `url` (its `/v1` base), in
    `extract`'s payload format with typed edges `[a, b, relation]`, plus the rules' entities.
    Any failure (endpoint down, bad or partial JSON) falls back to `extract(text)`, counted, with
    `"fallback": "http" | "json"` added."""
    import httpx
    base = extract(text)
    try:
        r = httpx.post(url.rstrip("/") + "/chat/completions", timeout=timeout,
                       headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
                       json={"model": model, "temperature": 0, "max_tokens": max_tokens,
                             "response_format": {"type": "json_object"},  # JSON mode: a small model too
                             "messages": [{"role": "system", "content": LLM_PROMPT},
                                          {"role": "user", "content": text}]})
        r.raise_for_status()
        content = r.json()["choices"][0]["message"]["content"]
    except Exception as exc:  # noqa: BLE001 - any transport/protocol failure: the rules' extraction
        LLM_FALLBACKS["http"] += 1
        log.warning("LLM graph extraction failed (%s); rule-based extraction for this chunk", exc)
        return {**base, FALLBACK: "http"}
    try:
        reply = _parse_llm(content or "")
    except Exception as exc:  # noqa: BLE001 - pydantic/JSON errors
        LLM_FALLBACKS["json"] += 1
        log.warning("LLM graph reply not valid JSON (%s); rule-based extraction for this chunk", exc)
        return {**base, FALLBACK: "json"}
    entities = [list(e) for e in base["e"]]
    index = {e[0]: i for i, e in enumerate(entities)}

    def ent(name: str, kind: str) -> int:
        key = normal(name)
        if key not in index:
            index[key] = len(entities)
            entities.append([key, name.strip(), kind])
        return index[key]

    for e in reply.entities:
        if normal(e.name):
            ent(e.name, _relation_name(e.kind) if e.kind else "entity")
    typed: dict[tuple[int, int], str] = {}
    for rel in reply.relations:
        if not normal(rel.source) or not normal(rel.target):
            continue
        a, b = ent(rel.source, "entity"), ent(rel.target, "entity")
        if a != b:
            typed.setdefault((min(a, b), max(a, b)), _relation_name(rel.relation))
    pairs = [[a, b, t] for (a, b), t in sorted(typed.items())]
    pairs += [p for p in base["r"] if (p[0], p[1]) not in typed]
    return {"e": entities, "r": pairs}


def extractor_name(graph_settings: dict) -> str:
    """What extracts a collection's graph (`rag.graph` as a dict): part of the indexing
    parameters, so switching extractor or model re-writes documents on their next ingest."""
    if graph_settings.get("extractor") == "llm":
        return llm_extractor_name(graph_settings["llm_model"])
    return EXTRACTOR


def chunk_extractor(graph_settings: dict):
    """`rag.graph` (a dict: it travels to Ray Data workers) -> text -> a chunk's `graph`
    payload (JSON): the rules, or the chat model with the rules as its per-chunk fallback."""
    if graph_settings.get("extractor") == "llm":
        import os

        url, model, timeout = graph_settings["llm_url"], graph_settings["llm_model"], graph_settings["llm_timeout"]
        # Read where the extraction runs (a Ray Data worker inherits the node's environment).
        api_key = os.environ.get(graph_settings.get("llm_api_key_env") or "") or None
        return lambda text: json.dumps(extract_llm(text, url=url, model=model, timeout=timeout, api_key=api_key),
                                       separators=(",", ":"))
    return extract_json
