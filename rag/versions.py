"""Versioned collections: physical collections `NAME__vN` behind an alias `NAME`.

An ingest without `--rebuild` writes into the version the alias points at (the first ingest
creates v1). `--rebuild` writes a new version and flips the alias only once it is complete, so
queries never see a half-built collection. `rollback` flips the alias back to the previous
version that still exists.
"""

from __future__ import annotations

import re

from pydantic import BaseModel

from rag.errors import CollectionNotFound, RagInvalidRequest
from rag.store import VectorStore, _check_name

SEP = "__v"


class CollectionVersion(BaseModel):
    name: str
    version: int
    collection: str
    points: int
    active: bool


def physical(name: str, version: int) -> str:
    return f"{name}{SEP}{version}"


def parse_physical(collection: str) -> tuple[str, int] | None:
    m = re.fullmatch(rf"(.+){re.escape(SEP)}(\d+)", collection)
    return (m.group(1), int(m.group(2))) if m else None


def check_logical_name(name: str) -> None:
    _check_name(name)
    if SEP in name:
        raise RagInvalidRequest(f"collection name {name!r} must not contain {SEP!r}", "collection")


def version_numbers(store: VectorStore, name: str) -> list[int]:
    out = []
    for c in store.list_collections():
        p = parse_physical(c)
        if p and p[0] == name:
            out.append(p[1])
    return sorted(out)


def list_versions(store: VectorStore, name: str | None = None) -> list[CollectionVersion]:
    aliases = store.list_aliases()
    rows = []
    for c in store.list_collections():
        p = parse_physical(c)
        if not p or (name and p[0] != name):
            continue
        rows.append(CollectionVersion(name=p[0], version=p[1], collection=c, points=store.count(c),
                                      active=aliases.get(p[0]) == c))
    return sorted(rows, key=lambda r: (r.name, r.version))


def ingest_target(store: VectorStore, name: str, dim: int, rebuild: bool,
                  second_dim: int | None = None, windows: bool = False) -> tuple[str, bool]:
    """(physical collection to write, whether to flip the alias to it when the ingest completes)."""
    check_logical_name(name)
    current = store.get_alias(name)
    if current and not store.collection_exists(current):
        current = None
    versions = version_numbers(store, name)
    if current and not rebuild:
        return current, False
    if not current and not rebuild and versions:
        # an earlier first ingest that never finished: resume it
        target = physical(name, versions[-1])
        return target, True
    target = physical(name, (versions[-1] + 1) if versions else 1)
    store.create_collection(target, dim, second_dim, windows=windows)
    return target, True


def rollback(store: VectorStore, name: str, to_version: int | None = None) -> CollectionVersion:
    current = store.get_alias(name)
    if not current:
        raise CollectionNotFound(f"collection {name!r} has no active version", "collection")
    versions = version_numbers(store, name)
    cur_v = parse_physical(current)[1]
    if to_version is None:
        older = [v for v in versions if v < cur_v]
        if not older:
            raise RagInvalidRequest(f"collection {name!r} has no version older than v{cur_v}", "version")
        to_version = older[-1]
    if to_version not in versions:
        raise CollectionNotFound(f"collection {name!r} has no version v{to_version}", "version")
    target = physical(name, to_version)
    store.set_alias(name, target)
    return CollectionVersion(name=name, version=to_version, collection=target, points=store.count(target),
                             active=True)
