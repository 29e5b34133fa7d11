"""Token-based chunking with the embedding model's own tokenizer.

Text is cut into units (headings, then sentences inside paragraphs); units are packed into
chunks of at most `size` tokens. A heading always starts a new chunk and names the section of
the chunks under it. Consecutive chunks share whole trailing sentences up to `overlap` tokens.
A sentence longer than a chunk is split at token offsets. Every chunk keeps its character
offsets into the document's text, its page (for PDFs) and a content hash: a `ChunkPayload`
(rag/payload.py) with its point id.
"""

from __future__ import annotations

import bisect
import hashlib
import re
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from rag.documents import Document
from rag.payload import ChunkPayload

# Stable namespace for point ids: uuid5(NS, f"{doc_id}:{chunk_index}").
POINT_NAMESPACE = uuid.UUID("5b1c3f1e-6a0e-4f57-9b1e-0b5e8a3d2c11")

_HEADING = re.compile(r"^(#{1,6})\s+(.*\S)\s*$")
# A sentence ends at . ! ? (optionally followed by quotes/brackets) before whitespace.
_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=\S)")


def point_id(doc_id: str, chunk_index: int) -> str:
    return str(uuid.uuid5(POINT_NAMESPACE, f"{doc_id}:{chunk_index}"))


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class Chunk(ChunkPayload):
    """A chunk as the chunker cuts it: its point id and its payload (the ingest job sets `root`
    and the indexed `doc_hash`)."""

    id: str


@lru_cache(maxsize=4)
def load_tokenizer(model_dir: str):
    """The embedding model's fast tokenizer (tokenizer.json), without truncation or padding."""
    from pathlib import Path

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


@dataclass
class _Unit:
    start: int
    end: int
    heading: str | None = None  # set for heading lines
    tokens: int = 0


def _units(text: str) -> list[_Unit]:
    units: list[_Unit] = []
    pos = 0
    for para in re.split(r"(\n\s*\n)", text):
        if not para or para.isspace() or re.fullmatch(r"\n\s*\n", para):
            pos += len(para)
            continue
        line_pos = pos
        for line in para.split("\n"):
            m = _HEADING.match(line)
            if m:
                units.append(_Unit(line_pos, line_pos + len(line), heading=m.group(2)))
            elif line.strip():
                # sentences inside the line
                s = 0
                for sm in _SENT_END.finditer(line):
                    units.append(_Unit(line_pos + s, line_pos + sm.start() + len(sm.group(0).rstrip())))
                    s = sm.end()
                if line[s:].strip():
                    units.append(_Unit(line_pos + s, line_pos + len(line.rstrip())))
            line_pos += len(line) + 1
        pos += len(para)
    # strip leading whitespace from unit starts
    out = []
    for u in units:
        while u.start < u.end and text[u.start].isspace():
            u.start += 1
        if u.end > u.start:
            out.append(u)
    return out


class Chunker:
    def __init__(self, tokenizer, size: int = 200, overlap: int = 32):
        if size < 8:
            raise ValueError("chunk size must be at least 8 tokens")
        if not 0 <= overlap < size:
            raise ValueError("overlap must be at least 0 and smaller than the chunk size")
        self.tok = tokenizer
        self.size = size
        self.overlap = overlap

    def _split_long(self, u: _Unit, starts: list[int], ends: list[int], first: int, last: int) -> list[_Unit]:
        """A unit longer than a chunk (its tokens first..last-1): cut every `size` tokens."""
        pieces = []
        for i in range(first, last, self.size):
            j = min(i + self.size, last)
            pieces.append(_Unit(starts[i], ends[j - 1], tokens=j - i))
        return pieces

    def split(self, doc: Document) -> list[Chunk]:
        text = doc.text
        units = _units(text)
        # One tokenisation of the whole text: units never split a word (they end at whitespace), so
        # the tokens starting inside a unit's span are the tokens of the unit on its own.
        offsets = self.tok.encode(text, add_special_tokens=False).offsets
        starts, ends = [o[0] for o in offsets], [o[1] for o in offsets]

        def tokens_in(s: int, e: int) -> tuple[int, int]:  # [first, last) token indices
            return bisect.bisect_left(starts, s), bisect.bisect_left(starts, e)

        def n_tokens(s: int, e: int) -> int:
            first, last = tokens_in(s, e)
            return last - first

        expanded: list[_Unit] = []
        for u in units:
            u.tokens = n_tokens(u.start, u.end)
            if u.heading is None and u.tokens > self.size:
                expanded.extend(self._split_long(u, starts, ends, *tokens_in(u.start, u.end)))
            else:
                expanded.append(u)

        spans: list[tuple[int, int, str, int]] = []  # (start, end, section, tokens)
        current: list[_Unit] = []
        section = ""
        cur_tokens = 0

        def flush(keep_overlap: bool) -> None:
            nonlocal current, cur_tokens
            body = [u for u in current if u.heading is None]
            if body:
                spans.append((current[0].start, current[-1].end, section, cur_tokens))
            carry: list[_Unit] = []
            if keep_overlap and body and self.overlap:
                t = 0
                for u in reversed(body):
                    if t + u.tokens > self.overlap:
                        break
                    carry.insert(0, u)
                    t += u.tokens
                # do not carry a chunk's entire body (that would repeat it whole)
                if len(carry) == len(body):
                    carry = carry[1:]
            current = carry
            cur_tokens = sum(u.tokens for u in carry)

        for u in expanded:
            if u.heading is not None:
                flush(keep_overlap=False)
                section = u.heading
                current, cur_tokens = [u], u.tokens
                continue
            # +1 approximates the separator between units
            if current and cur_tokens + u.tokens + 1 > self.size and any(x.heading is None for x in current):
                flush(keep_overlap=True)
                if cur_tokens + u.tokens + 1 > self.size:
                    current, cur_tokens = [], 0
            current.append(u)
            cur_tokens += u.tokens + (1 if len(current) > 1 else 0)
        flush(keep_overlap=False)

        n = len(spans)
        chunks = []
        for i, (s, e, sec, _) in enumerate(spans):
            body = text[s:e]
            page = None
            if doc.page_starts:
                page = bisect.bisect_right(doc.page_starts, s)  # 1-based page number
            chunks.append(Chunk(
                id=point_id(doc.doc_id, i), doc_id=doc.doc_id, chunk_index=i, n_chunks=n, source=doc.source,
                title=doc.title, section=sec, text=body, start=s, end=e, page=page,
                token_count=n_tokens(s, e), hash=content_hash(body), doc_hash=doc.doc_hash,
                record_id=doc.record_id, tags=list(doc.tags), date=doc.date,
            ))
        return chunks


def embedding_text(title: str, section: str, text: str, with_title: bool = True) -> str:
    """What the dense and sparse encoders see for a chunk: its title and section lead the text."""
    head = [p for p in ((title if with_title else ""), section) if p and p not in text[: len(p) + 8]]
    return "\n".join(head + [text]) if head else text


def window_texts(chunker: "Chunker", chunk: dict[str, Any], with_title: bool = True) -> list[str]:
    """What the dense encoder sees for each window of a chunk (rag.dense_window_tokens): the chunk
    cut again by `chunker` (sentence-aligned, as chunks are), each window led by the chunk's title
    and section; a chunk no longer than one window is its own only window."""
    doc = Document(doc_id=chunk["doc_id"], source=chunk["source"], title=chunk["title"], text=chunk["text"])
    pieces = chunker.split(doc)
    if len(pieces) <= 1:
        return [embedding_text(chunk["title"], chunk["section"], chunk["text"], with_title)]
    return [embedding_text(chunk["title"], chunk["section"], w.text, with_title) for w in pieces]
