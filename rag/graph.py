"""The knowledge graph of a collection: entities and the relations between them, extracted from
each chunk at ingest, and graph-augmented retrieval over them.

Extraction is rule- and statistics-based and works offline (no model):

- **acronyms and codes**: a token with two capitals, or a capital and a digit (`BM25`, `IL-6`,
  `mRNA`, and CamelCase names such as `HAProxy`);
- **names**: runs of capitalised words (`Ray Serve`, `Qdrant Edge`); a lone capitalised word
  that opens a sentence is left out (any word may open one);
- **phrases**: RAKE-style candidates, the runs of content words between stop words, names and
  punctuation, at most the last four words of one, and a longer run's last two (`insulin
  resistance` of "raises insulin resistance"; `hybrid fusion`).

Two entities in one sentence are related by a `co_occurs` edge whose evidence is the chunks it
was seen in. `rag/graph_llm.py` holds the LLM-based extractor: it asks an OpenAI-compatible chat model
for JSON entities and typed relations per chunk (validated with pydantic), adds the rules'
entities, and stores typed edges as `[a, b, relation]`; a bad reply or a down endpoint falls
back to the rules for that chunk, marked `"fallback"` in its payload and counted in the ingest
summary (`graph_fallbacks`). Ingest uses it with `rag.graph.extractor: llm` (`chunk_extractor`);
the extractor's name (`llm-1:<model>`) is in the indexing parameters. Its edges are undirected,
like `co_occurs`.

Each chunk's extraction is stored in its own payload (`graph`, JSON: encrypted with the text
when encryption is on), so a collection version holds its graph with its chunks: erasure and
retention, which delete chunks, take their mentions and evidence with them, and a new version
has a graph of its own. `KnowledgeGraph.build` assembles a version's graph from those payloads
(the RAG replica keeps it per collection version); node and edge statistics (how many chunks
mention an entity) are computed there, over the whole collection.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

from pydantic import BaseModel, Field

RELATION = "co_occurs"
EXTRACTOR = "rules-1"  # in the indexing parameters: a changed extractor re-writes documents on ingest
Kind = Literal["acronym", "name", "phrase"]

# Stop words split phrases (RAKE); a compact English list: function words, and the verbs and
# adverbs that join claims ("is", "shows") rather than name things.
STOP_WORDS = frozenset("""
a about above after again against all also although am among an and another any are as at be
because been before being below between both but by can cannot could did do does doing done down
due during each either else etc even ever every few for from further had has have having he her
here hers herself him himself his how however i if in into is it its itself just least less let
like may me might more most much must my myself near neither no nor not now of off often on once
one only or other others our ours ourselves out over own per rather same several shall she should
show showed shown shows since so some such than that the their theirs them themselves then there
these they this those though through thus to too under until up upon us use used uses using very
via was we were what when where whether which while who whom whose why will with within without
would yet you your yours yourself yourselves whereas therefore hence including include includes
included based associated found find finds well new two three first second many high low higher
lower increased decreased significantly significant result results study studies
""".split())

_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=\S)|\n{2,}")
_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-'][A-Za-z0-9]+)*|\d+(?:\.\d+)?|[^\sA-Za-z0-9]")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-'][A-Za-z0-9]+)*")

MAX_PHRASE_WORDS = 4
MAX_NAME_WORDS = 4
MAX_PER_SENTENCE = 12  # entities of one sentence that get edges (bounds the pairs: 66)


@dataclass(frozen=True)
class Mention:
    key: str   # the normal form: lower case, single spaces
    name: str  # as written
    kind: Kind


def normal(text: str) -> str:
    return " ".join(text.lower().split())


def _is_acronym(tok: str) -> bool:
    caps = sum(c.isupper() for c in tok)
    return 2 <= len(tok) <= 24 and (caps >= 2 or (caps >= 1 and any(c.isdigit() for c in tok))) \
        and not tok.isdigit()


def _is_capitalised(tok: str) -> bool:
    return tok[:1].isupper() and tok[1:].islower() and len(tok) > 1


def _is_name_word(tok: str) -> bool:
    return bool(_WORD.fullmatch(tok)) and (_is_capitalised(tok) or _is_acronym(tok)) and tok.lower() not in STOP_WORDS


def sentences(text: str) -> list[str]:
    return [s for s in (p.strip() for p in _SENT_END.split(text)) if s]


def sentence_mentions(sentence: str) -> list[Mention]:
    """The entities of one sentence, in order of first appearance, each once."""
    toks = _TOKEN.findall(sentence)
    out: dict[str, Mention] = {}

    def add(words: list[str], kind: Kind) -> None:
        name = " ".join(words)
        key = normal(name)
        if key and key not in out and not (kind != "acronym" and key in STOP_WORDS):
            out[key] = Mention(key, name, kind)

    # names and acronyms: runs of capitalised words and acronyms
    i = 0
    while i < len(toks):
        j = i
        while j < len(toks) and j - i < MAX_NAME_WORDS and _is_name_word(toks[j]):
            j += 1
        if j == i:
            i += 1
            continue
        run = toks[i:j]
        if len(run) > 1:
            add(run, "name")
        if len(run) == 1 and not _is_acronym(run[0]) and i > 0:
            add(run, "name")  # a lone capitalised word opening the sentence is left out: any word may
        for w in run:  # an acronym is an entity of its own, in a name too ("BM25" of "Qdrant BM25")
            if _is_acronym(w):
                add([w], "acronym")
        i = j
    # phrases: runs of content words between stop words and punctuation (RAKE)
    # (a name breaks a run: it is an entity already; a run too long keeps its last words, the
    # head of an English noun phrase: "a scalable model serving library")
    run: list[str] = []
    for n, t in enumerate([*toks, "."]):
        if _WORD.fullmatch(t) and t.lower() not in STOP_WORDS and len(t) > 1 and \
                not (n > 0 and _is_capitalised(t)):
            run.append(t)
            continue
        if len(run) >= 2:
            add(run[-MAX_PHRASE_WORDS:], "phrase")
        if len(run) >= 3:  # and its last two words: a verb may open the run ("raises insulin resistance")
            add(run[-2:], "phrase")
        run = []
    return list(out.values())


def extract(text: str) -> dict[str, Any]:
    """One chunk's entities and relations, as stored in its payload's `graph` field (compact:
    `e` the entities `[key, name, kind]`, `r` the co-occurring pairs as indices into `e`)."""
    index: dict[str, int] = {}
    entities: list[list[str]] = []
    pairs: set[tuple[int, int]] = set()
    for s in sentences(text):
        ids = []
        for m in sentence_mentions(s):
            if m.key not in index:
                index[m.key] = len(entities)
                entities.append([m.key, m.name, m.kind])
            ids.append(index[m.key])
        ids = ids[:MAX_PER_SENTENCE]
        pairs.update((min(a, b), max(a, b)) for n, a in enumerate(ids) for b in ids[n + 1:] if a != b)
    return {"e": entities, "r": [list(p) for p in sorted(pairs)]}


def extract_json(text: str) -> str:
    return json.dumps(extract(text), separators=(",", ":"))


def query_keys(query: str, max_words: int = MAX_PHRASE_WORDS) -> list[str]:
    """What a question may name: its extracted entities, and every run of one to `max_words`
    words not starting or ending in a stop word (a lower-case question names no capitalised
    entity, yet may hold a graph node's key)."""
    keys = {m.key for s in sentences(query) for m in sentence_mentions(s)}
    words = [w.lower() for w in _WORD.findall(query)]
    for n in range(1, max_words + 1):
        for i in range(len(words) - n + 1):
            gram = words[i:i + n]
            if gram[0] not in STOP_WORDS and gram[-1] not in STOP_WORDS and len(gram[0]) > 1:
                keys.add(" ".join(gram))
    return sorted(keys)


# --- the assembled graph ------------------------------------------------------------------------

@dataclass(slots=True)  # slots: a whole corpus's graph holds ~10^5 nodes and ~10^6 edges
class Node:
    key: str
    name: str
    kind: str
    mentions: set[str] = field(default_factory=set)  # chunk (point) ids
    names: Counter = field(default_factory=Counter)


@dataclass(slots=True)
class Edge:
    a: str
    b: str
    type: str = RELATION
    evidence: set[str] = field(default_factory=set)  # chunk (point) ids


class KnowledgeGraph:
    """A collection version's graph: nodes keyed by normal form, with the chunks that mention
    them, and typed edges with the chunks they were seen in."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.edges: dict[tuple[str, str], Edge] = {}
        self.adj: dict[str, set[str]] = {}
        self.doc_of: dict[str, str] = {}  # chunk id -> its document's id
        self.doc_chunks: Counter = Counter()  # document id -> its chunks
        self.chunks = 0

    @classmethod
    def build(cls, chunks: Iterable[tuple[str, str, str | dict[str, Any] | None]]) -> "KnowledgeGraph":
        """From (chunk id, document id, the chunk's `graph` payload) triples; a chunk without one
        (written before extraction, or with it off) adds nothing."""
        g = cls()
        for chunk_id, doc_id, stored in chunks:
            g.chunks += 1
            g.doc_of[chunk_id] = doc_id
            g.doc_chunks[doc_id] += 1
            if not stored:
                continue
            data = json.loads(stored) if isinstance(stored, str) else stored
            ents = data.get("e") or []
            for key, name, kind in ents:
                n = g.nodes.get(key)
                if n is None:
                    n = g.nodes[key] = Node(key, name, kind)
                n.mentions.add(chunk_id)
                n.names[name] += 1
            for rel in data.get("r") or []:
                a, b = rel[0], rel[1]
                ka, kb = sorted((ents[a][0], ents[b][0]))
                e = g.edges.get((ka, kb))
                if e is None:
                    e = g.edges[(ka, kb)] = Edge(ka, kb, rel[2] if len(rel) > 2 else RELATION)
                    g.adj.setdefault(ka, set()).add(kb)
                    g.adj.setdefault(kb, set()).add(ka)
                elif len(rel) > 2 and e.type == RELATION:
                    e.type = rel[2]
                e.evidence.add(chunk_id)
        for n in g.nodes.values():  # the name most often written; an acronym beats a name for its kind
            n.name = n.names.most_common(1)[0][0]
        return g

    # --- reading
    def edge(self, a: str, b: str) -> Edge | None:
        return self.edges.get((a, b) if a <= b else (b, a))

    def find(self, entity: str) -> Node | None:
        return self.nodes.get(normal(entity))

    def top_entities(self, limit: int, prefix: str = "") -> list[Node]:
        p = normal(prefix)
        pool = (n for n in self.nodes.values() if not p or n.key.startswith(p) or f" {p}" in n.key)
        return sorted(pool, key=lambda n: (-len(n.mentions), n.key))[:limit]

    def neighbours(self, key: str, limit: int) -> list[tuple[Node, Edge]]:
        """The entity's neighbours, strongest relation (most evidence) first."""
        out = [(self.nodes[k], self.edge(key, k)) for k in self.adj.get(key, ())]
        return sorted(out, key=lambda ne: (-len(ne[1].evidence), ne[0].key))[:limit]

    def path(self, a: str, b: str, max_hops: int = 6) -> list[str] | None:
        """A shortest path of entity keys from `a` to `b` (breadth first), or None."""
        if a not in self.nodes or b not in self.nodes:
            return None
        prev: dict[str, str | None] = {a: None}
        todo = deque([(a, 0)])
        while todo:
            k, d = todo.popleft()
            if k == b:
                out = [k]
                while prev[out[-1]] is not None:
                    out.append(prev[out[-1]])  # type: ignore[arg-type]
                return out[::-1]
            if d >= max_hops:
                continue
            for n in sorted(self.adj.get(k, ())):
                if n not in prev:
                    prev[n] = k
                    todo.append((n, d + 1))
        return None

    # --- retrieval
    def idf(self, node: Node) -> float:
        return math.log(1 + self.chunks / len(node.mentions))

    def seeds(self, query: str, max_df: float) -> list[Node]:
        """The graph's entities the question names, leaving out those so common (mentioned by more
        than `max_df` of the chunks) that they say nothing."""
        most = max(1.0, max_df * self.chunks)
        return [self.nodes[k] for k in query_keys(query) if k in self.nodes and len(self.nodes[k].mentions) <= most]

    def rank_chunks(self, query: str, *, neighbours: int, hop_weight: float, max_df: float,
                    limit: int) -> tuple[list[str], list[str]]:
        """Chunks ranked by the question's entities: each seed's chunks score its idf; the
        chunks that mention its `neighbours` strongest neighbours score `hop_weight` times the
        neighbour's idf (the evidence chunks of the relation itself count as the seed's).
        Returns (chunk ids best first, the seed keys)."""
        seeds = self.seeds(query, max_df)
        # a seed inside a longer seed ("ray" in "ray serve") is the longer one's: count it once
        keys = {s.key for s in seeds}
        seeds = [s for s in seeds if not any(s.key != k and f" {s.key} " in f" {k} " for k in keys)]
        score: Counter = Counter()
        for s in seeds:
            w = self.idf(s)
            for c in s.mentions:
                score[c] += w
            if hop_weight > 0:
                for n, _ in self.neighbours(s.key, neighbours):
                    if len(n.mentions) > max(1.0, max_df * self.chunks):
                        continue
                    w2 = hop_weight * self.idf(n)
                    for c in n.mentions:
                        score[c] += w2
        ranked = sorted(score, key=lambda c: (-score[c], c))[:limit]
        return ranked, [s.key for s in seeds]


class GraphCache:
    """The assembled graph of each physical collection, for the collection version it was built
    from (VectorStore.collection_version: a write makes the next request build it again)."""

    def __init__(self, store: Any, keep: int = 4):
        self.store, self.keep = store, keep
        self._graphs: dict[str, tuple[str, KnowledgeGraph]] = {}
        self._lock = threading.Lock()

    def get(self, physical: str) -> KnowledgeGraph:
        from rag.chunking import point_id

        version = self.store.collection_version(physical)
        with self._lock:  # one build at a time: a second request for it waits and reuses it
            have = self._graphs.get(physical)
            if have is not None and have[0] == version:
                return have[1]
            rows = self.store.scroll_payloads(physical, ["doc_id", "chunk_index", "graph"])
            g = KnowledgeGraph.build((point_id(p["doc_id"], int(p.get("chunk_index") or 0)), p["doc_id"],
                                      p.get("graph")) for p in rows)
            self._graphs[physical] = (version, g)
            while len(self._graphs) > self.keep:
                self._graphs.pop(next(iter(self._graphs)))
            return g


def rrf(lists: list[list[str]], weights: list[float], k: int) -> list[tuple[str, float]]:
    """Reciprocal-rank fusion of ranked id lists: sum of weight / (k + rank), rank from 1."""
    score: dict[str, float] = {}
    for ids, w in zip(lists, weights):
        for r, i in enumerate(ids, start=1):
            score[i] = score.get(i, 0.0) + w / (k + r)
    return sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))


# --- the console's view: GET /v1/rag/collections/{name}/graph ------------------------------------

EVIDENCE_SHOWN = 20  # chunk ids listed per entity or relation (the count says how many there are)


class GraphEntity(BaseModel):
    key: str = Field(description="The normal form (lower case): what `entity` and `to` take.")
    name: str = Field(description="As most often written.")
    kind: Literal["acronym", "name", "phrase"]
    mentions: int = Field(description="Chunks that mention it.")
    chunks: list[str] = Field(description=f"Point ids of chunks that mention it (at most {EVIDENCE_SHOWN}).")


class GraphRelation(BaseModel):
    source: str
    target: str
    type: Literal["co_occurs"] = RELATION
    weight: int = Field(description="Chunks it was seen in (its evidence).")
    evidence: list[str] = Field(description=f"Point ids of those chunks (at most {EVIDENCE_SHOWN}).")


class GraphStats(BaseModel):
    chunks: int
    entities: int
    relations: int


class GraphView(BaseModel):
    """The entities of a collection version's knowledge graph; with `entity`, it and its
    neighbours; with `entity` and `to`, a shortest path between the two."""

    object: Literal["rag.graph"] = "rag.graph"
    collection: str
    resolved_collection: str = Field(description="The physical collection (version) the graph is of.")
    stats: GraphStats
    entities: list[GraphEntity]
    relations: list[GraphRelation] = Field(default_factory=list)
    path: list[str] | None = Field(None, description="With `to`: the entity keys from `entity` to `to`, or null "
                                   "when none joins them within 6 hops.")


def _entity(n: Node) -> GraphEntity:
    return GraphEntity(key=n.key, name=n.name, kind=n.kind, mentions=len(n.mentions),  # type: ignore[arg-type]
                       chunks=sorted(n.mentions)[:EVIDENCE_SHOWN])


def _relation(e: Edge, source: str) -> GraphRelation:
    return GraphRelation(source=source, target=e.b if source == e.a else e.a, weight=len(e.evidence),
                         evidence=sorted(e.evidence)[:EVIDENCE_SHOWN])


def graph_view(kg: KnowledgeGraph, collection: str, physical: str, *, entity: str | None = None,
               to: str | None = None, prefix: str = "", limit: int = 25) -> GraphView:
    from models.errors import InvalidRequest, NotFound

    stats = GraphStats(chunks=kg.chunks, entities=len(kg.nodes), relations=len(kg.edges))
    base = {"collection": collection, "resolved_collection": physical, "stats": stats}
    if to is not None and entity is None:
        raise InvalidRequest("`to` asks for a path: name the entity it starts from too (`entity`)", "entity")
    if entity is None:
        return GraphView(**base, entities=[_entity(n) for n in kg.top_entities(limit, prefix)])
    found = kg.find(entity)
    if found is None:
        raise NotFound(f"collection {collection!r} has no entity {entity!r} in its graph", "entity")
    if to is None:
        near = kg.neighbours(found.key, limit)
        return GraphView(**base, entities=[_entity(found)] + [_entity(n) for n, _ in near],
                         relations=[_relation(e, found.key) for _, e in near])
    end = kg.find(to)
    if end is None:
        raise NotFound(f"collection {collection!r} has no entity {to!r} in its graph", "to")
    path = kg.path(found.key, end.key)
    if path is None:
        return GraphView(**base, entities=[_entity(found), _entity(end)], path=None)
    return GraphView(**base, entities=[_entity(kg.nodes[k]) for k in path], path=path,
                     relations=[_relation(kg.edge(a, b), a) for a, b in zip(path, path[1:])])  # type: ignore[arg-type]
