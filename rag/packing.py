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


# Chunk spans of one document "touch" when at most this many characters lie between them: the
# chunker strips the whitespace between its units (a space, a newline, a blank line), so the next
# chunk starts up to two characters after the previous one ends.
TOUCH_GAP = 2


def _touches(a_start: int, a_end: int, b_start: int, b_end: int) -> bool:
    return b_start <= a_end + TOUCH_GAP and a_start <= b_end + TOUCH_GAP


def _join(left: str, left_end: int, right: str, right_start: int) -> str:
    """`left` then `right` (document spans ending at left_end, starting at right_start): overlap
    text once, a gap filled with as many whitespace characters (a blank line for two) so offsets
    into the merged text still map to the document."""
    gap = right_start - left_end
    if gap >= 0:
        return left + ("\n" * gap if gap > 1 else " " * gap) + right
    return left + right[-gap:]


def _absorb(a: Passage, start: int, end: int, text: str, score: float, chunk_ids: list[str],
            page: int | None) -> None:
    """Widen passage `a` by the touching span [start, end) with its text."""
    if start < a.start:
        a.text = _join(text, end, a.text, a.start) if end < a.end else text
        a.start = start
        a.end = max(a.end, end)
    elif end > a.end:
        a.text = _join(a.text, a.end, text, start)
        a.end = end
    a.score = max(a.score, score)
    a.chunk_ids.extend(i for i in chunk_ids if i not in a.chunk_ids)
    a.tokens = 0  # the merged text is counted when packed
    if page is not None and (a.page is None or page < a.page):
        a.page = page  # a merged passage starts on its earliest page


def _merge(a: Passage, c: RetrievedChunk) -> bool:
    """Merge chunk c into passage a when they are the same document and their spans touch."""
    if a.doc_id != c.doc_id or not _touches(a.start, a.end, c.start, c.end):
        return False
    _absorb(a, c.start, c.end, c.text, c.score, [c.id], c.page)
    return True


def _fold(passages: list[Passage], grown: Passage) -> None:
    """A merge widened `grown`: fold in every other passage of its document it now touches (the
    better-ranked passage keeps its place)."""
    changed = True
    while changed:
        changed = False
        for other in passages:
            if other is not grown and other.doc_id == grown.doc_id and _touches(
                    grown.start, grown.end, other.start, other.end):
                keep, gone = sorted((grown, other), key=passages.index)
                _absorb(keep, gone.start, gone.end, gone.text, gone.score, gone.chunk_ids, gone.page)
                passages.remove(gone)
                grown, changed = keep, True
                break


def pack_context(chunks: list[RetrievedChunk], count_tokens: Callable[[str], int], budget: int,
                 min_piece: int = 24) -> list[Passage]:
    seen_hash: set[str] = set()
    passages: list[Passage] = []
    for c in chunks:  # chunks arrive most relevant first
        if c.hash and c.hash in seen_hash:
            continue
        if c.hash:
            seen_hash.add(c.hash)
        grown = next((p for p in passages if _merge(p, c)), None)
        if grown is not None:
            _fold(passages, grown)  # a merge can make two passages touch: fold them together
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
    """The numbered context block handed to a chat model: each passage's number and its text,
    Markdown heading lines left out. No title, section or source path: the citations carry them,
    and a small model copies such headers instead of answering (SmolLM2-135M listed
    "[1] Retrieval in ORFEAS (/path/retrieval.md)" for every passage: docs/benchmarks.md, RAG
    answers from SmolLM2)."""
    blocks = []
    for p in passages:
        text = "\n".join(line for line in p.text.split("\n") if line.strip() and not line.lstrip().startswith("#"))
        blocks.append(f"[{p.index}] {text or p.text.strip()}")
    return "\n\n".join(blocks)
