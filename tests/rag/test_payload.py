"""The chunk payload is one model: the stored keys, the state fields, the Ray Data schema, hit
parsing and the passages all come from `rag.payload.ChunkPayload`."""

from __future__ import annotations

from typing import Annotated

import pyarrow as pa
from pydantic import create_model

from rag import ingest, store
from rag.chunking import Chunk, point_id
from rag.packing import Passage, pack_context
from rag.payload import (BOOKKEEPING, PASSAGE_FIELDS, PAYLOAD_FIELDS, STATE, STATE_FIELDS, ChunkPayload,
                         arrow_schema, passage_fields, payload_fields, read_payload, state_fields, view)
from rag.retrieval import RetrievedChunk
from rag.store import Hit

# What collections written before the one model hold: existing collections must keep working.
STORED_KEYS = ["doc_id", "chunk_index", "n_chunks", "source", "root", "title", "section", "text", "start", "end",
               "page", "token_count", "hash", "doc_hash", "record_id", "tags", "date",
               "embedder",  # added later: points without it read as the catalog model's fp32 (rag.embedding)
               "graph",  # added later: points without it add nothing to the knowledge graph (rag/graph.py)
               "second_embedder"]  # added later: points without it hold no e5 vector (rag.second_dense)


def _chunk(**kw) -> Chunk:
    base = dict(id=point_id("d", 0), doc_id="d", chunk_index=0, n_chunks=2, source="/docs/d.md", root="/docs",
                title="T", section="S", text="Some text.", start=4, end=14, page=None, token_count=3, hash="h0",
                doc_hash="dh", record_id="r", tags=["a"], date="2024-01-02T00:00:00Z")
    return Chunk(**{**base, **kw})


def test_the_stored_keys_and_state_fields_are_those_collections_already_hold():
    assert PAYLOAD_FIELDS == STORED_KEYS
    assert sorted(STATE_FIELDS) == sorted(["doc_id", "doc_hash", "n_chunks", "source", "root", "embedder"])
    assert store.STATE_FIELDS is STATE_FIELDS  # what doc_states scrolls
    assert set(_chunk().payload()) == set(STORED_KEYS)  # the chunk's own id is the point's, not the payload's


def test_a_field_added_to_the_model_shows_up_in_every_derived_list():
    bigger = create_model("BiggerPayload", __base__=ChunkPayload, language=(str, ""),
                          revision=(Annotated[int, STATE, BOOKKEEPING], 0))
    assert payload_fields(bigger) == STORED_KEYS + ["language", "revision"]
    schema = arrow_schema(bigger)
    assert schema.field("language").type == pa.string() and schema.field("revision").type == pa.int64()
    assert "language" in passage_fields(bigger) and "revision" not in passage_fields(bigger)
    assert "revision" in state_fields(bigger) and "language" not in state_fields(bigger)
    shown = view(bigger, passage_fields(bigger), "BiggerPassage")
    assert list(shown.model_fields) == passage_fields(bigger)
    assert read_payload({"language": "de", "other": 1}, bigger) == {"language": "de"}


def test_the_consumers_take_their_fields_from_the_model():
    # Ray Data: the rows between the stages carry the payload's columns with the model's types.
    payload_schema = arrow_schema(ChunkPayload)
    for f in payload_schema:
        assert ingest.ROW_SCHEMA.field(f.name).type == f.type
        assert ingest.EMBEDDED_SCHEMA.field(f.name).type == f.type
    assert ingest.EMBEDDED_SCHEMA.field("dense").type == pa.list_(pa.float32())
    assert set(ingest.ROW_SCHEMA.names) - set(PAYLOAD_FIELDS) == {"id", "kind", "embed_text", "window_texts", "error"}
    # Hits carry every payload field; passages the passage fields, with the model's annotations.
    assert set(PAYLOAD_FIELDS) <= set(RetrievedChunk.model_fields)
    assert [f for f in Passage.model_fields if f in ChunkPayload.model_fields] == PASSAGE_FIELDS
    for name in PASSAGE_FIELDS:
        assert Passage.model_fields[name].annotation == ChunkPayload.model_fields[name].annotation
    assert not set(PASSAGE_FIELDS) & {"chunk_index", "n_chunks", "token_count", "hash", "doc_hash", "root"}


def test_a_chunk_goes_through_arrow_the_store_payload_a_hit_and_a_passage_unchanged():
    c = _chunk(page=2)
    row = {**c.model_dump(), "kind": "chunk", "embed_text": "T\nSome text."}
    skipped = {"kind": "skipped", "doc_id": "e", "source": "/docs/e.md", "root": "/docs", "doc_hash": "x"}
    back = pa.Table.from_pylist([row, skipped], schema=ingest.ROW_SCHEMA).to_pylist()
    payload = {k: back[0][k] for k in PAYLOAD_FIELDS}  # what the ingest job upserts
    assert payload == c.payload()
    hit = RetrievedChunk.from_hit(Hit(id=c.id, score=0.5, payload=payload))
    assert hit.payload() == c.payload() and hit.id == c.id
    [p] = pack_context([hit], lambda s: len(s.split()), budget=100)
    assert p.model_dump(include=set(PASSAGE_FIELDS)) == {k: payload[k] for k in PASSAGE_FIELDS}
    assert (p.index, p.chunk_ids, p.tokens) == (1, [c.id], 3)  # the stored token count, not recounted


def test_a_hit_with_some_fields_or_nulls_parses_to_defaults():
    h = RetrievedChunk.from_hit(Hit(id="p", score=1.0, payload={"doc_id": "d", "record_id": "r", "title": None,
                                                                "written_by_someone_else": 1}))
    assert (h.doc_id, h.record_id, h.title, h.text, h.page, h.tags, h.token_count) == ("d", "r", "", "", None, [], 0)
