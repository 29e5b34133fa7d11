"""Citations the model did not write: each sentence of a generated answer that cites no passage
gets the number of the passage whose sentence supports it (the quality scores' support rule: a
verbatim quote, or cosine >= rag.quality.support_threshold), inserted after it as [n].

Small chat models (SmolLM2-135M) answer from the context but seldom write [n] markers. A
sentence no context sentence supports gets nothing: attribution never claims support the
scores did not measure, and it runs only on an answer the quality gate passed. The citations it
adds say so (`Citation.attributed`).
"""

from __future__ import annotations

import numpy as np

from rag.packing import Passage
from rag.quality import CITATION_MARK, MIN_CLAIM_CHARS, Embed, answer_pieces, context_sentences


def attribute_citations(answer: str, passages: list[Passage], embed: Embed, *, support_threshold: float,
                        max_context_sentences: int = 32) -> tuple[str, set[int]]:
    """`answer` with [n] after each uncited sentence that passage n supports, and the passage
    numbers so added (empty when every sentence cites already or none is supported)."""
    ctx = context_sentences(passages, max_context_sentences)
    if not ctx or not answer.strip():
        return answer, set()
    owner = [i for i, _ in ctx]
    texts = {p.index: p.text for p in passages}
    pieces: list[tuple[int, str]] = []  # (where the marker goes, the sentence) for uncited sentences
    for piece, m in answer_pieces(answer):
        text = " ".join(piece.split()).lstrip("#*-• ").strip()
        if len(text) >= MIN_CLAIM_CHARS and not CITATION_MARK.search(piece) and "```" not in piece:
            if m is None:
                at = len(answer.rstrip())
            elif m.group(0).startswith("\n"):
                at = m.start()
            else:
                at = m.end()
            pieces.append((at, text))
    if not pieces:
        return answer, set()
    cv = embed([s for _, s in ctx])
    av = embed([t for _, t in pieces])
    inserts: list[tuple[int, int]] = []
    for (at, text), v in zip(pieces, av):
        verbatim = [i for i in dict.fromkeys(owner) if text in texts.get(i, "")]
        if verbatim:
            inserts.append((at, verbatim[0]))
            continue
        cos = cv @ v
        best = int(np.argmax(cos))
        if float(cos[best]) >= support_threshold:
            inserts.append((at, owner[best]))
    out = answer
    for at, index in sorted(inserts, reverse=True):  # from the end: earlier offsets stay valid
        out = f"{out[:at]} [{index}]{out[at:]}"
    return out, {i for _, i in inserts}
