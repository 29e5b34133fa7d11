"""The collections' data inventory for a privacy impact assessment: which PII types each
collection holds, from a sample of its chunks (text, title, section; decrypted by the store it
is given) scanned with the PII detector (security/pii.py), plus the `pii:<TYPE>` tags ingest
wrote and how many chunks belong to a named data subject (`subject:<id>` tags)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rag.encrypted_store import ENCRYPTED_FIELDS, logical_name
from rag.store import VectorStore


def collection_inventory(store: VectorStore, detector: Any, sample: int = 200,
                         subject_prefix: str = "subject:") -> list[dict[str, Any]]:
    """One row per physical collection: {collection (logical), physical, live (the alias points
    at it), points, sampled, pii {TYPE: chunks}, tagged {TYPE: chunks}, subjects (chunks)}."""
    aliases = store.list_aliases()
    out = []
    for physical in sorted(store.list_collections()):
        logical = logical_name(physical)
        points, _ = store.scroll_points(physical, None, sample, with_vectors=False)
        found: Counter[str] = Counter()
        tagged: Counter[str] = Counter()
        subjects = 0
        for p in points:
            payload = p.get("payload") or {}
            text = "\n".join(str(payload[f]) for f in ENCRYPTED_FIELDS if isinstance(payload.get(f), str))
            found.update({f.entity for f in detector.analyze(text)})
            tags = [t for t in payload.get("tags") or [] if isinstance(t, str)]
            tagged.update({t[4:] for t in tags if t.startswith("pii:")})
            subjects += any(t.startswith(subject_prefix) for t in tags)
        out.append({"collection": logical, "physical": physical, "live": aliases.get(logical) == physical,
                    "points": store.count(physical), "sampled": len(points), "pii": dict(found),
                    "tagged": dict(tagged), "subjects": subjects})
    return out
