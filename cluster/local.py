"""Which Ray cluster the platform uses, starting a local head when none is configured."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from config import Settings
from config.names import ACTOR_NAMESPACE


class ClusterError(RuntimeError):
    pass


def _ray_cli() -> str:
    # The `ray` next to this interpreter: the head must run the same environment as the CLI.
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else "ray"


def cluster_address(settings: Settings) -> str:
    return settings.ray.address or os.environ.get("RAY_ADDRESS", "") or f"127.0.0.1:{settings.ray.gcs_port}"


def is_managed(settings: Settings) -> bool:
    """True when ORFEAS runs its own local head (no address configured)."""
    return not (settings.ray.address or os.environ.get("RAY_ADDRESS"))


def is_local(settings: Settings) -> bool:
    """True when the cluster runs on this machine (ORFEAS's own head, or a dashboard on loopback):
    a job submitted to it can run this checkout with this interpreter."""
    return is_managed(settings) or settings.ray.dashboard_host in ("127.0.0.1", "localhost", "::1")


def dashboard_url(settings: Settings) -> str:
    return f"http://{settings.ray.dashboard_host}:{settings.ray.dashboard_port}"


def api_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.serve.host in ("0.0.0.0", "::") else settings.serve.host
    scheme = "https" if settings.serve.tls.enabled else "http"  # serve.tls: HTTPS only
    return f"{scheme}://{host}:{settings.serve.port}"


def _listening(address: str, timeout: float = 0.5) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _state_file(settings: Settings) -> Path:
    return settings.resolved_data_dir() / "cluster.json"


def _use_token_auth() -> None:
    """The local head runs with Ray's token auth (~/.ray/auth_token); this process presents it too.

    Ray reads the auth mode once at import, so switching it on here goes through Ray's own
    setup helpers, which refresh that configuration.
    """
    from ray._private.authentication import authentication_token_setup as token_setup

    if os.environ.get("RAY_AUTH_MODE", "token") != "token":
        return  # the user chose a mode explicitly
    if not token_setup._get_default_token_path().exists():
        token_setup.generate_and_save_token()
    token_setup._enable_token_auth()


# Ray's own switch (ray_constants.ENABLE_RAY_CLUSTER, on by default on Linux): while on, Ray turns a
# loopback node address into the machine's routable one (services.resolve_ip_for_localhost), so a
# head started with --node-ip-address=127.0.0.1 still exported metrics on 0.0.0.0 and ran its raylet
# on every interface. Off, the node is 127.0.0.1 and every server of it binds to loopback.
RAY_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _loopback_node(settings: Settings) -> bool:
    return is_managed(settings) and settings.ray.node_ip_address in ("127.0.0.1", "localhost", "::1")


def _keep_ray_on_loopback(settings: Settings) -> None:
    """Make this process's Ray treat a loopback head as loopback: a driver that resolved
    127.0.0.1 to the routable address would dial a GCS that is not listening there and hang."""
    if not _loopback_node(settings):
        return
    os.environ[RAY_CLUSTER_SWITCH] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # Ray read the switch when it was imported; tell an already loaded one
        constants.ENABLE_RAY_CLUSTER = False


def head_env(settings: Settings) -> dict[str, str]:
    """Environment for the local head and so for every worker and job driver it starts."""
    _use_token_auth()
    env = dict(os.environ)
    if _loopback_node(settings):
        env[RAY_CLUSTER_SWITCH] = "0"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not any(m.allow_download for m in settings.models):
        env.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach for the hub unless a model allows it
    return env


# Logical CPUs of a local head at least: Serve replicas reserve CPUs while mostly waiting, and an
# ingest job's embedding actors must still be schedulable next to them on a 2-core laptop.
LOCAL_HEAD_MIN_CPUS = 8


def start_local_head(settings: Settings) -> bool:
    """Start the local head unless one already answers; True if this call started it."""
    address = cluster_address(settings)
    if _listening(address):
        return False
    cmd = [
        _ray_cli(), "start", "--head",
        f"--port={settings.ray.gcs_port}",
        f"--dashboard-host={settings.ray.dashboard_host}",
        f"--dashboard-port={settings.ray.dashboard_port}",
        # Loopback by default (with RAY_CLUSTER_SWITCH off in head_env): GCS, raylet, object
        # manager, Ray client server and the metrics export all bind to it.
        f"--node-ip-address={settings.ray.node_ip_address}",
        "--disable-usage-stats",
    ]
    cmd.append(f"--num-cpus={settings.ray.num_cpus or max(os.cpu_count() or 1, LOCAL_HEAD_MIN_CPUS)}")
    result = subprocess.run(cmd, capture_output=True, text=True, env=head_env(settings))
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise ClusterError(f"`ray start --head` failed (exit {result.returncode}):\n{tail}")
    state = _state_file(settings)
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"address": address, "started_at": time.time()}))
    return True


def connect(settings: Settings) -> str:
    """Connect this process to the platform's cluster; returns its address."""
    import ray  # here, not at the top: `orfeas edge` and other Ray-less commands never load it

    address = cluster_address(settings)
    if is_managed(settings) and not _listening(address):
        raise ClusterError(f"no ORFEAS cluster is running at {address}: start it with `orfeas up`")
    if is_managed(settings):
        _use_token_auth()
        _keep_ray_on_loopback(settings)
    if not ray.is_initialized():
        try:
            ray.init(address=address, namespace=ACTOR_NAMESPACE, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError) as e:
            raise ClusterError(f"cannot connect to the Ray cluster at {address}: {e}") from None
    return address


def stop_local_head(settings: Settings) -> bool:
    """Stop the local head if ORFEAS started it; an external cluster is never stopped."""
    state = _state_file(settings)
    if not is_managed(settings) or not state.exists():
        return False
    for proc in _head_processes(settings.ray.gcs_port):
        _terminate_tree(proc)
    _forget_head_address(settings.ray.gcs_port)
    state.unlink(missing_ok=True)
    return True


def _forget_head_address(gcs_port: int) -> None:
    """Drop Ray's "latest cluster" file when it names our stopped head (as `ray stop` would), so a
    later `ray.init()` starts fresh instead of dialling a dead address."""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    try:
        if path.read_text().strip().endswith(f":{gcs_port}"):
            path.unlink()
    except OSError:
        pass


def _head_processes(gcs_port: int) -> list:
    """Every process of the Ray session whose GCS listens on `gcs_port`, and nothing else.

    `ray stop` would kill every Ray process on the machine (other clusters, test sessions); the
    session name in the GCS's command line picks out only ours.
    """
    import psutil

    procs = list(psutil.process_iter(["cmdline"]))
    session = None
    for p in procs:
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].endswith("gcs_server") and f"--gcs_server_port={gcs_port}" in cmd:
            session = next((m.group(1) for a in cmd if (m := re.search(r"--session-name=(\S+)", a))), None)
    if session is None:
        return []
    return [p for p in procs if any(session in a for a in (p.info["cmdline"] or []))]


def _terminate_tree(proc, timeout_s: float = 10.0) -> None:
    """SIGTERM a process and its descendants (workers, dashboard modules), SIGKILL what lingers."""
    import psutil

    try:
        family = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
