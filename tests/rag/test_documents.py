"""Parsers for every supported format, and a broken file reported with its reason."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rag.documents import parse_bytes
from rag.errors import ParseError


def test_text_and_markdown():
    (d,) = parse_bytes("notes/plain.txt", b"Line one.\r\n\r\n\r\nLine two.")
    assert d.title == "plain" and d.text == "Line one.\n\nLine two." and d.doc_id == "notes/plain.txt"
    (m,) = parse_bytes("guide.md", b"intro\n\n# The Guide\n\nBody text.")
    assert m.title == "The Guide" and "# The Guide" in m.text


def test_html_keeps_headings_and_drops_scripts():
    html = (b"<html><head><title>Page T</title><script>var x=1;</script></head><body><nav>menu</nav>"
            b"<h1>Main</h1><p>First &amp; second.</p><h2>Sub</h2><p>Third.</p></body></html>")
    (d,) = parse_bytes("p.html", html)
    assert d.title == "Page T"
    assert "# Main" in d.text and "## Sub" in d.text and "First & second." in d.text
    assert "var x" not in d.text and "menu" not in d.text


def test_pdf_pages(build_pdf):
    (d,) = parse_bytes("r.pdf", build_pdf(["Page one talks about ducks.", "Page two talks about geese."], title="Birds"))
    assert d.title == "Birds"
    assert "ducks" in d.text and "geese" in d.text
    assert len(d.page_starts) == 2 and d.text[d.page_starts[1]:].startswith("Page two")


def test_docx_headings_and_title(build_docx):
    data = build_docx([("Report", "Title"), ("Scope", "Heading1"), ("We measured things.", None)], title="")
    (d,) = parse_bytes("r.docx", data)
    assert d.title == "Report"
    assert "# Scope" in d.text and "We measured things." in d.text


def test_records_csv_json_jsonl_parquet():
    csv_docs = parse_bytes("t.csv", b"id,title,text,tags\n7,Seven,The seventh row.,\"a,b\"\n8,Eight,Row eight.,\n")
    assert [d.doc_id for d in csv_docs] == ["t.csv#7", "t.csv#8"]
    assert csv_docs[0].tags == ["a", "b"] and csv_docs[0].title == "Seven"

    beir = b'{"_id": "4983", "title": "Microstructural development", "text": "Alterations of the architecture.", "metadata": {}}\n'
    (b,) = parse_bytes("corpus.jsonl", beir)
    assert b.record_id == "4983" and b.doc_id == "corpus.jsonl#4983" and b.title == "Microstructural development"

    js = json.dumps([{"id": 1, "content": "One."}, {"id": 2, "content": "Two.", "date": "2024-05-01"}]).encode()
    docs = parse_bytes("x.json", js)
    assert [d.text for d in docs] == ["One.", "Two."] and docs[1].date == "2024-05-01"
    (single,) = parse_bytes("y.json", json.dumps({"title": "T", "text": "Only one."}).encode())
    assert single.doc_id == "y.json" and single.text == "Only one."

    buf = io.BytesIO()
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["Alpha text.", "Beta text."]}), buf)
    pdocs = parse_bytes("z.parquet", buf.getvalue())
    assert [d.doc_id for d in pdocs] == ["z.parquet#a", "z.parquet#b"]


@pytest.mark.parametrize("name,data,reason", [
    ("broken.pdf", b"%PDF-1.4 this is not a pdf", "unreadable PDF"),
    ("broken.docx", b"PK not a zip", "unreadable DOCX"),
    ("broken.json", b"{not json", "not valid JSON"),
    ("broken.jsonl", b'{"a": 1}\n{oops\n', "line 2 is not JSON"),
    ("bin.txt", b"\x00\x01\x02binary", "binary content"),
    ("image.png", b"\x89PNG", "unsupported file type"),
])
def test_broken_files_raise_parse_error_with_reason(name, data, reason):
    with pytest.raises(ParseError) as e:
        parse_bytes(name, data)
    assert e.value.source == name and reason in e.value.reason
