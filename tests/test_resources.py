"""The resource monitor: bottlenecks named in words (pure), and a snapshot of the session cluster
read from Ray's own metrics export."""

from __future__ import annotations

import time

import pytest

from scaling import resources as rs

METRICS = """# HELP ray_node_cpu_utilization x
# TYPE ray_node_cpu_utilization gauge
ray_node_cpu_utilization{ip="10.0.0.1"} 98.0
# TYPE ray_node_mem_used gauge
ray_node_mem_used{ip="10.0.0.1"} 7.0e9
# TYPE ray_node_mem_total gauge
ray_node_mem_total{ip="10.0.0.1"} 8.0e9
# TYPE ray_object_store_memory gauge
ray_object_store_memory{Location="MMAP_SHM",ObjectState="SEALED"} 1.0e9
ray_object_store_memory{Location="SPILLED",ObjectState="SEALED"} 5.0e9
# TYPE ray_node_gpus_utilization gauge
ray_node_gpus_utilization{GpuIndex="0"} 99.0
# TYPE ray_node_gram_used gauge
ray_node_gram_used{GpuIndex="0"} 15000
# TYPE ray_node_gram_available gauge
ray_node_gram_available{GpuIndex="0"} 1000
"""


def test_a_saturated_deployment_on_a_hot_node_is_named_with_what_to_do():
    node = rs.node_from_metrics("n1", "10.0.0.1", 4, 2e9, rs.parse_metrics(METRICS))
    assert node.cpu_percent == 98 and node.memory_percent == pytest.approx(87.5) and node.object_store_percent == 50
    assert [(g.index, g.utilization, g.memory_total_mb) for g in node.gpus] == [("0", 99.0, 16000.0)]
    dep = rs.Deployment("model-tiny-chat", "ChatModelServer", replicas=3, running=3, queued=12, ongoing=24,
                        capacity_per_replica=8, nodes=["n1"])
    calm = rs.Deployment("gateway", "Gateway", replicas=1, running=1, queued=0, ongoing=2, capacity_per_replica=100)
    words = rs.bottlenecks([node], [dep, calm])
    assert words[0] == "model-tiny-chat/ChatModelServer: 3 replicas saturated, queue 12, node CPU 98% — add replicas or CPUs"
    assert "node 10.0.0.1: CPU 98% of 4 — add CPUs or spread replicas" in words
    assert any("GPU 0: 99% busy" in w for w in words) and any("GPU 0: memory 94% used" in w for w in words)
    assert not any("gateway" in w for w in words)


def test_missing_replicas_and_a_long_queue_without_capacity_known():
    dep = rs.Deployment("rag", "RagServer", replicas=2, running=1, queued=9)
    assert rs.bottlenecks([], [dep]) == [
        "rag/RagServer: 1 of 2 replicas running — check `orfeas status` and the replica logs",
        "rag/RagServer: 1 replica, queue 9 — add replicas or CPUs"]
    assert rs.bottlenecks([rs.Node("n", "h", cpus=2, cpu_percent=10)], []) == []


def test_the_monitor_reads_the_session_cluster(ray_cluster):
    import ray

    from config import Settings

    monitor = ray.remote(rs.ResourceMonitor).remote(Settings().to_dict(), interval_s=0.1)
    deadline = time.monotonic() + 60
    while True:  # the reporter agent publishes node figures a few seconds after start
        snap = ray.get(monitor.snapshot.remote())
        node = snap["nodes"][0]
        if node["memory_total"] > 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert node["cpus"] == 8 and node["memory_total"] > 0 and 0 <= node["cpu_percent"] <= 100 * 8
    assert node["object_store_total"] > 0 and isinstance(snap["bottlenecks"], list)
    ray.kill(monitor)


def test_top_renders_a_snapshot():
    from rich.console import Console

    from cluster.monitoring_cli import _view

    snap = {"nodes": [{"address": "10.0.0.1", "cpus": 4, "cpu_percent": 98.0, "memory_percent": 50.0,
                       "memory_total": 8 * 2**30, "object_store_percent": 10.0, "object_store_total": 2**30,
                       "gpus": []}],
            "deployments": [{"app": "gateway", "name": "Gateway", "running": 1, "replicas": 1, "ongoing": 3,
                             "queued": 0, "utilization": 0.03}],
            "bottlenecks": ["node 10.0.0.1: CPU 98% of 4 — add CPUs or spread replicas"]}
    console = Console(record=True, width=160)
    console.print(_view(snap))
    text = console.export_text()
    assert "98% of 4" in text and "gateway/Gateway" in text and "add CPUs" in text
