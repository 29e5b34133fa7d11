"""`orfeas edge serve|sync`: the standalone edge node (edge/), one process, no Ray."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from cluster.console import ConfigOpt, JsonOpt, console, fail, print_json, settings_or_exit

edge_app = typer.Typer(help="The edge node: local chat, embeddings and RAG, synced with a cluster.",
                       no_args_is_help=True)

FromOpt = Annotated[str, typer.Option("--from", help="The cluster's API URL (http[s]://host:port).")]
CollectionOpt = Annotated[str, typer.Option("--collection", help="The collection to sync and serve.")]
KeyOpt = Annotated[Optional[str], typer.Option("--key", envvar="ORFEAS_API_KEY", help="An API key of the cluster.")]
DirOpt = Annotated[Optional[Path], typer.Option("--dir", help="The edge's data directory (default data_dir/edge).")]
EmbedderOpt = Annotated[Optional[Path], typer.Option(
    "--embedder", help="The optimised (INT8) embedder directory (default data_dir/models/<embedding_model>-int8).")]


def register(app: typer.Typer) -> None:
    app.add_typer(edge_app, name="edge")


def _node(config, url, collection, key, root, embedder, chat_model=None):
    from edge.node import EdgeNode
    from models.errors import APIError

    settings = settings_or_exit(config)
    root = root or settings.resolved_data_dir() / "edge"
    embedder = embedder or settings.resolved_data_dir() / "models" / f"{settings.rag.embedding_model}-int8"
    chat = None
    if chat_model:
        chat = settings.model(chat_model)
        if chat is None:
            fail(f"--chat-model {chat_model!r} is not in the model catalog", 2)
    try:
        return EdgeNode(root, url=url, collection=collection, key=key, embedder=str(embedder), settings=settings,
                        chat=chat)
    except APIError as e:
        fail(e.message, 2)


@edge_app.command("sync")
def edge_sync(url: FromOpt, collection: CollectionOpt, key: KeyOpt = None, root: DirOpt = None,
              embedder: EmbedderOpt = None, config: ConfigOpt = None, json_out: JsonOpt = False):
    """Pull the collection's changes from the cluster and push the writes queued here, then exit."""
    from models.errors import APIError

    node = _node(config, url, collection, key, root, embedder)
    try:
        result = node.sync()
    except APIError as e:
        fail(e.message)
    finally:
        node.close()
    if json_out:
        print_json(result)
    else:
        console.print(f"{collection}: version {result['version']}"
                      + (" (unchanged)" if result["unchanged"] else
                         f", {result['fetched']} point(s) fetched, {result['deleted']} deleted")
                      + f"; outbox {result['outbox']}")


@edge_app.command("serve")
def edge_serve(url: FromOpt, collection: CollectionOpt, key: KeyOpt = None, root: DirOpt = None,
               embedder: EmbedderOpt = None,
               chat_model: Annotated[Optional[str], typer.Option(help="Catalog id of the local chat model.")] = None,
               host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
               port: Annotated[int, typer.Option(help="Port to listen on.")] = 8100,
               config: ConfigOpt = None):
    """Sync once (or, when the cluster is away, serve the last sync offline), then serve the edge API."""
    from edge.app import serve
    from models.errors import APIError

    t0 = time.perf_counter()
    node = _node(config, url, collection, key, root, embedder, chat_model)
    try:
        result = node.start()
        node.load_chat()
    except APIError as e:
        node.close()
        fail(e.message)
    except Exception as e:  # a chat model that does not load
        node.close()
        fail(f"cannot start the edge node: {type(e).__name__}: {e}")
    state = "offline, version " + str(result["version"]) if result.get("offline") else f"synced {result['version']}"
    console.print(f"edge node for {collection!r} ({state}) on http://{host}:{port} "
                  f"(ready in {time.perf_counter() - t0:.1f} s)")
    try:
        serve(node, host, port)
    finally:
        node.close()
