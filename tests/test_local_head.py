"""The head `orfeas up` starts keeps to loopback by default (issue 18, "nothing listens openly").

Ray 2.60 turns a loopback --node-ip-address into the machine's routable address unless its cluster
switch is off; this head ran with the routable address and exported its metrics on 0.0.0.0 before
cluster/local.py switched it off. The head here is a second, throwaway Ray instance on spare ports,
so the session's cluster is not touched."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from harness import free_port

ROOT = Path(__file__).resolve().parents[1]

# A driver in a fresh process, as the CLI is: it connects the way every ORFEAS command does and
# reports the node's address and where `orfeas status` says the metrics are.
DRIVER = """
import json, sys
from config.settings import settings_from_dict
from cluster.cli import _metrics_address
from cluster.local import connect
import ray
connect(settings_from_dict(json.loads(sys.argv[1])))
node = next(n for n in ray.nodes() if n["Alive"])
print(json.dumps({"node": node["NodeManagerAddress"], "metrics_port": node["MetricsExportPort"],
                  "status_metrics": _metrics_address(), "task": ray.get(ray.remote(lambda: 7).remote())}))
"""


def _is_loopback(host: str) -> bool:
    ip = ipaddress.ip_address(host)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def _family(gcs_port: int) -> list[psutil.Process]:
    from cluster.local import _head_processes

    procs = {}
    for p in _head_processes(gcs_port):
        for q in [p, *p.children(recursive=True)]:
            procs[q.pid] = q
    return list(procs.values())


@pytest.fixture
def local_head(tmp_path):
    from cluster import local
    from config.settings import settings_from_dict

    raw = {"data_dir": str(tmp_path / "data"), "ray": {"gcs_port": free_port(), "dashboard_port": free_port()}}
    settings = settings_from_dict(raw)
    assert local.start_local_head(settings)
    try:
        yield raw, settings
    finally:
        local.stop_local_head(settings)


def test_the_local_head_and_its_metrics_export_listen_on_loopback_only(local_head):
    raw, settings = local_head
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(raw)], capture_output=True, text=True,
                       timeout=180, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen["node"] == "127.0.0.1" and seen["task"] == 7
    assert seen["status_metrics"] == f"http://127.0.0.1:{seen['metrics_port']}/metrics"

    listening = {}
    for proc in _family(settings.ray.gcs_port):
        try:
            conns = proc.net_connections("inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                listening[c.laddr.port] = (c.laddr.ip, proc.name())
    assert settings.ray.gcs_port in listening and seen["metrics_port"] in listening, listening
    open_ = {port: who for port, who in listening.items() if not _is_loopback(who[0])}
    assert not open_, f"listening beyond loopback: {open_}"
