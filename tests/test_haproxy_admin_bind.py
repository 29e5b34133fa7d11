"""HAProxy's stats page and Prometheus exporter listen on loopback only (issue 18: nothing listens
openly by default). Ray's own HAProxy code (`HAProxyApi`: its config template, start and reload)
runs the real haproxy through serve/haproxy_admin_bind, as Serve's HAProxy manager does when the
controller's env names it; the listening sockets are then read from the kernel."""

import asyncio
import os
import shutil

import psutil
import pytest

from harness import free_port
from serve.applications import CODE_ROOT, HAPROXY_ADMIN_BIND

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs the haproxy binary (make installs it)")


def listeners(pid: int) -> dict[int, set[str]]:
    """port -> the addresses a process listens on (TCP)."""
    out: dict[int, set[str]] = {}
    for c in psutil.Process(pid).net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN:
            out.setdefault(c.laddr.port, set()).add(c.laddr.ip)
    return out


def run_ray_haproxy(tmp_path, monkeypatch, binary: str, admin_host: str | None) -> tuple[dict, dict, dict, int]:
    from ray.serve._private import haproxy
    from ray.serve.config import HTTPOptions

    monkeypatch.setattr(haproxy, "RAY_SERVE_HAPROXY_BINARY_PATH", binary)  # what the controller's env sets
    if admin_host is None:
        monkeypatch.delenv("ORFEAS_HAPROXY_ADMIN_HOST", raising=False)
    else:
        monkeypatch.setenv("ORFEAS_HAPROXY_ADMIN_HOST", admin_host)
    ports = {"stats": free_port(), "metrics": free_port(), "http": free_port()}
    cfg = haproxy.HAProxyConfig(
        socket_path=str(tmp_path / "admin.sock"), server_state_base=str(tmp_path),
        server_state_file=str(tmp_path / "server-state"), enable_hap_optimization=False,
        stats_port=ports["stats"], metrics_port=ports["metrics"],
        http_options=HTTPOptions(host="127.0.0.1", port=ports["http"]))
    api = haproxy.HAProxyApi(cfg, config_file_path=str(tmp_path / "haproxy.cfg"))

    async def cycle():
        await api.start()
        first = listeners(api._proc.pid)
        await api.reload()  # Ray reloads with `-sf OLD_PID` on every route/replica change
        await asyncio.sleep(0.5)
        second = listeners(api._proc.pid)
        pid = api._proc.pid
        await api.stop()
        return first, second, pid

    first, second, pid = asyncio.run(cycle())
    return ports, first, second, pid


def test_stats_and_metrics_listen_on_loopback_only_and_ingress_where_configured(tmp_path, monkeypatch):
    binary = str(CODE_ROOT / HAPROXY_ADMIN_BIND)
    assert os.access(binary, os.X_OK), "the script must be committed executable (git mode 100755)"
    ports, first, second, _ = run_ray_haproxy(tmp_path, monkeypatch, binary, admin_host=None)
    for seen in (first, second):  # after the first start and after a reload
        assert seen[ports["stats"]] == {"127.0.0.1"}, seen
        assert seen[ports["metrics"]] == {"127.0.0.1"}, seen
        assert seen[ports["http"]] == {"127.0.0.1"}, seen  # the ingress keeps serve.host
    # The config Ray wrote is left as Ray wrote it; haproxy ran the rewritten copy.
    written = (tmp_path / "haproxy.cfg").read_text()
    assert f"bind *:{ports['stats']}" in written and f"bind :{ports['metrics']}" in written
    copy = (tmp_path / "haproxy.cfg.admin-bind.cfg").read_text()
    assert f"bind 127.0.0.1:{ports['stats']}" in copy and f"bind 127.0.0.1:{ports['metrics']}" in copy


def test_without_the_script_rays_template_listens_on_every_interface(tmp_path, monkeypatch):
    """The defect the script answers, seen on Ray 2.60's template as it is: if Ray ever binds
    these to loopback itself, this fails and the script can go."""
    ports, first, _, _ = run_ray_haproxy(tmp_path, monkeypatch, shutil.which("haproxy"), admin_host=None)
    assert first[ports["stats"]] - {"127.0.0.1", "::1"}, first
    assert first[ports["metrics"]] - {"127.0.0.1", "::1"}, first


def test_an_admin_host_given_moves_both_listeners_there(tmp_path, monkeypatch):
    ports, first, _, _ = run_ray_haproxy(tmp_path, monkeypatch, str(CODE_ROOT / HAPROXY_ADMIN_BIND),
                                         admin_host="0.0.0.0")
    assert first[ports["stats"]] == {"0.0.0.0"} and first[ports["metrics"]] == {"0.0.0.0"}, first
