"""What every `orfeas` command shares (`cli`, `rag_cli`, `agents_cli`, `k8s_cli`, `demo`): the
consoles it prints to, its `--config` and `--json` options, how it ends on an error, how it loads
the settings and how it joins the cluster.

Exit statuses: 0 done, 1 the operation failed (no cluster, a job failed, the API refused),
2 bad input or configuration, 130 interrupted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from config import ConfigError, Settings, load_settings

console = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="Configuration file (default: ./orfeas.yaml).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def fail(message: str, code: int = 1) -> NoReturn:
    """End the command: `error: MESSAGE` on stderr, the message as written (no markup, not
    re-wrapped), and exit status `code`."""
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def settings_or_exit(config: Path | None) -> Settings:
    """The settings from `config` (default: $ORFEAS_CONFIG, then ./orfeas.yaml); invalid ones end
    the command with every bad field and why, exit status 2."""
    try:
        return load_settings(config)
    except ConfigError as e:
        fail(str(e), 2)


def connect_or_exit(settings: Settings) -> str:
    """Join the platform's Ray cluster (in the one actor namespace, `cluster.local.connect`);
    returns its address. No cluster ends the command with exit status 1."""
    from cluster.local import ClusterError, connect

    try:
        return connect(settings)
    except ClusterError as e:
        fail(str(e))


def connected(config: Path | None) -> Settings:
    """`settings_or_exit` then `connect_or_exit`: what a command that talks to the cluster starts with."""
    settings = settings_or_exit(config)
    connect_or_exit(settings)
    return settings


def print_json(obj: Any) -> None:
    """`obj` as indented JSON on stdout (values JSON does not know, such as datetimes, as strings)."""
    console.print_json(json.dumps(obj, default=str))


def table(*columns: str) -> Table:
    """A borderless table with these column headers, as every listing prints."""
    return Table(*columns, box=None, pad_edge=False)
