"""`orfeas login` (OIDC authorization code + PKCE through a loopback redirect, RFC 8252), `orfeas
logout`, and `orfeas directory sync` / `status` (the LDAP directory actor, security/directory.py)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import webbrowser
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Annotated, Optional
from urllib.parse import parse_qs, urlparse

import typer

from cluster.console import ConfigOpt, JsonOpt, connected, console, fail, print_json, settings_or_exit

TOKEN_FILE_ENV = "ORFEAS_TOKEN_FILE"
directory_app = typer.Typer(help="LDAP / Active Directory sync (auth.directory).", no_args_is_help=True)


def token_file() -> Path:
    """Where `orfeas login` keeps the CLI's token ($ORFEAS_TOKEN_FILE, else ~/.config/orfeas/token.json)."""
    return Path(os.environ.get(TOKEN_FILE_ENV) or Path.home() / ".config" / "orfeas" / "token.json")


def stored_token() -> str | None:
    """The stored access token while it is valid (None when absent or expired)."""
    try:
        data = json.loads(token_file().read_text())
    except (OSError, ValueError):
        return None
    return data.get("access_token") if data.get("expires_at", 0) > time.time() + 5 else None


def _save_token(body: dict, issuer: str) -> Path:
    path = token_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"issuer": issuer, "access_token": body.get("access_token") or body["id_token"],
            "expires_at": time.time() + float(body.get("expires_in") or 300)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    return path


def _loopback_server() -> tuple[HTTPServer, dict]:
    got: dict = {}

    class Callback(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            q = parse_qs(urlparse(self.path).query)
            got.update({k: v[0] for k, v in q.items()})
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.end_headers()
            self.wfile.write(b"Signed in to ORFEAS: you may close this window.\n")
            got["done"] = True

        def log_message(self, *args):  # quiet
            pass

    return HTTPServer(("127.0.0.1", 0), Callback), got


def register(app: typer.Typer) -> None:
    app.add_typer(directory_app, name="directory")

    @app.command()
    def login(config: ConfigOpt = None,
              issuer: Annotated[Optional[str], typer.Option(help="auth.oidc issuer name (default: the first with a client_id).")] = None,
              no_browser: Annotated[bool, typer.Option("--no-browser", help="Print the URL instead of opening it.")] = False,
              timeout: Annotated[float, typer.Option(help="Seconds to wait for the sign-in.")] = 300):
        """Sign in with the identity provider (browser, PKCE); the token is kept for the CLI."""
        from models.errors import APIError
        from security.oidc import TokenVerifier
        from security.sso import begin, finish, pick_issuer

        settings = settings_or_exit(config)
        try:
            chosen = pick_issuer(settings.auth.oidc, issuer)
        except APIError as e:
            fail(e.message, 2)
        server, got = _loopback_server()
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            redirect = f"http://127.0.0.1:{server.server_address[1]}/callback"
            url, pending = asyncio.run(begin(chosen, redirect))
            console.print(f"Sign in at: {url}", highlight=False, soft_wrap=True)
            if not no_browser:
                webbrowser.open(url)
            deadline = time.monotonic() + timeout
            while not got.get("done"):
                if time.monotonic() > deadline:
                    fail(f"no sign-in within {timeout:g}s")
                time.sleep(0.05)
            if got.get("error"):
                fail(f"the identity provider refused: {got['error']} {got.get('error_description', '')}".strip())
            try:
                verified, body = asyncio.run(finish(TokenVerifier(settings), chosen, pending, got.get("code", ""),
                                                    got.get("state", "")))
            except APIError as e:
                fail(e.message)
        finally:
            server.shutdown()
        path = _save_token(body, chosen.issuer)
        console.print(f"signed in as {verified.claims.get(chosen.user_claim)}; token saved to {path}")

    @app.command()
    def logout():
        """Forget the CLI's stored token."""
        token_file().unlink(missing_ok=True)
        console.print("signed out")

    @directory_app.command("sync")
    def directory_sync(config: ConfigOpt = None, as_json: JsonOpt = False):
        """Sync users' roles and teams from the directory now."""
        import ray

        from security.directory import directory_store

        settings = connected(config)
        if not settings.auth.directory.enabled:
            fail("auth.directory.enabled is false: nothing to sync", 2)
        status = ray.get(directory_store(settings).sync.remote())
        if as_json:
            print_json(status)
        else:
            console.print(f"{status['users']} users synced" + (f"; error: {status['error']}" if status["error"] else ""))
        if status["error"]:
            raise typer.Exit(1)
