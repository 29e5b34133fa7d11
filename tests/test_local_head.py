"""The local head `orfeas up` starts (cluster.local.start_local_head), on its own ports: by default
Ray's metrics export listens on loopback only, never on the machine's other addresses (issue 18:
"nothing listens openly by default"). On Linux `ray start --node-ip-address=127.0.0.1` alone turns
the address into the machine's outward one and the export binds every interface; head_env keeps
the node on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from harness import free_port

REPO = Path(__file__).resolve().parents[1]

HEAD = """
import json, sys
import ray
from config import Settings
from cluster.local import start_local_head, stop_local_head, connect
s = Settings(data_dir=sys.argv[2], ray={"gcs_port": int(sys.argv[3]), "dashboard_port": int(sys.argv[4]), "num_cpus": 1})
if sys.argv[1] == "stop":
    print(stop_local_head(s))
else:
    assert start_local_head(s)
    connect(s)
    node = ray.nodes()[0]
    print(json.dumps({"ip": node["NodeManagerAddress"], "metrics_port": node["MetricsExportPort"]}))
"""


def outward_ip() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def listeners(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_the_local_heads_metrics_export_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a managed head, not the session's
    env["PYTHONPATH"] = str(REPO)
    args = [str(tmp_path / "data"), str(free_port()), str(free_port())]

    def head(action: str) -> str:
        r = subprocess.run([sys.executable, "-c", HEAD, action, *args], capture_output=True, text=True, env=env,
                           timeout=180, cwd=str(tmp_path))
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout.strip().splitlines()[-1]

    try:
        node = json.loads(head("start"))
        port = node["metrics_port"]
        deadline = time.monotonic() + 60
        while not listeners(port):  # the agent opens the export a moment after the node registers
            assert time.monotonic() < deadline, f"nothing listens on the metrics export port {port}"
            time.sleep(0.2)
        assert node["ip"] == "127.0.0.1", node
        assert listeners(port) <= {"127.0.0.1", "::1"}, listeners(port)
        ip = outward_ip()
        if ip is not None:  # from the machine's own outward address: refused
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((ip, port), timeout=5).close()
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        assert head("stop") == "True"
