"""The knowledge graph (rag/graph.py): the offline extractor, the assembled graph (neighbours,
paths, the console's view), graph ranking and RRF, and graph-augmented retrieval on a real
Qdrant Edge store with the shipped MiniLM (no Ray)."""

from __future__ import annotations

import json

import pytest

from models.errors import InvalidRequest, NotFound
from rag.graph import KnowledgeGraph, extract, extract_json, graph_view, query_keys, rrf, sentence_mentions


def keys(text):
    return [e[0] for e in extract(text)["e"]]


def test_acronyms_names_and_phrases_are_extracted():
    got = {m.key: m.kind for m in sentence_mentions(
        "Today, Qdrant Edge stores BM25 vectors, and IL-6 raises insulin resistance in obese mice.")}
    assert got["qdrant edge"] == "name" and got["bm25"] == "acronym" and got["il-6"] == "acronym"
    assert got["insulin resistance"] == "phrase" and got["obese mice"] == "phrase"
    assert "today" not in got  # a lone capitalised word opening a sentence: any word may
    assert not {"and", "in", "the"} & set(got)


def test_a_lone_capitalised_word_inside_a_sentence_is_a_name_and_stop_words_are_not():
    got = {m.key: m.kind for m in sentence_mentions("The cluster runs on Kubernetes with The autoscaler.")}
    assert got.get("kubernetes") == "name" and "the" not in got


def test_co_occurrence_edges_join_entities_of_one_sentence_only():
    data = extract("Ray Serve hosts the ORFEAS gateway. KubeRay runs on Kubernetes.")
    names = [e[0] for e in data["e"]]
    pairs = {tuple(sorted((names[a], names[b]))) for a, b in data["r"]}
    assert ("orfeas", "ray serve") in pairs and ("kuberay", "kubernetes") in pairs
    assert not any({"ray serve", "kuberay"} == set(p) for p in pairs)  # different sentences
    assert json.loads(extract_json("Ray Serve hosts the ORFEAS gateway.")) == extract(
        "Ray Serve hosts the ORFEAS gateway.")
    assert extract("") == {"e": [], "r": []}


def test_a_lower_case_question_still_names_the_graphs_phrases():
    assert {"vector store", "orfeas", "hybrid fusion"} <= set(query_keys("which vector store does orfeas use "
                                                                         "for hybrid fusion?"))


CHUNKS = {
    "c1": ("d1", "Ray Serve hosts the ORFEAS gateway."),
    "c2": ("d2", "The ORFEAS gateway uses Qdrant Edge for hybrid fusion."),
    "c3": ("d3", "Qdrant Edge stores BM25 sparse vectors."),
    "c4": ("d4", "KubeRay runs Ray clusters on Kubernetes."),
}


def graph():
    return KnowledgeGraph.build((c, d, extract_json(t)) for c, (d, t) in CHUNKS.items())


def test_the_graph_keeps_mentions_and_evidence_and_finds_neighbours_and_paths():
    g = graph()
    assert g.chunks == 4 and g.nodes["orfeas"].mentions == {"c1", "c2"} and g.nodes["orfeas"].name == "ORFEAS"
    assert g.edge("qdrant edge", "orfeas").evidence == {"c2"} and g.edge("orfeas", "qdrant edge").type == "co_occurs"
    assert {n.key for n, _ in g.neighbours("qdrant edge", 10)} >= {"orfeas", "bm25"}
    assert g.path("ray serve", "bm25") == ["ray serve", "orfeas", "qdrant edge", "bm25"]
    assert g.path("ray serve", "kuberay") is None and g.path("ray serve", "nowhere") is None
    assert KnowledgeGraph.build([("c9", "d9", None), ("c8", "d8", "")]).nodes == {}  # chunks without extraction


def test_graph_ranking_seeds_from_the_question_and_expands_to_neighbours():
    g = graph()
    ranked, seeds = g.rank_chunks("What does the orfeas gateway use?", neighbours=0, hop_weight=0, max_df=1,
                                  limit=10)
    assert "orfeas gateway" in seeds and set(ranked) == {"c1", "c2"}
    ranked, _ = g.rank_chunks("Qdrant Edge?", neighbours=5, hop_weight=0.3, max_df=1, limit=10)
    assert ranked[:2] in (["c2", "c3"], ["c3", "c2"]) and "c1" in ranked  # c1: ORFEAS, a neighbour of Qdrant Edge
    assert "c4" not in ranked
    # an entity in more than max_df of the chunks says nothing: no seed
    assert g.rank_chunks("orfeas", neighbours=0, hop_weight=0, max_df=0.25, limit=10) == ([], [])


def test_rrf_sums_weighted_reciprocal_ranks():
    fused = dict(rrf([["a", "b"], ["b", "c"]], [1.0, 0.5], 60))
    assert fused["b"] == pytest.approx(1 / 62 + 0.5 / 61) and fused["a"] == pytest.approx(1 / 61)
    assert [i for i, _ in rrf([["a", "b"], ["b", "c"]], [1.0, 0.5], 60)] == ["b", "a", "c"]


def test_the_console_view_lists_entities_neighbours_and_paths_with_clear_errors():
    g = graph()
    top = graph_view(g, "docs", "docs__v1", limit=3)
    assert top.stats.entities == len(g.nodes) and len(top.entities) == 3 and top.entities[0].mentions >= 2
    assert [e.key for e in graph_view(g, "docs", "docs__v1", prefix="qdr").entities] == ["qdrant edge"]
    near = graph_view(g, "docs", "docs__v1", entity="Qdrant Edge")
    assert near.entities[0].key == "qdrant edge" and {r.target for r in near.relations} >= {"orfeas", "bm25"}
    assert all(r.source == "qdrant edge" and r.evidence for r in near.relations)
    path = graph_view(g, "docs", "docs__v1", entity="Ray Serve", to="BM25")
    assert path.path == ["ray serve", "orfeas", "qdrant edge", "bm25"] and len(path.relations) == 3
    assert graph_view(g, "docs", "docs__v1", entity="ray serve", to="kuberay").path is None
    with pytest.raises(NotFound, match="no entity 'nope'"):
        graph_view(g, "docs", "docs__v1", entity="nope")
    with pytest.raises(InvalidRequest):
        graph_view(g, "docs", "docs__v1", to="bm25")


# --------------------------------------------------------------------- retrieval on a real store

TEXTS = ["The Flamingo Protocol rotates API keys every ninety days.",
         "Qdrant stores dense and sparse vectors for hybrid search.",
         "KubeRay runs Ray clusters on Kubernetes.",
         "The Flamingo Protocol was drafted in Berlin by the platform team.",
         "Berlin is the capital of Germany."]


@pytest.fixture(scope="module")
def index(tmp_path_factory, dense, sparse):
    from config import Settings
    from rag.chunking import point_id
    from rag.store import EdgeStore

    root = tmp_path_factory.mktemp("graph")
    store = EdgeStore(root / "edge")
    store.create_collection("kb__v1", 384)
    dv, sv = dense.embed(TEXTS), sparse.embed_documents(TEXTS)
    store.upsert("kb__v1", [{"id": point_id(f"d{i}", 0), "dense": dv[i].tolist(), "sparse_indices": sv[i].indices,
                             "sparse_values": sv[i].values,
                             "payload": {"text": t, "doc_id": f"d{i}", "chunk_index": 0, "source": f"d{i}.txt",
                                         "graph": extract_json(t)}} for i, t in enumerate(TEXTS)])
    store.set_alias("kb", "kb__v1")
    settings = Settings(data_dir=root / "data")
    settings.rag.collection = "kb"
    settings.rag.graph.max_df = 0.5
    yield settings, store
    store.close()


def test_graph_augmented_retrieval_fuses_chunks_the_search_missed_and_keeps_the_filters(index, dense, sparse):
    from rag.chunking import point_id
    from rag.retrieval import Retriever
    from rag.store import PayloadFilter

    settings, store = index
    r = Retriever(settings, store, dense=dense, sparse=sparse)
    question = "How often does the Flamingo Protocol rotate keys?"
    plain, diag = r.retrieve(question, top_k=1, mode="dense")
    assert diag.graph is None and plain[0].doc_id == "d0"  # rag.graph.retrieval is off by default
    chunks, diag = r.retrieve(question, top_k=1, mode="dense", graph=True)
    assert "flamingo protocol" in diag.graph.entities and diag.graph.ranked == 2
    assert diag.graph.added == 1 and chunks[0].doc_id == "d0"  # d3 fetched by its documents' search
    both, _ = r.retrieve(question, top_k=2, mode="dense", graph=True)
    assert [c.doc_id for c in both] == ["d0", "d3"]
    kept, diag = r.retrieve(question, top_k=2, mode="dense", graph=True, filters=PayloadFilter(doc_ids=["d0", "d1"]))
    assert "d3" not in [c.doc_id for c in kept] and diag.graph.added == 0  # the caller's filter still applies
    # a write is a new collection version: the next request builds the graph again
    text = "The Flamingo Protocol names Zanzibar Station as its archive."
    store.upsert("kb__v1", [{"id": point_id("d5", 0), "dense": dense.embed([text])[0].tolist(),
                             "sparse_indices": [], "sparse_values": [],
                             "payload": {"text": text, "doc_id": "d5", "chunk_index": 0, "graph": extract_json(text)}}])
    _, diag = r.retrieve("Where is Zanzibar Station?", top_k=3, mode="dense", graph=True)
    assert "zanzibar station" in diag.graph.entities
