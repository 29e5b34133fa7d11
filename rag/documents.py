"""Documents and the parsers that turn files into them.

Every parser takes the file's bytes (local disk or object storage alike) and returns documents
whose text is normalised: paragraphs separated by blank lines and headings written as markdown
(`## Heading`), which is what the chunker cuts on. A file that cannot be parsed raises
`ParseError(source, reason)`; callers report it and go on with the rest.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import zipfile
from dataclasses import asdict, dataclass, field
from html.parser import HTMLParser
from pathlib import PurePosixPath
from typing import Any, Callable
from xml.etree import ElementTree

from rag.errors import ParseError

log = logging.getLogger(__name__)

TEXT_FIELDS = ("text", "content", "body", "abstract", "page_content")
TITLE_FIELDS = ("title", "name", "heading")
ID_FIELDS = ("_id", "id", "doc_id", "docid")


@dataclass
class Document:
    doc_id: str
    source: str
    title: str
    text: str
    record_id: str = ""
    tags: list[str] = field(default_factory=list)
    date: str | None = None
    page_starts: list[int] = field(default_factory=list)  # char offset where each page begins (pdf)

    @property
    def doc_hash(self) -> str:
        """Hash of everything that ends up in the chunks: a change here re-indexes the document."""
        h = hashlib.sha256()
        for part in (self.title, self.text, ",".join(self.tags), self.date or "", str(self.page_starts)):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
        return h.hexdigest()[:32]

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["doc_hash"] = self.doc_hash
        return row


def _stem(source: str) -> str:
    return PurePosixPath(source.split("?")[0]).stem or source


def extension(source: str) -> str:
    name = PurePosixPath(source.split("?")[0]).name.lower()
    for ext in (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".tsv", ".html", ".htm", ".pdf", ".docx",
                ".md", ".markdown", ".txt", ".text", ".rst"):
        if name.endswith(ext):
            return ext
    return PurePosixPath(name).suffix


def _decode(source: str, data: bytes) -> str:
    if b"\x00" in data[:8192]:
        raise ParseError(source, "binary content in a text file")
    for enc in ("utf-8-sig", "cp1252"):
        try:
            return data.decode(enc)
        except UnicodeDecodeError:
            continue
    raise ParseError(source, "not valid UTF-8 or cp1252 text")


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


# --- plain text and markdown -------------------------------------------------------------------

def parse_text(source: str, data: bytes, **meta) -> list[Document]:
    text = _clean(_decode(source, data))
    title = _stem(source)
    m = re.search(r"^#{1,6}\s+(.+)$", text, re.M)
    if m and extension(source) in (".md", ".markdown"):
        title = m.group(1).strip()
    return [Document(doc_id=source, source=source, title=title, text=text, **meta)]


# --- html ----------------------------------------------------------------------------------------

_BLOCK = {"p", "div", "section", "article", "br", "li", "tr", "table", "ul", "ol", "blockquote", "pre",
          "header", "footer", "main", "aside", "dd", "dt", "figcaption", "hr"}
_SKIP = {"script", "style", "noscript", "template", "svg", "head", "nav"}


class _HtmlText(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self._skip = 0
        self._in_title = False
        self._heading = 0

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self._in_title = True
        elif tag in _SKIP:
            self._skip += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self._heading = int(tag[1])
            self.parts.append("\n\n" + "#" * self._heading + " ")
        elif tag in _BLOCK:
            self.parts.append("\n\n" if tag != "br" else "\n")

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag in _SKIP:
            self._skip = max(0, self._skip - 1)
        elif re.fullmatch(r"h[1-6]", tag):
            self._heading = 0
            self.parts.append("\n\n")
        elif tag in _BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        elif not self._skip:
            self.parts.append(re.sub(r"\s+", " ", data))


def parse_html(source: str, data: bytes, **meta) -> list[Document]:
    parser = _HtmlText()
    try:
        parser.feed(_decode(source, data))
        parser.close()
    except ParseError:
        raise
    except Exception as e:  # HTMLParser is lenient; anything it still raises is a broken file
        raise ParseError(source, f"unreadable HTML: {e}") from e
    text = _clean("".join(parser.parts))
    text = "\n".join(line.strip() for line in text.split("\n"))
    text = _clean(text)
    if not text:
        raise ParseError(source, "no text in the HTML document")
    title = parser.title.strip()
    if not title:
        m = re.search(r"^#{1,6}\s+(.+)$", text, re.M)
        title = m.group(1).strip() if m else _stem(source)
    return [Document(doc_id=source, source=source, title=title, text=text, **meta)]


# --- pdf -----------------------------------------------------------------------------------------

def parse_pdf(source: str, data: bytes, **meta) -> list[Document]:
    try:
        from pypdf import PdfReader

        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise ParseError(source, "encrypted PDF")
        pages = [_clean(p.extract_text() or "") for p in reader.pages]
        info_title = (reader.metadata.title if reader.metadata else None) or ""
    except ParseError:
        raise
    except Exception as e:
        raise ParseError(source, f"unreadable PDF: {type(e).__name__}: {e}") from e
    text, starts = "", []
    for page in pages:
        if text:
            text += "\n\n"
        starts.append(len(text))
        text += page
    if not text.strip():
        raise ParseError(source, "no extractable text in the PDF (scanned images?)")
    title = str(info_title).strip() or next((ln.strip() for ln in text.split("\n") if ln.strip()), _stem(source))
    return [Document(doc_id=source, source=source, title=title[:300], text=text, page_starts=starts, **meta)]


# --- docx (Office Open XML: read with the standard library) ------------------------------------

_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"


def parse_docx(source: str, data: bytes, **meta) -> list[Document]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            root = ElementTree.fromstring(z.read("word/document.xml"))
            title = ""
            if "docProps/core.xml" in z.namelist():
                core = ElementTree.fromstring(z.read("docProps/core.xml"))
                t = core.find("{http://purl.org/dc/elements/1.1/}title")
                title = (t.text or "").strip() if t is not None else ""
    except (zipfile.BadZipFile, KeyError, ElementTree.ParseError) as e:
        raise ParseError(source, f"unreadable DOCX: {type(e).__name__}: {e}") from e
    paras: list[str] = []
    for p in root.iter(f"{_W}p"):
        words = "".join((t.text or "") for t in p.iter() if t.tag in (f"{_W}t",) or t.tag == f"{_W}tab")
        words = words.strip()
        if not words:
            continue
        style = p.find(f"{_W}pPr/{_W}pStyle")
        sval = style.get(f"{_W}val", "") if style is not None else ""
        m = re.match(r"(?i)heading\s*(\d)", sval)
        if sval.lower() == "title":
            title = title or words
            paras.append("# " + words)
        elif m:
            paras.append("#" * min(6, int(m.group(1))) + " " + words)
        else:
            paras.append(words)
    text = "\n\n".join(paras)
    if not text:
        raise ParseError(source, "no text in the DOCX document")
    return [Document(doc_id=source, source=source, title=title or _stem(source), text=text, **meta)]


# --- records: csv, json, jsonl, parquet ----------------------------------------------------------

def _record_doc(source: str, rec: dict[str, Any], n: int, meta: dict[str, Any]) -> Document | None:
    if not isinstance(rec, dict):
        rec = {"text": str(rec)}
    rid = next((str(rec[k]) for k in ID_FIELDS if rec.get(k) not in (None, "")), str(n))
    title = next((str(rec[k]) for k in TITLE_FIELDS if isinstance(rec.get(k), str)), "")
    text = next((rec[k] for k in TEXT_FIELDS if isinstance(rec.get(k), str) and rec[k].strip()), None)
    if text is None:
        skip = set(ID_FIELDS) | set(TITLE_FIELDS) | {"tags", "date", "metadata"}
        text = "\n".join(f"{k}: {v}" for k, v in rec.items() if k not in skip and v not in (None, ""))
    text = _clean(str(text))
    if not text and not title:
        return None
    tags = rec.get("tags") or meta.get("tags") or []
    if isinstance(tags, str):
        tags = [t.strip() for t in tags.split(",") if t.strip()]
    date = rec.get("date") or meta.get("date")
    return Document(doc_id=f"{source}#{rid}", source=source, title=title or f"{_stem(source)} #{rid}",
                    text=text or title, record_id=rid, tags=[str(t) for t in tags],
                    date=str(date) if date else None)


def _records(source: str, records, meta) -> list[Document]:
    docs = []
    for n, rec in enumerate(records):
        d = _record_doc(source, rec, n, meta)
        if d is not None:
            docs.append(d)
    if not docs:
        raise ParseError(source, "no records with text")
    return docs


def parse_jsonl(source: str, data: bytes, **meta) -> list[Document]:
    text = _decode(source, data)
    recs = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ParseError(source, f"line {i + 1} is not JSON: {e.msg}") from e
    return _records(source, recs, meta)


def parse_json(source: str, data: bytes, **meta) -> list[Document]:
    try:
        obj = json.loads(_decode(source, data))
    except json.JSONDecodeError as e:
        raise ParseError(source, f"not valid JSON: {e.msg} at line {e.lineno}") from e
    if isinstance(obj, dict):
        for key in ("documents", "data", "records", "items"):
            if isinstance(obj.get(key), list):
                obj = obj[key]
                break
    if isinstance(obj, dict):
        if any(isinstance(obj.get(k), str) for k in TEXT_FIELDS):
            d = _record_doc(source, obj, 0, meta)
            d.doc_id = source
            return [d]
        return [Document(doc_id=source, source=source, title=_stem(source),
                         text=json.dumps(obj, indent=1, ensure_ascii=False), **meta)]
    if isinstance(obj, list):
        return _records(source, obj, meta)
    return [Document(doc_id=source, source=source, title=_stem(source), text=str(obj), **meta)]


def parse_csv(source: str, data: bytes, **meta) -> list[Document]:
    text = _decode(source, data)
    delim = "\t" if extension(source) == ".tsv" else ","
    try:
        rows = list(csv.DictReader(io.StringIO(text), delimiter=delim))
    except csv.Error as e:
        raise ParseError(source, f"unreadable CSV: {e}") from e
    return _records(source, rows, meta)


def parse_parquet(source: str, data: bytes, **meta) -> list[Document]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:
        raise ParseError(source, f"unreadable Parquet: {type(e).__name__}: {e}") from e
    return _records(source, table.to_pylist(), meta)


PARSERS: dict[str, Callable[..., list[Document]]] = {
    ".txt": parse_text, ".text": parse_text, ".md": parse_text, ".markdown": parse_text, ".rst": parse_text,
    ".html": parse_html, ".htm": parse_html,
    ".pdf": parse_pdf,
    ".docx": parse_docx,
    ".csv": parse_csv, ".tsv": parse_csv,
    ".json": parse_json,
    ".jsonl": parse_jsonl, ".ndjson": parse_jsonl,
    ".parquet": parse_parquet,
}


def supported(source: str) -> bool:
    return extension(source) in PARSERS


def parse_bytes(source: str, data: bytes, *, tags: list[str] | None = None, date: str | None = None) -> list[Document]:
    """Parse one file's bytes into documents, or raise ParseError with the reason."""
    ext = extension(source)
    parser = PARSERS.get(ext)
    if parser is None:
        raise ParseError(source, f"unsupported file type {ext or '(no extension)'!r}")
    meta: dict[str, Any] = {}
    if tags:
        meta["tags"] = list(tags)
    if date:
        meta["date"] = date
    docs = parser(source, data, **meta)
    return [d for d in docs if d.text.strip()]
