"""Token chunking: sizes, sentence and heading boundaries, overlap, positions and hashes."""

from __future__ import annotations

from rag.chunking import Chunker, content_hash, point_id
from rag.documents import Document, parse_bytes


def _doc(text, **kw):
    return Document(doc_id="d", source="s.md", title="T", text=text, **kw)


def test_chunks_respect_size_sentences_and_overlap(tokenizer):
    sents = [f"Sentence number {i} talks about topic {i} in some detail." for i in range(30)]
    doc = _doc(" ".join(sents))
    chunks = Chunker(tokenizer, size=40, overlap=15).split(doc)
    assert len(chunks) > 3
    for c in chunks:
        assert c.token_count <= 40
        assert c.text.startswith("Sentence") and c.text.endswith(".")  # whole sentences only
        assert doc.text[c.start:c.end] == c.text
        assert c.hash == content_hash(c.text) and c.id == point_id("d", c.chunk_index)
        assert c.n_chunks == len(chunks)
    for a, b in zip(chunks, chunks[1:]):
        assert b.start < a.end, "neighbouring chunks share overlap"
        shared = doc.text[b.start:a.end]
        assert len(tokenizer.encode(shared, add_special_tokens=False).ids) <= 15


def test_token_counts_match_tokenising_each_chunk_alone(tokenizer):
    # The chunker tokenises the document once; a chunk of whole sentences must count the tokens
    # the encoder will see for it on its own (accents, punctuation, numbers, a heading, a
    # long sentence, several paragraphs).
    text = ("# Résumé\n\nThe café's 3.5% rise (p<0.05) was \"significant\". Übermäßig? Non!\n\n"
            + " ".join(f"Finding {i}: dose-response at {i * 1.5} mg/kg, n={i * 7}." for i in range(40))
            + "\n\n" + "A run-on clause about proteins, " * 30 + "ends here.")
    chunks = Chunker(tokenizer, size=48, overlap=12).split(_doc(text))
    assert len(chunks) > 5
    whole = [c for c in chunks if c.end <= text.index("A run-on")]  # pieces of the long one may cut a word
    assert len(whole) > 3
    for c in whole:
        assert c.token_count == len(tokenizer.encode(c.text, add_special_tokens=False).ids), c.text


def test_no_overlap_when_zero(tokenizer):
    doc = _doc(" ".join(f"Fact {i} is stated here plainly." for i in range(40)))
    chunks = Chunker(tokenizer, size=32, overlap=0).split(doc)
    for a, b in zip(chunks, chunks[1:]):
        assert b.start >= a.end


def test_headings_start_chunks_and_name_sections(tokenizer):
    (doc,) = parse_bytes("g.md", b"# Guide\n\nIntro text here.\n\n## Install\n\nRun the installer.\n\n## Use\n\nAsk things.")
    chunks = Chunker(tokenizer, size=200, overlap=20).split(doc)
    assert [c.section for c in chunks] == ["Guide", "Install", "Use"]
    assert chunks[1].text.startswith("## Install") and "Intro" not in chunks[1].text


def test_long_sentence_is_split_by_tokens(tokenizer):
    doc = _doc("word " * 300)
    chunks = Chunker(tokenizer, size=64, overlap=8).split(doc)
    assert len(chunks) >= 4 and all(c.token_count <= 64 for c in chunks)


def test_pdf_chunks_carry_pages(tokenizer):
    text = "First page sentence. " * 30 + "\n\n" + "Second page sentence. " * 30
    start2 = text.index("Second")
    doc = _doc(text, page_starts=[0, start2])
    chunks = Chunker(tokenizer, size=50, overlap=0).split(doc)
    assert chunks[0].page == 1 and chunks[-1].page == 2
