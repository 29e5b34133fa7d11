"""The chunk payload: what every stored point carries, defined once.

`ChunkPayload` is the one model. Everything else that names payload fields derives from it:

- `payload_fields()`: the keys the ingest job writes into each Qdrant point's payload;
- `state_fields()`: the fields marked `STATE`, which ingest reads back (`VectorStore.doc_states`)
  to tell whether a document is stored whole and current;
- `passage_fields()`: the fields a packed passage shows (all but those marked `BOOKKEEPING`);
- `view(model, fields, name)`: a model holding some of the payload's fields, with their types
  and defaults (the passage's fields);
- `read_payload()`: a stored payload (perhaps only some fields of it) as model field values;
- `arrow_schema(model)`: the pyarrow schema of a model's fields (the Ray Data rows of the
  ingest pipeline), from the field annotations.

Adding a field here adds it to the stored payload, the Ray Data rows, the retrieved chunks and
(unless marked `BOOKKEEPING`) the passages. Every field has a default so that a payload read
with only some of its fields still parses; the chunker always sets them all. Rows in the Ray
Data stream stay plain dicts: no per-row validation there, the model only gives their columns.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, create_model


@dataclass(frozen=True)
class Role:
    """A marker in a payload field's annotation: which derived lists the field belongs to."""

    name: str


STATE = Role("state")
"""Read back by ingest to decide whether a document is stored whole and current."""
BOOKKEEPING = Role("bookkeeping")
"""Kept for indexing (a chunk's place, size and content hash; the indexed version and root of its
document); a passage, which may merge several chunks and is shown to clients, leaves it out."""


class ChunkPayload(BaseModel):
    """One chunk's stored payload. The keys are those existing collections hold: keep them."""

    doc_id: Annotated[str, STATE] = ""
    chunk_index: Annotated[int, BOOKKEEPING] = 0
    n_chunks: Annotated[int, STATE, BOOKKEEPING] = 0       # chunks of the document
    source: Annotated[str, STATE] = ""                    # the file (path or URI) the document came from
    root: Annotated[str, STATE, BOOKKEEPING] = ""          # the ingest source root: scopes deletions
    title: str = ""
    section: str = ""                                      # the heading the chunk is under
    text: str = ""
    start: int = 0                                         # character offsets into the document's text
    end: int = 0
    page: int | None = None                                # 1-based, for PDFs
    token_count: Annotated[int, BOOKKEEPING] = 0           # the text's tokens (the embedding model's tokenizer)
    hash: Annotated[str, BOOKKEEPING] = ""                 # content hash of the text
    doc_hash: Annotated[str, STATE, BOOKKEEPING] = ""      # the document's hash with the indexing parameters
    record_id: str = ""                                    # the record's own id (jsonl/csv/parquet rows)
    tags: list[str] = Field(default_factory=list)
    date: str | None = None                                # ISO 8601, UTC
    embedder: Annotated[str, STATE, BOOKKEEPING] = ""      # model/variant that wrote the vector ("" = .../fp32)
    graph: Annotated[str, BOOKKEEPING] = ""                # the chunk's entities and relations (rag/graph.py), JSON
    second_embedder: Annotated[str, BOOKKEEPING] = ""      # model/precision of the e5 vector ("" = none: rag.second_dense)

    def payload(self) -> dict[str, Any]:
        """The stored payload: the payload fields only (a subclass's own fields left out)."""
        return self.model_dump(include=_PAYLOAD_KEYS)


def payload_fields(model: type[BaseModel] = ChunkPayload) -> list[str]:
    return list(model.model_fields)


def fields_with(role: Role, model: type[BaseModel] = ChunkPayload) -> list[str]:
    return [n for n, f in model.model_fields.items() if role in f.metadata]


def state_fields(model: type[BaseModel] = ChunkPayload) -> list[str]:
    return fields_with(STATE, model)


def passage_fields(model: type[BaseModel] = ChunkPayload) -> list[str]:
    return [n for n, f in model.model_fields.items() if BOOKKEEPING not in f.metadata]


def view(model: type[BaseModel], fields: list[str], name: str) -> type[BaseModel]:
    """A model with these fields of `model` (same types, defaults and markers), to subclass."""
    return create_model(name, **{n: (model.model_fields[n].annotation, model.model_fields[n]) for n in fields})


def read_payload(payload: dict[str, Any], model: type[BaseModel] = ChunkPayload) -> dict[str, Any]:
    """A stored payload's values for the model's fields: unknown keys dropped, missing or null
    values left to the field defaults (a search may ask for only some fields)."""
    return {n: payload[n] for n in model.model_fields if payload.get(n) is not None}


PAYLOAD_FIELDS = payload_fields()
STATE_FIELDS = state_fields()
PASSAGE_FIELDS = passage_fields()
_PAYLOAD_KEYS = set(PAYLOAD_FIELDS)


# --- pyarrow ------------------------------------------------------------------------------------

def arrow_type(annotation: Any):
    """The pyarrow type of a field annotation: str, int (int64), float (float32: vector
    components, as the store keeps them), bool, list[...], Literal[str, ...] and X | None."""
    import pyarrow as pa

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return arrow_type(args[0])
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"no arrow type for the union {annotation!r}")
        return arrow_type(rest[0])  # arrow fields are nullable
    if origin is list:
        return pa.list_(arrow_type(args[0]))
    if origin is Literal:
        if all(isinstance(a, str) for a in args):
            return pa.string()
        raise TypeError(f"no arrow type for {annotation!r}")
    scalars = {str: pa.string(), int: pa.int64(), float: pa.float32(), bool: pa.bool_()}
    if annotation in scalars:
        return scalars[annotation]
    raise TypeError(f"no arrow type for {annotation!r}")


def arrow_schema(model: type[BaseModel]):
    """The pyarrow schema of a model's fields, in field order (every field nullable)."""
    import pyarrow as pa

    return pa.schema([pa.field(n, arrow_type(f.annotation)) for n, f in model.model_fields.items()])
