"""`orfeas monitoring up|down`: a local Prometheus and Alertmanager (Debian's `prometheus` and
`prometheus-alertmanager`) bound to 127.0.0.1, scraping Ray's metrics export of every node with
kuberay/monitoring's rules, and sending alerts to ORFEAS's alert receiver.

Configs, data and pid files live under <data_dir>/monitoring/. The processes are detached (they
outlive the command) and `down` stops them by their pid files.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from config import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
RULES = REPO_ROOT / "kuberay" / "monitoring" / "rules" / "orfeas.rules.yml"
PROMETHEUS_BINARIES = ("prometheus",)
ALERTMANAGER_BINARIES = ("prometheus-alertmanager", "alertmanager")
RAY_DISCOVERY = Path("/tmp/ray/prom_metrics_service_discovery.json")


class MonitoringError(RuntimeError):
    pass


def _binary(names: tuple[str, ...], package: str) -> str:
    for n in names:
        found = shutil.which(n)
        if found:
            return found
    raise MonitoringError(f"{names[0]} is not installed (Debian/Ubuntu: apt-get install {package}; `make install` "
                          "does it where it can)")


def home(settings: Settings) -> Path:
    return settings.resolved_data_dir() / "monitoring"


def ray_targets() -> list[str]:
    """Every live node's metrics export address (host:port) of the connected cluster."""
    import ray

    return [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes()
            if n.get("alive") and n.get("MetricsExportPort")]


def alert_receiver_url(settings: Settings) -> str:
    from config.names import ALERTS_PREFIX

    return f"http://{settings.serve.host}:{settings.serve.port}{ALERTS_PREFIX}/alertmanager"


def duration(seconds: float) -> str:
    """A Prometheus/Alertmanager duration: whole units only ("1.5s" is refused), so milliseconds."""
    return f"{max(round(seconds * 1000), 1)}ms"


def prometheus_config(settings: Settings, targets: list[str], rules: list[Path]) -> dict[str, Any]:
    m = settings.monitoring
    interval = duration(m.scrape_interval_s)
    ray_job: dict[str, Any] = {"job_name": "ray", "static_configs": [{"targets": targets}]}
    if RAY_DISCOVERY.exists():  # nodes that join later (the head's dashboard keeps this file)
        ray_job["file_sd_configs"] = [{"files": [str(RAY_DISCOVERY)]}]
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(r) for r in rules],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{m.alertmanager_port}"]}]}]},
        "scrape_configs": [ray_job],
    }


def alertmanager_config(settings: Settings, receiver_url: str) -> dict[str, Any]:
    """Every alert to ORFEAS's alert receiver, which routes by severity and team itself."""
    m = settings.monitoring
    group = duration(max(m.scrape_interval_s / 3, 1))
    return {
        "route": {"receiver": "orfeas", "group_by": ["alertname", "team"], "group_wait": group,
                  "group_interval": group, "repeat_interval": "4h"},
        "receivers": [{"name": "orfeas", "webhook_configs": [{"url": receiver_url, "send_resolved": True}]}],
    }


def _ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise MonitoringError(f"{url} did not answer within {timeout_s:g}s")
        time.sleep(0.2)


def _start(name: str, cmd: list[str], where: Path) -> int:
    log = open(where / f"{name}.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=where)
    (where / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def _alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child that exited: reaped now
            return False
    except ChildProcessError:  # not our child (started by an earlier command)
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _pid(where: Path, name: str) -> int | None:
    f = where / f"{name}.pid"
    try:
        pid = int(f.read_text())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def up(settings: Settings, targets: list[str] | None = None, receiver_url: str | None = None,
       rules: list[Path] | None = None, timeout_s: float = 30.0) -> dict[str, Any]:
    """Start both (or keep the running ones); returns their URLs and the scrape targets."""
    prometheus = _binary(PROMETHEUS_BINARIES, "prometheus")
    alertmanager = _binary(ALERTMANAGER_BINARIES, "prometheus-alertmanager")
    where = home(settings)
    (where / "prometheus-data").mkdir(parents=True, exist_ok=True)
    (where / "alertmanager-data").mkdir(parents=True, exist_ok=True)
    targets = targets if targets is not None else ray_targets()
    m = settings.monitoring
    (where / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(settings, targets, rules or [RULES])))
    (where / "alertmanager.yml").write_text(yaml.safe_dump(
        alertmanager_config(settings, receiver_url or alert_receiver_url(settings))))
    prom_url, am_url = f"http://127.0.0.1:{m.prometheus_port}", f"http://127.0.0.1:{m.alertmanager_port}"
    if _pid(where, "alertmanager") is None:
        _start("alertmanager", [alertmanager, f"--config.file={where / 'alertmanager.yml'}",
                                f"--storage.path={where / 'alertmanager-data'}",
                                f"--web.listen-address=127.0.0.1:{m.alertmanager_port}",
                                "--cluster.listen-address="], where)
    if _pid(where, "prometheus") is None:
        _start("prometheus", [prometheus, f"--config.file={where / 'prometheus.yml'}",
                              f"--storage.tsdb.path={where / 'prometheus-data'}",
                              f"--web.listen-address=127.0.0.1:{m.prometheus_port}", "--web.enable-lifecycle"],
               where)
    else:  # running: load the new config
        httpx.post(prom_url + "/-/reload", timeout=5)
    _ready(am_url + "/-/ready", timeout_s)
    _ready(prom_url + "/-/ready", timeout_s)
    return {"prometheus": prom_url, "alertmanager": am_url, "targets": targets,
            "receiver": receiver_url or alert_receiver_url(settings)}


def down(settings: Settings, timeout_s: float = 10.0) -> list[str]:
    """Stop both; returns what was stopped."""
    where = home(settings)
    stopped = []
    for name in ("prometheus", "alertmanager"):
        pid = _pid(where, name)
        if pid is None:
            continue
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
        (where / f"{name}.pid").unlink(missing_ok=True)
        stopped.append(name)
    return stopped


def status(settings: Settings) -> dict[str, Any]:
    where = home(settings)
    return {name: {"running": _pid(where, name) is not None} for name in ("prometheus", "alertmanager")}


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1)
