"""The edge node's process stays light: `orfeas edge serve` (the CLI, the edge app, the node, the
llama.cpp chat engine, ONNX embeddings) imports neither Ray nor PyTorch/transformers. Ray alone was
~40 MB of the edge's resident memory and a share of its start (docs/benchmarks.md, "Edge node")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

HEAVY = ("ray", "torch", "transformers", "sentence_transformers", "presidio_analyzer", "spacy")


def test_the_edge_serve_path_imports_no_ray_and_no_torch():
    code = ("import sys\n"
            "import cluster.cli, cluster.edge_cli, edge.app, edge.node, edge.sync\n"
            "import models.engines.factory, models.engines.local, models.embedders, security.remote_prompts\n"
            "import rag.service, rag.retrieval, rag.chunking, rag.embedding, rag.store, uvicorn\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"the edge's serve path imported {out.stdout.strip()}"
