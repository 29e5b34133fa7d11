"""The resource monitor: per node CPU, memory, object store and GPU (utilisation and memory), per
Serve deployment replicas and queue depth, and the bottlenecks named in words.

    monitor = resource_monitor(settings)         # the detached actor (one per cluster)
    ray.get(monitor.snapshot.remote())           # {"nodes": [...], "deployments": [...], "bottlenecks": [...]}

What it reads is what Ray already measures: each node's metrics export (Ray's reporter agent
samples CPU, memory, object store and GPUs through NVML/`nvidia-smi` where present; Serve's
handles and replicas report queued and ongoing requests), scraped by the actor like Prometheus
would; `serve.status()` for replica counts, the catalog for each deployment's capacity.
`sample_nvidia_smi` reads the local GPUs directly when Ray reports none. Judging (`bottlenecks`)
is a pure function of a snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from config import Settings

log = logging.getLogger(__name__)

ACTOR_NAME = "resource-monitor"


@dataclass
class Gpu:
    index: str
    utilization: float  # percent
    memory_used_mb: float
    memory_total_mb: float


@dataclass
class Node:
    node_id: str
    address: str
    cpus: float = 0.0
    cpu_percent: float = 0.0
    memory_used: float = 0.0
    memory_total: float = 0.0
    object_store_used: float = 0.0
    object_store_total: float = 0.0
    gpus: list[Gpu] = field(default_factory=list)

    @property
    def memory_percent(self) -> float:
        return 100 * self.memory_used / self.memory_total if self.memory_total else 0.0

    @property
    def object_store_percent(self) -> float:
        return 100 * self.object_store_used / self.object_store_total if self.object_store_total else 0.0


@dataclass
class Deployment:
    app: str
    name: str
    replicas: int = 0
    running: int = 0
    queued: float = 0.0  # requests waiting at the handles for a replica
    ongoing: float = 0.0  # requests being processed by the replicas
    capacity_per_replica: int | None = None  # max_ongoing_requests, when known
    nodes: list[str] = field(default_factory=list)

    @property
    def utilization(self) -> float | None:
        cap = (self.capacity_per_replica or 0) * max(self.running, 1)
        return self.ongoing / cap if cap else None


@dataclass
class Thresholds:
    cpu_percent: float = 90.0
    memory_percent: float = 90.0
    object_store_percent: float = 80.0
    gpu_percent: float = 95.0
    gpu_memory_percent: float = 90.0
    saturated: float = 0.9  # ongoing / capacity
    queue: float = 5.0


def bottlenecks(nodes: list[Node], deployments: list[Deployment], t: Thresholds | None = None) -> list[str]:
    """What limits the platform now, worst first, each with what to do."""
    t = t or Thresholds()
    by_id = {n.node_id: n for n in nodes}
    out: list[tuple[float, str]] = []
    for d in deployments:
        label = d.app if d.name in ("", d.app) else f"{d.app}/{d.name}"
        if d.running < d.replicas:
            out.append((3.0, f"{label}: {d.running} of {d.replicas} replicas running — check `orfeas status` "
                             "and the replica logs"))
        util = d.utilization
        saturated = util is not None and util >= t.saturated
        if saturated or d.queued > t.queue:
            hot = [by_id[n] for n in d.nodes if n in by_id and by_id[n].cpu_percent >= t.cpu_percent]
            parts = [f"{d.running} replica{'s' if d.running != 1 else ''} saturated" if saturated
                     else f"{d.running} replica{'s' if d.running != 1 else ''}", f"queue {d.queued:.0f}"]
            if hot:
                parts.append(f"node CPU {max(n.cpu_percent for n in hot):.0f}%")
            fix = "add replicas or CPUs" if hot or not d.nodes else "add replicas"
            out.append((2.0 + (util or 0) + d.queued / 100, f"{label}: {', '.join(parts)} — {fix}"))
    for n in nodes:
        if n.cpu_percent >= t.cpu_percent:
            out.append((1.5, f"node {n.address}: CPU {n.cpu_percent:.0f}% of {n.cpus:g} — add CPUs or spread replicas"))
        if n.memory_percent >= t.memory_percent:
            out.append((1.8, f"node {n.address}: memory {n.memory_percent:.0f}% used — add memory or fewer replicas "
                             "per node"))
        if n.object_store_percent >= t.object_store_percent:
            out.append((1.2, f"node {n.address}: object store {n.object_store_percent:.0f}% full — objects spill "
                             "to disk; raise object_store_memory or free references"))
        for g in n.gpus:
            if g.utilization >= t.gpu_percent:
                out.append((1.6, f"node {n.address} GPU {g.index}: {g.utilization:.0f}% busy — add GPU replicas"))
            if g.memory_total_mb and 100 * g.memory_used_mb / g.memory_total_mb >= t.gpu_memory_percent:
                out.append((1.4, f"node {n.address} GPU {g.index}: memory "
                                 f"{100 * g.memory_used_mb / g.memory_total_mb:.0f}% used — smaller batches, "
                                 "a quantised model or another GPU"))
    return [msg for _, msg in sorted(out, key=lambda x: -x[0])]


# ------------------------------------------------------------------ reading what Ray measures


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text -> {series name: [(labels, value)]}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def _sum(series, **match) -> float:
    return sum(v for labels, v in series if all(labels.get(k) == x for k, x in match.items()))


def node_from_metrics(node_id: str, address: str, cpus: float, object_store_total: float,
                      m: dict[str, list[tuple[dict[str, str], float]]]) -> Node:
    n = Node(node_id, address, cpus=cpus, object_store_total=object_store_total)
    n.cpu_percent = max((v for _, v in m.get("ray_node_cpu_utilization", [])), default=0.0)
    n.memory_used = max((v for _, v in m.get("ray_node_mem_used", [])), default=0.0)
    n.memory_total = max((v for _, v in m.get("ray_node_mem_total", [])), default=0.0)
    n.object_store_used = sum(v for labels, v in m.get("ray_object_store_memory", [])
                              if labels.get("Location") in ("MMAP_SHM", "MMAP_DISK", "WORKER_HEAP"))
    gpus: dict[str, Gpu] = {}
    for name, attr in (("ray_node_gpus_utilization", "utilization"), ("ray_node_gram_used", "memory_used_mb"),
                       ("ray_node_gram_available", "memory_total_mb")):
        for labels, v in m.get(name, []):
            idx = labels.get("GpuIndex", "0")
            g = gpus.setdefault(idx, Gpu(idx, 0.0, 0.0, 0.0))
            setattr(g, attr, getattr(g, attr) + v if attr == "memory_total_mb" else v)
    for g in gpus.values():
        g.memory_total_mb += g.memory_used_mb  # Ray reports available, not total
    n.gpus = sorted(gpus.values(), key=lambda g: g.index)
    return n


def sample_nvidia_smi() -> list[Gpu]:
    """This machine's GPUs from `nvidia-smi` (empty when it is not installed or fails)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=index,utilization.gpu,memory.used,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        try:
            idx, util, used, total = (x.strip() for x in line.split(","))
            gpus.append(Gpu(idx, float(util), float(used), float(total)))
        except ValueError:
            continue
    return gpus


def capacities(settings: Settings) -> dict[str, int]:
    """max_ongoing_requests per Serve application, from the catalog and the app settings."""
    from config.names import GATEWAY_APP, model_app_name

    caps = {model_app_name(m.id): m.max_ongoing_requests for m in settings.models}
    caps[GATEWAY_APP] = settings.gateway.max_ongoing_requests
    return caps


class ResourceMonitor:
    """Samples every `interval_s` (only while someone asks: a snapshot older than that is taken
    again), keeps the last one."""

    def __init__(self, settings: dict[str, Any], interval_s: float = 1.0):
        from config import settings_from_dict

        self.settings = settings_from_dict(settings)
        self.interval_s = interval_s
        self.caps = capacities(self.settings)
        self._last: dict[str, Any] | None = None
        self._lock = asyncio.Lock()

    async def snapshot(self) -> dict[str, Any]:
        async with self._lock:
            if self._last is None or time.time() - self._last["time"] >= self.interval_s:
                self._last = await self._sample()
            return self._last

    async def _scrape(self, client, address: str) -> dict:
        try:
            r = await client.get(f"http://{address}/metrics")
            return parse_metrics(r.text) if r.status_code == 200 else {}
        except Exception as e:  # a node that does not answer is reported without its figures
            log.debug("metrics of %s unreadable: %r", address, e)
            return {}

    async def _sample(self) -> dict[str, Any]:
        import httpx
        import ray
        from ray import serve

        alive = [n for n in ray.nodes() if n.get("Alive") or n.get("alive")]
        async with httpx.AsyncClient(timeout=3) as client:
            scraped = await asyncio.gather(*(self._scrape(client, f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}")
                                             for n in alive))
        nodes = []
        merged: dict[str, list] = {}
        for n, m in zip(alive, scraped):
            res = n.get("Resources", {})
            node = node_from_metrics(n["NodeID"], n["NodeManagerAddress"], res.get("CPU", 0.0),
                                     res.get("object_store_memory", 0.0), m)
            if not node.gpus and res.get("GPU"):
                node.gpus = await asyncio.to_thread(sample_nvidia_smi)
            nodes.append(node)
            for k, v in m.items():
                merged.setdefault(k, []).extend(v)
        deployments = []
        try:
            status = await asyncio.to_thread(serve.status)
            apps = status.applications
        except Exception:  # Serve not started
            apps = {}
        where = await asyncio.to_thread(_replica_nodes)
        for app_name, app in apps.items():
            for dep_name, dep in app.deployments.items():
                states = {getattr(k, "value", str(k)): v for k, v in (dep.replica_states or {}).items()}
                running = states.get("RUNNING", 0)
                target = getattr(dep, "target_num_replicas", None) or sum(states.values())
                deployments.append(Deployment(
                    app_name, dep_name, replicas=target, running=running,
                    queued=_sum(merged.get("ray_serve_deployment_queued_queries", []), application=app_name,
                                deployment=dep_name),
                    ongoing=_sum(merged.get("ray_serve_replica_processing_queries", []), application=app_name,
                                 deployment=dep_name),
                    capacity_per_replica=self.caps.get(app_name),
                    nodes=where.get((app_name, dep_name)) or ([nodes[0].node_id] if len(nodes) == 1 else [])))
        return {"time": time.time(), "nodes": [{**asdict(n), "memory_percent": round(n.memory_percent, 1),
                                                "object_store_percent": round(n.object_store_percent, 1)}
                                               for n in nodes],
                "deployments": [{**asdict(d), "utilization": d.utilization} for d in deployments],
                "bottlenecks": bottlenecks(nodes, deployments)}


def _replica_nodes() -> dict[tuple[str, str], list[str]]:
    """(app, deployment) -> the nodes its replicas run on (Ray's state API; empty without it)."""
    try:
        from ray.util.state import list_actors

        actors = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False)
    except Exception:  # no dashboard: the state API is unavailable
        return {}
    out: dict[tuple[str, str], list[str]] = {}
    for a in actors:
        parts = (a.class_name or "").split(":")
        if len(parts) == 3 and parts[0] == "ServeReplica":
            out.setdefault((parts[1], parts[2]), []).append(a.node_id)
    return out


def resource_monitor(settings: Settings):
    """Get or create the monitor actor (one per cluster)."""
    from config.actors import detached_actor

    return detached_actor(ResourceMonitor, ACTOR_NAME, settings.to_dict(), max_restarts=-1)
