"""Context packing: retrieved chunks -> numbered passages that fit a token budget.

Exact duplicates (same content hash) are dropped; chunks of one document whose character spans
overlap or touch are merged into one passage (the overlap text appears once). Passages keep the
order of their best chunk's relevance, are numbered from 1 for citation, and are added until
the budget is spent; the passage that does not fit whole is cut at a sentence boundary when
enough room is left, otherwise packing stops.
"""

from __future__ import annotations

import re
from typing import Callable

from rag.payload import PASSAGE_FIELDS, ChunkPayload, view
from rag.retrieval import RetrievedChunk


class Passage(view(ChunkPayload, PASSAGE_FIELDS, "PassageFields")):
    """A numbered context passage: the chunk payload's passage fields (a merged passage's span,
    text and page cover all its chunks) with its number, best score, chunks and token count."""

    index: int
    score: float
    chunk_ids: list[str]
    tokens: int = 0


def _merge(a: Passage, c: RetrievedChunk) -> bool:
    """Merge chunk c into passage a when they are the same document and their spans touch."""
    if a.doc_id != c.doc_id or c.end < a.start or c.start > a.end:
        return False
    if c.start < a.start:
        a.text = c.text[: a.start - c.start] + a.text
        a.start = c.start
    if c.end > a.end:
        a.text = a.text + c.text[len(c.text) - (c.end - a.end):]
        a.end = c.end
    a.score = max(a.score, c.score)
    a.chunk_ids.append(c.id)
    a.tokens = 0  # the merged text is counted when packed
    if a.page is None or (c.page is not None and c.page < a.page):
        a.page = c.page if a.page is None else a.page
    return True


def pack_context(chunks: list[RetrievedChunk], count_tokens: Callable[[str], int], budget: int,
                 min_piece: int = 24) -> list[Passage]:
    seen_hash: set[str] = set()
    passages: list[Passage] = []
    for c in chunks:  # chunks arrive most relevant first
        if c.hash and c.hash in seen_hash:
            continue
        if c.hash:
            seen_hash.add(c.hash)
        if any(_merge(p, c) for p in passages):
            # a merge can make two passages touch: fold them together
            continue
        passages.append(Passage(index=0, score=c.score, chunk_ids=[c.id], tokens=c.token_count,
                                **{f: getattr(c, f) for f in PASSAGE_FIELDS}))
    out: list[Passage] = []
    used = 0
    for p in passages:
        # Ingest stored each chunk's count (same tokenizer); only merged passages are counted here:
        # counting ten chunks costs about as much as embedding the query on a small CPU.
        n = p.tokens or count_tokens(p.text)
        if used + n <= budget:
            p.tokens = n
        else:
            room = budget - used
            if room < min_piece:
                break
            sentences = re.split(r"(?<=[.!?])\s+", p.text)
            kept, t = [], 0
            for s in sentences:
                st = count_tokens(s)
                if t + st > room:
                    break
                kept.append(s)
                t += st + 1
            if not kept:
                break
            p.text = " ".join(kept)
            p.end = p.start + len(p.text)
            p.tokens = count_tokens(p.text)
        used += p.tokens
        p.index = len(out) + 1
        out.append(p)
        if used >= budget:
            break
    return out


def format_context(passages: list[Passage]) -> str:
    """The numbered context block handed to a chat model."""
    blocks = []
    for p in passages:
        head = f"[{p.index}] {p.title}" + (f" — {p.section}" if p.section and p.section != p.title else "")
        blocks.append(f"{head} ({p.source})\n{p.text}")
    return "\n\n".join(blocks)
