"""Answer quality scores (pure functions of the answer, the query, the packed passages and an
embedder): citation coverage, groundedness and context relevance, and the quality gate's decision.

- A *claim* is one sentence of the answer (citation markers removed; very short fragments skipped).
- A context sentence *supports* a claim when it is the claim verbatim, or its cosine similarity
  to the claim (unit vectors from the service's dense embedder) reaches `support_threshold`.
- **citation coverage**: the share of claims supported by a passage the claim itself cites as [n].
- **groundedness**: the mean over claims of the best cosine to any context sentence (0..1); an
  ungrounded answer talks about things the context does not say.
- **context relevance**: the mean over passages of the best cosine between the query and one of
  the passage's sentences.

Only the first `max_context_sentences` context sentences in passage rank order are embedded
(plus every sentence of a cited passage): the same bound the extractive answerer uses, so an
extractive answer's scores reuse its vectors (`MemoEmbed`) and cost no second pass.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, Field

from rag.answer import sentences
from rag.packing import Passage

Embed = Callable[[list[str]], np.ndarray]

# A sentence ends at . ! ? (closing quotes/brackets allowed), then any citation markers, then a
# space or the end; a newline always ends one. Decimals ("3.7") never end a sentence.
_END = re.compile(r"[.!?]+[\"')\]]*((?:\s*\[\d+(?:\s*,\s*\d+)*\])*)(?=\s|$)|\n+")
CITATION_MARK = re.compile(r"\s*\[(\d+(?:\s*,\s*\d+)*)\]")
MIN_CLAIM_CHARS = 12


class Claim(BaseModel):
    text: str
    cites: list[int] = Field(default_factory=list, description="Passage numbers the sentence cites.")
    support: float = Field(description="Best cosine to a context sentence (1 for a verbatim quote).")
    cited_support: float = Field(0.0, description="Best cosine to a sentence of a passage it cites.")


class AnswerQuality(BaseModel):
    """Scores of one answer (`RagQueryResponse.quality`); each in 0..1."""

    citation_coverage: float = Field(description="Share of answer sentences supported by a passage they cite.")
    groundedness: float = Field(description="Mean support of the answer's sentences by the context (embeddings).")
    context_relevance: float = Field(description="Mean best similarity of each passage's sentences to the query.")
    claims: int = Field(description="Answer sentences scored.")
    supported_claims: int = Field(0, description="Answer sentences some context sentence supports.")
    unsupported: list[str] = Field(default_factory=list,
                                   description="Up to five answer sentences no context sentence supports.")


class GateDecision(BaseModel):
    """What the quality gate did with a generated answer (`diagnostics.gate`)."""

    action: Literal["pass", "refuse", "extractive"]
    groundedness: float
    threshold: float
    reason: str | None = None


class MemoEmbed:
    """`embed` remembering each text's vector for one query: the extractive answerer, the
    citation builder and the scores embed many of the same sentences."""

    def __init__(self, embed: Embed):
        self._embed, self._seen = embed, {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in self._seen))
        if todo:
            for t, v in zip(todo, self._embed(todo)):
                self._seen[t] = np.asarray(v, dtype=np.float32)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([self._seen[t] for t in texts])


def answer_pieces(answer: str) -> Iterator[tuple[str, re.Match | None]]:
    """Each sentence of an answer as written (markers and spacing kept), with the match that ended
    it (None for a last sentence without an end). Markers after the full stop ("... capital. [1]")
    belong to the sentence before them."""
    pos = 0
    for m in list(_END.finditer(answer)) + [None]:
        end = m.end() if m else len(answer)
        yield answer[pos:end], m
        pos = end


def answer_claims(answer: str) -> list[tuple[str, list[int]]]:
    """(sentence without markers, cited passage numbers) for each sentence of an answer."""
    out: list[tuple[str, list[int]]] = []
    for piece, _ in answer_pieces(answer):
        cites = [int(n) for g in CITATION_MARK.findall(piece) for n in g.split(",")]
        text = " ".join(CITATION_MARK.sub("", piece).split()).lstrip("#*-• ").strip()
        if len(text) >= MIN_CLAIM_CHARS:
            out.append((text, list(dict.fromkeys(cites))))
    return out


def context_sentences(passages: list[Passage], max_sentences: int, min_chars: int = 20,
                      include: set[int] = frozenset()) -> list[tuple[int, str]]:
    """(passage number, sentence): the first `max_sentences` of at least `min_chars` in passage
    rank order (the extractive answerer's candidates), plus every sentence of the passages in
    `include`."""
    out: list[tuple[int, str]] = []
    taken = 0
    for p in sorted(passages, key=lambda p: p.index):
        for _, _, s in sentences(p.text, p.start) or [(p.start, p.end, p.text)]:
            first = len(s) >= min_chars and taken < max_sentences
            taken += first
            if first or p.index in include:
                out.append((p.index, s))
    return out


def score_answer(answer: str, query: str, passages: list[Passage], embed: Embed, *,
                 support_threshold: float = 0.6, max_context_sentences: int = 32) -> AnswerQuality:
    """The three scores of `answer` against the passages it was written from."""
    claims = answer_claims(answer)
    cited = {i for _, c in claims for i in c}
    ctx = context_sentences(passages, max_context_sentences, include=cited)
    if not passages or not ctx:
        return AnswerQuality(citation_coverage=0.0, groundedness=0.0, context_relevance=0.0, claims=len(claims),
                             unsupported=[t for t, _ in claims][:5])
    texts = {p.index: p.text for p in passages}
    cv = embed([s for _, s in ctx])
    owner = np.array([i for i, _ in ctx])
    qv = embed([query])[0]
    qcos = cv @ qv
    relevance = float(np.mean([max(0.0, float(qcos[owner == p.index].max())) for p in passages
                               if (owner == p.index).any()]))
    if not claims:
        return AnswerQuality(citation_coverage=0.0, groundedness=0.0, context_relevance=round(relevance, 4), claims=0)
    scored: list[Claim] = []
    av = embed([t for t, _ in claims])
    for (text, cites), v in zip(claims, av):
        cos = np.clip(cv @ v, 0.0, 1.0)
        verbatim = {i for i, _ in ctx if text in texts.get(i, "")}
        mine = np.isin(owner, cites)
        support = 1.0 if verbatim else float(cos.max())
        cited_support = 1.0 if verbatim & set(cites) else (float(cos[mine].max()) if mine.any() else 0.0)
        scored.append(Claim(text=text, cites=cites, support=support, cited_support=cited_support))
    return AnswerQuality(
        citation_coverage=round(sum(c.cited_support >= support_threshold for c in scored) / len(scored), 4),
        groundedness=round(float(np.mean([c.support for c in scored])), 4),
        context_relevance=round(relevance, 4), claims=len(scored),
        supported_claims=sum(c.support >= support_threshold for c in scored),
        unsupported=[c.text for c in scored if c.support < support_threshold][:5])


def gate(quality: AnswerQuality, min_groundedness: float, action: Literal["refuse", "extractive"]) -> GateDecision:
    """Pass an answer whose groundedness reaches the threshold; otherwise refuse it or replace it
    with the extractive answer, saying why. A threshold of 0 passes everything."""
    g = quality.groundedness
    if g >= min_groundedness:
        return GateDecision(action="pass", groundedness=g, threshold=min_groundedness)
    why = (f"groundedness {g:.2f} is below the quality gate's {min_groundedness:.2f}: "
           f"{quality.supported_claims} of {quality.claims} "
           "sentences are supported by the retrieved passages")
    return GateDecision(action=action, groundedness=g, threshold=min_groundedness, reason=why)
