"""`orfeas k8s` commands, run as a user runs them (a subprocess), no cluster anywhere."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from cluster import k8s_render

ROOT = k8s_render.REPO_ROOT


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "cluster.k8s_cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_render_prints_an_overlay_and_check_passes():
    out = run("render", "--overlay", "dev")
    assert out.returncode == 0, out.stderr
    objs = [o for o in yaml.safe_load_all(out.stdout) if o]
    assert k8s_render.find_object(objs, "RayService")["spec"]["serveConfigV2"]
    check = run("render", "--check")
    assert check.returncode == 0, check.stderr


def test_render_writes_every_overlay(tmp_path):
    out = run("render", "--overlay", "all", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{o}.yaml" for o in k8s_render.OVERLAYS)


def test_render_unknown_overlay_is_a_clear_error():
    out = run("render", "--overlay", "moon")
    assert out.returncode == 1
    assert "unknown overlay 'moon'" in out.stderr and "Traceback" not in out.stderr


def test_submit_job_dry_run_prints_the_rayjob():
    out = run("submit-job", "ingest", "--dry-run", "--source", "s3://bucket/docs", "--name", "orfeas-ingest-t")
    assert out.returncode == 0, out.stderr
    job = yaml.safe_load(out.stdout)
    assert job["kind"] == "RayJob" and job["metadata"]["name"] == "orfeas-ingest-t"
    assert job["metadata"]["namespace"] == "orfeas"
    assert job["spec"]["entrypoint"] == "python -m jobs.ingest s3://bucket/docs"
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_submit_job_with_unreachable_cluster_is_a_clear_error(tmp_path):
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "nowhere",
        "clusters": [{"name": "nowhere", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "nobody", "user": {"token": "t"}}],
        "contexts": [{"name": "nowhere", "context": {"cluster": "nowhere", "user": "nobody"}}],
    }))
    out = run("submit-job", "reindex", env={"KUBECONFIG": str(kubeconfig)})
    assert out.returncode == 1
    assert "https://127.0.0.1:9 is unreachable" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_submit_job_without_any_cluster_config_is_a_clear_error(tmp_path):
    out = run("submit-job", "ingest", env={"KUBECONFIG": str(tmp_path / "missing"), "KUBERNETES_SERVICE_HOST": ""})
    assert out.returncode == 1
    assert "no Kubernetes cluster configured" in out.stderr and "Traceback" not in out.stderr


def test_submit_job_unknown_job():
    out = run("submit-job", "teleport", "--dry-run")
    assert out.returncode == 1 and "unknown job 'teleport'" in out.stderr
