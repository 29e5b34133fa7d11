"""serve/haproxy_wrapper, the way Serve's HAProxy manager runs it when the controller's env names
it: Ray's own HAProxy code (`HAProxyApi`: its config template, start and reload) starts the real
haproxy through it. HAProxy's stats page and Prometheus exporter listen on loopback only (issue
18: nothing listens openly by default; the sockets are read from the kernel), and the ingress
terminates TLS with serve.tls's files (issue 15)."""

import asyncio
import os
import shutil

import psutil
import pytest

from harness import free_port
from serve.applications import CODE_ROOT, HAPROXY_WRAPPER

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs the haproxy binary (make installs it)")


def listeners(pid: int) -> dict[int, set[str]]:
    """port -> the addresses a process listens on (TCP)."""
    out: dict[int, set[str]] = {}
    for c in psutil.Process(pid).net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN:
            out.setdefault(c.laddr.port, set()).add(c.laddr.ip)
    return out


def run_ray_haproxy(tmp_path, monkeypatch, binary: str, admin_host: str | None,
                    tls: dict | None = None, during=None) -> tuple[dict, dict, dict, int]:
    from ray.serve._private import haproxy
    from ray.serve.config import HTTPOptions

    monkeypatch.setattr(haproxy, "RAY_SERVE_HAPROXY_BINARY_PATH", binary)  # what the controller's env sets
    if admin_host is None:
        monkeypatch.delenv("ORFEAS_HAPROXY_ADMIN_HOST", raising=False)
    else:
        monkeypatch.setenv("ORFEAS_HAPROXY_ADMIN_HOST", admin_host)
    from serve.applications import _bundled_haproxy

    bundled = _bundled_haproxy()  # what the controller's env names, where ray-haproxy is installed
    monkeypatch.setenv("ORFEAS_HAPROXY_REAL_BINARY", bundled or "")
    for name in ("CERT", "KEY"):
        monkeypatch.delenv(f"ORFEAS_HAPROXY_TLS_{name}", raising=False)
        if tls:
            monkeypatch.setenv(f"ORFEAS_HAPROXY_TLS_{name}", tls[name.lower()])
    ports = {"stats": free_port(), "metrics": free_port(), "http": free_port()}
    cfg = haproxy.HAProxyConfig(
        socket_path=str(tmp_path / "admin.sock"), server_state_base=str(tmp_path),
        server_state_file=str(tmp_path / "server-state"), enable_hap_optimization=False,
        stats_port=ports["stats"], metrics_port=ports["metrics"],
        http_options=HTTPOptions(host="127.0.0.1", port=ports["http"]))
    api = haproxy.HAProxyApi(cfg, config_file_path=str(tmp_path / "haproxy.cfg"))

    async def cycle():
        await api.start()
        try:
            first = listeners(api._proc.pid)
            if during:
                await asyncio.to_thread(during, ports)
            await api.reload()  # Ray reloads with `-sf OLD_PID` on every route/replica change
            await asyncio.sleep(0.5)
            return first, listeners(api._proc.pid), api._proc.pid
        finally:
            await api.stop()

    first, second, pid = asyncio.run(cycle())
    return ports, first, second, pid


def test_stats_and_metrics_listen_on_loopback_only_and_ingress_where_configured(tmp_path, monkeypatch):
    binary = str(CODE_ROOT / HAPROXY_WRAPPER)
    assert os.access(binary, os.X_OK), "the script must be committed executable (git mode 100755)"
    ports, first, second, _ = run_ray_haproxy(tmp_path, monkeypatch, binary, admin_host="127.0.0.1")
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
    ports, first, _, _ = run_ray_haproxy(tmp_path, monkeypatch, str(CODE_ROOT / HAPROXY_WRAPPER),
                                         admin_host="0.0.0.0")
    assert first[ports["stats"]] == {"0.0.0.0"} and first[ports["metrics"]] == {"0.0.0.0"}, first


def test_the_ingress_terminates_tls_with_the_configured_certificate(tmp_path, monkeypatch):
    """serve.tls with the HAProxy ingress: a client that trusts the CA completes a TLS handshake
    on the ingress port and gets HAProxy's answer; plain HTTP there gets no HTTP answer."""
    import ssl
    import urllib.request

    import httpx

    from test_tls import make_certs

    (tmp_path / "certs").mkdir()
    certs = make_certs(tmp_path / "certs", ["localhost", "127.0.0.1"])
    seen = {}

    def probe(ports):
        url = f"https://127.0.0.1:{ports['http']}/-/healthz"
        ctx = ssl.create_default_context(cafile=certs["ca"])
        try:
            urllib.request.urlopen(url, context=ctx, timeout=10)
        except urllib.error.HTTPError as e:  # no replicas behind it: HAProxy's own status, over TLS
            seen["https"] = e.code
        else:
            seen["https"] = 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{ports['http']}/-/healthz", timeout=5)
        seen["plain"] = "refused"
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):  # a client not trusting the CA
            urllib.request.urlopen(url, context=ssl.create_default_context(), timeout=10)

    run_ray_haproxy(tmp_path, monkeypatch, str(CODE_ROOT / HAPROXY_WRAPPER), admin_host="127.0.0.1",
                    tls={"cert": certs["cert"], "key": certs["key"]}, during=probe)
    assert seen["plain"] == "refused" and isinstance(seen["https"], int), seen
    pem = tmp_path / "haproxy.cfg.tls.pem"
    assert pem.stat().st_mode & 0o077 == 0  # the key's copy is readable by its owner only
