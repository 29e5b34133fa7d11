"""Answers with citations: the extractive answerer (no chat model needed) and the citation
extraction for answers a chat model wrote from numbered passages."""

from __future__ import annotations

import re

import numpy as np
from pydantic import BaseModel, Field

from rag.packing import Passage

_SENT = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=\S)")
_WORD = re.compile(r"[A-Za-z0-9]+")
_STOP = set("""a an and are as at be but by for from has have how i in is it its of on or that the this to was
were what when where which who why will with do does did can could should would you your we our they their
there these those than then so if not no""".split())


class Citation(BaseModel):
    index: int                 # the passage number the answer cites as [n]
    source: str
    title: str = ""
    doc_id: str
    position: dict             # start/end character offsets, page, chunk ids
    score: float
    quote: str                 # the quoted span
    attributed: bool = Field(False, description="The model did not cite this passage: the service matched an "
                             "uncited answer sentence to it by the quality scores' support rule (rag/attribution.py).")


def sentences(text: str, offset: int = 0) -> list[tuple[int, int, str]]:
    """(start, end, sentence) with offsets into the original text (plus `offset`); heading lines skipped."""
    out: list[tuple[int, int, str]] = []

    def add(at: int, piece: str) -> None:
        stripped = piece.strip()
        if stripped:
            lead = len(piece) - len(piece.lstrip())
            out.append((offset + at + lead, offset + at + lead + len(stripped), stripped))

    pos = 0
    for line in text.split("\n"):
        if line.strip() and not line.lstrip().startswith("#"):
            s = 0
            for m in _SENT.finditer(line):
                add(pos + s, line[s:m.start() + len(m.group(0).rstrip())])
                s = m.end()
            add(pos + s, line[s:])
        pos += len(line) + 1
    return out


# A further sentence is quoted only if it scores at least this share of the best one.
RELATIVE_CUT = 0.75


def _stem(word: str) -> str:
    # Plural / third-person "s" only: enough for "hosts" to meet "host" without a stemmer's surprises.
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def _terms(text: str) -> set[str]:
    return {_stem(w.lower()) for w in _WORD.findall(text) if w.lower() not in _STOP and len(w) > 1}


def _position(p: Passage, start: int | None = None, end: int | None = None) -> dict:
    return {"start": p.start if start is None else start, "end": p.end if end is None else end,
            "page": p.page, "chunk_ids": list(p.chunk_ids)}


def extractive_answer(query: str, passages: list[Passage], embed, n_sentences: int = 3,
                      min_chars: int = 20, max_candidates: int = 32) -> tuple[str, list[Citation]]:
    """Quote the sentences most relevant to the query, each followed by its passage number.

    `embed(texts) -> np.ndarray` gives unit vectors (the retriever's dense embedder). A
    sentence's score mixes its cosine similarity to the query with the share of query terms it
    contains, and a small bonus for coming from a higher-ranked passage. Only the first
    `max_candidates` sentences in passage rank order are embedded: embedding every sentence of a
    full context costs a second on a small CPU, and low-ranked passages rarely supply the answer.
    """
    cands: list[tuple[Passage, int, int, str]] = []
    for p in sorted(passages, key=lambda p: p.index):
        for st, en, s in sentences(p.text, p.start):
            if len(s) >= min_chars and len(cands) < max_candidates:
                cands.append((p, st, en, s))
    if not cands:
        return "", []
    vecs = embed([query] + [c[3] for c in cands])
    qv, sv = vecs[0], vecs[1:]
    cos = sv @ qv
    qterms = _terms(query)
    lex = np.array([len(qterms & _terms(c[3])) / max(1, len(qterms)) for c in cands])
    rank_bonus = np.array([1.0 / (1 + 0.15 * (c[0].index - 1)) for c in cands])
    score = 0.6 * cos + 0.3 * lex + 0.1 * rank_bonus
    order = np.argsort(-score)
    best = float(score[order[0]])
    chosen: list[int] = []
    for i in order:
        if len(chosen) >= n_sentences or (chosen and score[i] < RELATIVE_CUT * best):
            break  # enough, or the rest is much weaker than the best: quoting it would only add noise
        if any(float(sv[i] @ sv[j]) > 0.92 for j in chosen):  # near-duplicate sentence
            continue
        chosen.append(int(i))
    parts, cites = [], []
    for i in chosen:
        p, st, en, s = cands[i]
        parts.append(f"{s} [{p.index}]")
        cites.append(Citation(index=p.index, source=p.source, title=p.title, doc_id=p.doc_id,
                              position=_position(p, st, en), score=round(float(score[i]), 4), quote=s))
    return " ".join(parts), cites


def cited_indices(answer: str) -> list[int]:
    seen: list[int] = []
    for m in re.finditer(r"\[(\d+(?:\s*,\s*\d+)*)\]", answer):
        for n in m.group(1).split(","):
            k = int(n)
            if k not in seen:
                seen.append(k)
    return seen


def citations_for_generated(answer: str, query: str, passages: list[Passage], embed,
                            attributed: set[int] = frozenset()) -> list[Citation]:
    """Citations for a generated answer: the passages it cites as [n], each with its sentence
    closest to the answer as the quoted span. An answer that cites nothing gets no citations:
    attaching the top passage would claim support the model never gave (citation coverage and
    the quality gate judge such an answer instead). `attributed`: the passage numbers the service
    added (rag/attribution.py), not the model."""
    by_index = {p.index: p for p in passages}
    idx = [i for i in cited_indices(answer) if i in by_index]
    if not idx:
        return []
    cites = []
    av = embed([answer or query])[0]
    for i in idx:
        p = by_index[i]
        sents = sentences(p.text, p.start) or [(p.start, p.end, p.text)]
        sv = embed([s[2] for s in sents])
        j = int(np.argmax(sv @ av))
        st, en, s = sents[j]
        cites.append(Citation(index=i, source=p.source, title=p.title, doc_id=p.doc_id,
                              position=_position(p, st, en), score=round(p.score, 4), quote=s,
                              attributed=i in attributed))
    return cites
