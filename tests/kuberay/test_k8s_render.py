"""Rendering: every overlay builds, serveConfigV2 is the Serve config of orfeas.yaml and the
committed copies are current, and the built-in renderer agrees with `kubectl kustomize`."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from k8s_fixtures import fresh, rendered  # noqa: F401  (fixtures)

from cluster import k8s_render
from config import load_settings
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
    assert k8s["http_options"] == {"host": "0.0.0.0", "port": 8000}
    gateway = next(a for a in k8s["applications"] if a["name"] == "gateway")
    assert gateway["route_prefix"] == "/"
    assert gateway["args"]["settings"]["data_dir"] == k8s_render.DATA_DIR
    local_gw = next(a for a in local["applications"] if a["name"] == "gateway")["args"]["settings"]
    for section in ("gateway", "limits", "auth"):
        assert gateway["args"]["settings"][section] == local_gw[section]
    # Model directories under the repository are where the image keeps the repository.
    tiny = next(a for a in k8s["applications"] if a["name"] == "model-tiny-chat")
    assert tiny["args"]["model"]["source"] == f"{k8s_render.APP_DIR}/data/models/tiny-chat"


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


def test_renderer_rejects_a_patch_that_matches_nothing(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches:\n  - path: p.yaml\n    target: {kind: ConfigMap, name: other}\n"
    )
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n")
    (tmp_path / "p.yaml").write_text("- {op: add, path: /data, value: {}}\n")
    with pytest.raises(k8s_render.RenderError, match="matches no resource"):
        k8s_render.build(tmp_path)


def test_renderer_rejects_kustomize_features_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nimages: [{name: x, newTag: '1'}]\n")
    with pytest.raises(k8s_render.RenderError, match="not supported"):
        k8s_render.build(tmp_path)


def _kubectl_kustomize_ok() -> bool:
    if not shutil.which("kubectl"):
        return False
    out = subprocess.run(["kubectl", "version", "--client"], capture_output=True, text=True).stdout
    return "Kustomize Version: v5" in out or "Kustomize Version: v4" in out


@pytest.mark.skipif(not _kubectl_kustomize_ok(), reason="kubectl with kustomize v4+ is not installed")
@pytest.mark.parametrize("overlay", ALL)
def test_builtin_renderer_matches_kubectl_kustomize(rendered, overlay):
    directory = k8s_render.JOBS_DIR if overlay == "jobs" else k8s_render.OVERLAYS_DIR / overlay
    out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=True).stdout
    theirs = {k8s_render.object_id(o): o for o in yaml.safe_load_all(out) if o}
    mine = {k8s_render.object_id(o): o for o in rendered[overlay]}
    assert set(mine) == set(theirs)
    for key in mine:
        assert k8s_render.dumps_json(mine[key]) == k8s_render.dumps_json(theirs[key]), key
