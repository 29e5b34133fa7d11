"""RAG commands for the `orfeas` CLI: `ingest`, `collections`, `ask`, `eval retrieval`.

`cluster/cli.py` calls `register(app)`. `ingest` and `eval retrieval` run as Ray jobs submitted
through the dashboard's job submission API (the same entrypoints work with `ray job submit`);
`collections` and `ask` talk to the store's owner actor directly.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from cluster.console import ConfigOpt, connect_or_exit, console, err, fail, print_json, settings_or_exit, table
from cluster.local import dashboard_url, is_local
from config import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]

CollectionOpt = Annotated[Optional[str], typer.Option("--collection", help="Collection (default: rag.collection).")]


def _job_env(settings: Settings, config: Path | None) -> dict[str, Any]:
    """On a local cluster the job runs this checkout, this config and this data dir."""
    if not is_local(settings):
        return {}
    from config import config_path

    env = {"PYTHONPATH": str(REPO_ROOT), "ORFEAS_DATA_DIR": str(settings.resolved_data_dir()),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cfg = config_path(config)
    if cfg is not None and cfg.exists():
        env["ORFEAS_CONFIG"] = str(cfg.resolve())
    return {"env_vars": env}


@dataclass
class JobRun:
    id: str
    status: str
    tail: deque[str]  # its last log lines

    def fail_unless_succeeded(self, what: str, got_result: bool) -> None:
        """End the command (status 1, after the job's last log lines) unless the job succeeded and
        printed its result."""
        if self.status != "SUCCEEDED" or not got_result:
            err.print("\n".join(self.tail), markup=False, highlight=False)
            fail(f"{what} job {self.id} ended {self.status}")


def submit_and_follow(settings: Settings, config: Path | None, args: list[str],
                      on_line: Callable[[str], None]) -> JobRun:
    """Submit `python -m ...args` as a Ray job and feed its log lines to `on_line` until it ends."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    connect_or_exit(settings)  # also presents the local head's auth token
    python = sys.executable if is_local(settings) else "python"
    entrypoint = " ".join(shlex.quote(a) for a in [python, *args])
    try:
        client = JobSubmissionClient(dashboard_url(settings))
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=_job_env(settings, config) or None)
    except Exception as e:  # noqa: BLE001 - report any submission problem plainly
        fail(f"cannot submit the job to {dashboard_url(settings)}: {e}")

    tail: deque[str] = deque(maxlen=15)

    def line(text: str) -> None:
        tail.append(text)
        on_line(text)

    async def follow() -> None:
        buf = ""
        async for chunk in client.tail_job_logs(job_id):
            buf += chunk
            *lines, buf = buf.split("\n")
            for text in lines:
                line(text)
        if buf:
            line(buf)

    try:
        asyncio.run(follow())
    except KeyboardInterrupt:
        client.stop_job(job_id)
        fail(f"interrupted; job {job_id} stopped", 130)
    status = client.get_job_status(job_id)
    return JobRun(job_id, status.value if isinstance(status, JobStatus) else str(status), tail)


# ---------------------------------------------------------------------------------------- ingest

def ingest(
    source: Annotated[str, typer.Argument(help="File, directory, glob, or s3:// gs:// abfs:// URI.")],
    collection: CollectionOpt = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Write a new version; flip the alias when complete.")] = False,
    config: ConfigOpt = None,
):
    """Ingest documents into a collection (a Ray Data job on the cluster)."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from rag.ingest import PROGRESS_TAG, SUMMARY_TAG, IngestSummary, format_summary, is_uri

    settings = settings_or_exit(config)
    if not is_uri(source) and is_local(settings):
        if not any(ch in source for ch in "*?[") and not Path(source).expanduser().exists():
            fail(f"source {source!r} does not exist")
        source = str(Path(source).expanduser().absolute())
    args = ["-m", "jobs.ingest", source, "--collection", collection or settings.rag.collection]
    if rebuild:
        args.append("--rebuild")
    summary: dict[str, Any] = {}
    errors: list[str] = []

    with Progress(SpinnerColumn(), TextColumn("[bold]ingest[/] {task.description}"), BarColumn(),
                  TextColumn("{task.fields[chunks]} chunks"), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task("submitting", total=None, chunks=0)

        def on_line(line: str) -> None:
            if line.startswith(PROGRESS_TAG):
                p = json.loads(line[len(PROGRESS_TAG):])
                progress.update(task, description=f"{p['documents']} documents, {p['skipped']} skipped, "
                                f"{p['failed']} failed", chunks=p["chunks"])
            elif line.startswith(SUMMARY_TAG):
                summary.update(json.loads(line[len(SUMMARY_TAG):]))
            elif line.startswith("error: "):
                errors.append(line[len("error: "):])

        job = submit_and_follow(settings, config, args, on_line)
    if errors:
        fail(errors[-1], 2)
    job.fail_unless_succeeded("ingest", bool(summary))
    console.print(format_summary(IngestSummary.model_validate(summary)))


# ----------------------------------------------------------------------------------- collections

def _ask_platform(settings: Settings, req) -> dict:
    """A generated answer from the deployed RAG app, which generates through the gateway's chat
    path for the CLI's caller ($ORFEAS_API_KEY's key, else the operator: security.auth)."""
    from ray import serve

    from security.auth import operator_principal

    from config.names import GATEWAY_APP, RAG_APP
    from models.errors import APIError
    from serve.http import unwrap

    connect_or_exit(settings)
    try:
        gateway, rag = serve.get_app_handle(GATEWAY_APP), serve.get_app_handle(RAG_APP)
    except Exception:
        fail("the gateway or the RAG service is not deployed: start the platform with `orfeas up` "
             "(rag.enabled: true)")
    timeout = settings.gateway.request_timeout_s
    try:
        caller = operator_principal(settings)  # answers are generated for the CLI's caller, never the platform
        model = gateway.rag_generator.remote(req.model, caller).result(timeout_s=timeout)  # is it usable now?
        out = rag.query.remote(req.model_dump(exclude_none=True), model, caller).result(timeout_s=timeout)
    except Exception as e:
        cause = unwrap(e)
        if isinstance(cause, APIError):
            raise cause from None
        fail(f"the RAG service failed: {type(e).__name__}: {e}"[:2000])
    out.pop("completion_tokens", None)  # the chat alias's usage, not part of the answer
    return out


def _store(settings: Settings):
    from rag.store import open_store

    if not settings.rag.qdrant_url:
        connect_or_exit(settings)
    return open_store(settings)


def collections_list(
    ctx: typer.Context,
    name: Annotated[Optional[str], typer.Option("--name", help="Only this collection's versions.")] = None,
    config: ConfigOpt = None,
):
    """List collections and their versions (the active one is marked)."""
    if ctx.invoked_subcommand is not None:
        return
    from rag.versions import list_versions

    settings = settings_or_exit(config)
    rows = list_versions(_store(settings), name)
    if not rows:
        console.print("no collections yet: `orfeas ingest PATH` makes one")
        return
    versions = table("collection", "version", "physical", "points", "active")
    for r in rows:
        versions.add_row(r.name, f"v{r.version}", r.collection, str(r.points), "[green]*[/]" if r.active else "")
    console.print(versions)


def collections_rollback(
    name: Annotated[str, typer.Argument(help="Collection to roll back.")],
    to: Annotated[Optional[int], typer.Option("--to", help="Version number (default: the previous one).")] = None,
    config: ConfigOpt = None,
):
    """Point the collection's alias back at an earlier version."""
    from models.errors import APIError
    from rag.versions import rollback

    settings = settings_or_exit(config)
    try:
        v = rollback(_store(settings), name, to)
    except APIError as e:
        fail(e.message, 2)
    console.print(f"{name} now serves v{v.version} ({v.collection}, {v.points} points)")


# ------------------------------------------------------------------------------------------- ask

def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    collection: CollectionOpt = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Chunks to retrieve.")] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="dense, sparse or hybrid.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole response as JSON.")] = False,
    model: Annotated[Optional[str], typer.Option(
        "--model", help="Generate the answer with this chat model, through the platform's chat path "
                        "(router, limits, ledger: needs `orfeas up`); without it the answer is extractive.")] = None,
    config: ConfigOpt = None,
):
    """Answer a question from a collection, with its sources."""
    from models.errors import APIError
    from rag.service import RagQueryRequest, RagQueryResponse, RagService

    settings = settings_or_exit(config)
    try:
        req = RagQueryRequest(query=question, collection=collection, top_k=top_k, mode=mode, model=model)
        if model:
            resp = RagQueryResponse.model_validate(_ask_platform(settings, req))
        else:
            resp = RagService(settings, store=_store(settings)).query(req)
    except APIError as e:
        fail(e.message, 2)
    except ValueError as e:
        fail(str(e), 2)
    if as_json:
        console.print_json(resp.model_dump_json())
        return
    console.print(resp.answer)
    console.print(f"\n[dim]model: {resp.model} · collection: {resp.diagnostics.retrieval.resolved_collection} · "
                  f"{resp.diagnostics.total_ms:.0f} ms[/]")
    for c in resp.citations:
        where = f"page {c.position.get('page')}" if c.position.get("page") else \
            f"chars {c.position.get('start')}-{c.position.get('end')}"
        console.print(f"[{c.index}] {c.title} — {c.source} ({where})")
    if not resp.citations and resp.passages:  # the model cited nothing: show what it was given
        console.print("[dim]the answer cites no passage; its context was:[/]")
        for p in resp.passages:
            console.print(f"[{p.index}] {p.title} — {p.source} (chars {p.start}-{p.end})")
    if resp.diagnostics.gate and resp.diagnostics.gate.reason:
        console.print(f"[dim]quality gate: {resp.diagnostics.gate.reason}[/]")


# ------------------------------------------------------------------------------------------ eval

def eval_retrieval(
    dataset: Annotated[Path, typer.Option("--dataset", help="BEIR directory: corpus.jsonl, queries.jsonl, qrels/.")],
    split: Annotated[str, typer.Option("--split", help="train or test (qrels/SPLIT.tsv).")] = "test",
    output: Annotated[Optional[Path], typer.Option("--output", help="Also write the JSON here.")] = None,
    graph: Annotated[bool, typer.Option("--graph", help="Also graph-augmented hybrid retrieval (rag.graph).")] = False,
    config: ConfigOpt = None,
):
    """nDCG@10, Recall@100 and MRR@10 of dense, sparse and hybrid retrieval on a BEIR dataset (JSON)."""
    from rag.evaluation import RESULT_TAG

    if split not in ("train", "test", "dev"):
        fail("--split must be train, test or dev", 2)
    if not (dataset / "corpus.jsonl").exists():
        fail(f"{dataset} is not a BEIR dataset (no corpus.jsonl)", 2)
    if not (dataset / "qrels" / f"{split}.tsv").exists():
        fail(f"{dataset} has no qrels/{split}.tsv", 2)
    settings = settings_or_exit(config)
    args = ["-m", "jobs.eval_retrieval", "--dataset", str(dataset.resolve()), "--split", split]
    if output:
        args += ["--output", str(output.resolve())]
    if graph:
        args.append("--graph")
    result: dict[str, Any] = {}

    def on_line(line: str) -> None:
        if line.startswith(RESULT_TAG):
            result.update(json.loads(line[len(RESULT_TAG):]))

    with console.status("evaluating (ingest + queries) ..."):
        job = submit_and_follow(settings, config, args, on_line)
    job.fail_unless_succeeded("evaluation", bool(result))
    print_json(result)


def register(app: typer.Typer) -> None:
    """Add the RAG commands to the `orfeas` app."""
    app.command("ingest")(ingest)
    collections_app = typer.Typer(help="List collections and their versions; roll one back.",
                                  invoke_without_command=True)
    collections_app.callback(invoke_without_command=True)(collections_list)
    collections_app.command("rollback")(collections_rollback)
    app.add_typer(collections_app, name="collections")
    app.command("ask")(ask)
    eval_app = typer.Typer(help="Evaluations.", no_args_is_help=True)
    eval_app.command("retrieval")(eval_retrieval)
    app.add_typer(eval_app, name="eval")


if __name__ == "__main__":  # `python -m cluster.rag_cli ...` until the lead wires register(app)
    _app = typer.Typer(no_args_is_help=True, add_completion=False)
    register(_app)
    _app()
