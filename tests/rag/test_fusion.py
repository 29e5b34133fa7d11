"""Document-level fusion (rag/fusion.py): pure functions, no store."""

from __future__ import annotations

import numpy as np
import pytest

from rag.fusion import dbsf_normalised, fuse_by_document


def test_dbsf_maps_mean_plus_minus_three_sigma_to_the_unit_interval():
    s = [1.0, 2.0, 3.0, 4.0]
    out = dbsf_normalised(s)
    mu, sd = np.mean(s), np.std(s)
    assert out == pytest.approx([(x - (mu - 3 * sd)) / (6 * sd) for x in s])
    assert out[0] < out[-1] and 0 < out[0] and out[-1] < 1
    assert list(dbsf_normalised([7.0, 7.0])) == [0.5, 0.5] and list(dbsf_normalised([3.0])) == [0.5]
    assert dbsf_normalised([]).size == 0


def test_a_document_gets_its_best_chunk_from_each_list():
    # doc A: chunk a1 tops the dense list, chunk a2 tops BM25; doc B's one chunk is second in both.
    dense = [("a1", "A", 0.9), ("b1", "B", 0.8), ("c1", "C", 0.1), ("a2", "A", 0.05)]
    bm25 = [("a2", "A", 12.0), ("b1", "B", 10.0), ("c1", "C", 1.0)]
    fused = fuse_by_document([dense, bm25])
    assert [c.doc_id for c in fused] == ["A", "A", "B", "C"]
    nd, nb = dbsf_normalised([s for *_, s in dense]), dbsf_normalised([s for *_, s in bm25])
    assert fused[0].score == fused[1].score == pytest.approx(nd[0] + nb[0])
    assert fused[2].score == pytest.approx(nd[1] + nb[1])
    # within A, a2 (in both lists) outranks a1 (top of one)
    assert [c.id for c in fused[:2]] == ["a2", "a1"] and fused[0].own == pytest.approx(nd[3] + nb[0])


def test_weights_scale_each_list_and_zero_drops_one():
    dense = [("a", "A", 0.9), ("b", "B", 0.5), ("c", "C", 0.4)]
    bm25 = [("b", "B", 9.0), ("a", "A", 1.0), ("c", "C", 0.5)]
    assert [c.doc_id for c in fuse_by_document([dense, bm25], [1.0, 0.0])] == ["A", "B", "C"]
    assert [c.doc_id for c in fuse_by_document([dense, bm25], [0.0, 1.0])] == ["B", "A", "C"]
    assert fuse_by_document([dense, bm25], [2.0, 2.0])[0].score == pytest.approx(
        2 * fuse_by_document([dense, bm25])[0].score)
    assert fuse_by_document([[], bm25])[0].doc_id == "B"  # an empty list (no BM25 terms) adds nothing


def test_weights_must_match_the_lists():
    with pytest.raises(ValueError, match="2 weights for 3 lists"):
        fuse_by_document([[], [], []], [1.0, 1.0])
