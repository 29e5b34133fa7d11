"""RAG fixtures: settings on a temporary data dir, the shipped MiniLM, small document builders."""

from __future__ import annotations

import io
import zipfile

import pytest

from config import Settings


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    from rag.embedding import embedder_dir

    return embedder_dir(Settings())


@pytest.fixture(scope="session")
def tokenizer(minilm_dir):
    from rag.chunking import load_tokenizer

    return load_tokenizer(minilm_dir)


@pytest.fixture(scope="session")
def dense(minilm_dir):
    from rag.embedding import shared_dense

    return shared_dense(minilm_dir)


@pytest.fixture(scope="session")
def sparse():
    from rag.embedding import SparseEncoder

    return SparseEncoder()


@pytest.fixture
def settings(tmp_path) -> Settings:
    s = Settings(data_dir=tmp_path / "data")
    s.rag.embed_batch_size = 16
    s.rag.embed_call_rows = 16
    s.rag.embed_actors = 2  # the session's 8 logical CPUs are 2 cores: an 8-actor pool would thrash
    s.rag.upsert_batch_size = 16
    s.rag.embed_pool = "warm"  # a job after the first pays no model load (~13 s each, rag/embed_pool.py)
    return s


def make_pdf(pages: list[str], title: str = "") -> bytes:
    """A small valid PDF with one text line per page (Helvetica), built by hand."""
    objs: list[bytes] = []
    n_pages = len(pages)
    page_ids = [4 + 2 * i for i in range(n_pages)]
    objs.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objs.append(b"<< /Type /Pages /Kids [" + b" ".join(b"%d 0 R" % p for p in page_ids) + b"] /Count %d >>" % n_pages)
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for i, text in enumerate(pages):
        safe = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)").encode("latin-1")
        stream = b"BT /F1 12 Tf 72 720 Td (" + safe + b") Tj ET"
        objs.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                    b"/Contents %d 0 R >>" % (page_ids[i] + 1))
        objs.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    info_id = None
    if title:
        objs.append(b"<< /Title (" + title.encode("latin-1") + b") >>")
        info_id = len(objs)
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for i, o in enumerate(objs):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % (i + 1) + o + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1))
    for off in offsets:
        out.write(b"%010d 00000 n \n" % off)
    trailer = b"<< /Size %d /Root 1 0 R" % (len(objs) + 1)
    if info_id:
        trailer += b" /Info %d 0 R" % info_id
    out.write(b"trailer\n" + trailer + b" >>\nstartxref\n%d\n%%%%EOF\n" % xref)
    return out.getvalue()


def make_docx(paragraphs: list[tuple[str, str | None]], title: str = "") -> bytes:
    """A minimal .docx: (text, style) paragraphs, style e.g. 'Heading1' or None."""
    w = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
    body = []
    for text, style in paragraphs:
        ppr = f'<w:pPr><w:pStyle w:val="{style}"/></w:pPr>' if style else ""
        body.append(f"<w:p>{ppr}<w:r><w:t>{text}</w:t></w:r></w:p>")
    doc = f'<?xml version="1.0" encoding="UTF-8"?><w:document xmlns:w="{w}"><w:body>{"".join(body)}</w:body></w:document>'
    core = ('<?xml version="1.0" encoding="UTF-8"?><cp:coreProperties '
            'xmlns:cp="http://schemas.openxmlformats.org/package/2006/metadata/core-properties" '
            f'xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:title>{title}</dc:title></cp:coreProperties>')
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types '
                   'xmlns="http://schemas.openxmlformats.org/package/2006/content-types"/>')
        z.writestr("word/document.xml", doc)
        z.writestr("docProps/core.xml", core)
    return buf.getvalue()


@pytest.fixture(scope="session")
def build_pdf():
    return make_pdf


@pytest.fixture(scope="session")
def build_docx():
    return make_docx
