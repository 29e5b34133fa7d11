"""Policy over the rendered manifests; each rule is shown failing on a broken copy."""

from __future__ import annotations

import pytest
import yaml

from k8s_fixtures import fresh, rendered  # noqa: F401  (fixtures)

from cluster import k8s_render, k8s_validate

find = k8s_render.find_object


@pytest.mark.parametrize("overlay", k8s_render.ALL_TARGETS)
def test_rendered_overlays_pass_policy(rendered, overlay):
    assert k8s_validate.policy_problems(rendered[overlay]) == []


def test_no_latest_anywhere_under_kuberay():
    assert k8s_validate.text_problems() == []


def test_no_latest_text_check_catches_one(tmp_path):
    (tmp_path / "Dockerfile.x").write_text("FROM python:latest\n")
    (tmp_path / "m.yaml").write_text("image: busybox\n")
    problems = k8s_validate.text_problems(tmp_path)
    assert any("python:latest" in p for p in problems), problems


def _problems(objs):
    return k8s_validate.policy_problems(objs)


def _one(problems, *needles):
    assert problems, "the broken manifest passed"
    assert any(all(n in p for n in needles) for p in problems), problems


def _head(objs):
    return find(objs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def test_missing_limits_fail(fresh):
    objs = fresh("dev")
    del _head(objs)["resources"]["limits"]
    _one(_problems(objs), "headGroupSpec", "resources.limits.cpu is missing")


def test_missing_requests_fail_in_a_job_submitter(fresh):
    objs = fresh("jobs")
    job = find(objs, "RayJob", "orfeas-ingest")
    del job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["resources"]["requests"]["memory"]
    _one(_problems(objs), "submitterPodTemplate", "resources.requests.memory is missing")


def test_missing_probe_fails(fresh):
    objs = fresh("gpu")
    sts = find(objs, "StatefulSet", "orfeas-qdrant")
    del sts["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
    _one(_problems(objs), "orfeas-qdrant", "livenessProbe is missing")


@pytest.mark.parametrize("image", ["ghcr.io/orfeas/orfeas:latest", "ghcr.io/orfeas/orfeas", "qdrant/qdrant"])
def test_latest_or_untagged_image_fails(fresh, image):
    objs = fresh("dev")
    _head(objs)["image"] = image
    _one(_problems(objs), "headGroupSpec", "image")


def test_digest_pinned_image_passes(fresh):
    objs = fresh("dev")
    _head(objs)["image"] = "ghcr.io/orfeas/orfeas@sha256:" + "0" * 64
    assert [p for p in _problems(objs) if "image" in p] == []


def test_privileged_container_fails(fresh):
    objs = fresh("dev")
    _head(objs)["securityContext"]["privileged"] = True
    _one(_problems(objs), "runs privileged")


def test_privilege_escalation_and_root_fail(fresh):
    objs = fresh("aws")
    worker = find(objs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["template"]["spec"]
    del worker["containers"][0]["securityContext"]["allowPrivilegeEscalation"]
    worker["securityContext"]["runAsNonRoot"] = False
    worker["securityContext"]["runAsUser"] = 0
    problems = _problems(objs)
    _one(problems, "gpu-workers", "allowPrivilegeEscalation")
    _one(problems, "gpu-workers", "runAsNonRoot")
    _one(problems, "gpu-workers", "runs as root")


def test_host_path_fails(fresh):
    objs = fresh("dev")
    find(objs, "StatefulSet")["spec"]["template"]["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}})
    _one(_problems(objs), "hostPath")


def test_import_path_that_does_not_import_fails(fresh):
    objs = fresh("dev")
    rs = find(objs, "RayService")
    cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    cfg["applications"][0]["import_path"] = "serve.no_such_module:build_app"
    cfg["applications"][1]["import_path"] = "serve.model_apps:no_such_builder"
    rs["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)
    problems = _problems(objs)
    _one(problems, "serve.no_such_module does not import")
    _one(problems, "has no callable no_such_builder")


def test_every_import_path_is_checked(rendered):
    cfg = yaml.safe_load(find(rendered["gpu"], "RayService")["spec"]["serveConfigV2"])
    paths = {a["import_path"] for a in cfg["applications"]}
    assert paths == {
        "serve.gateway.app:build_app",
        "serve.model_apps:build_model_app",
        "models.engines.vllm_engine:build_vllm_app",
        "serve.rag_app:build_app",
        "serve.agents_app:build_workflows_app",
        "serve.agents_app:build_agents_app",
    }


def test_missing_entrypoint_module_fails(fresh):
    objs = fresh("jobs")
    find(objs, "RayJob", "orfeas-ingest")["spec"]["entrypoint"] = "python -m jobs.no_such_job --x"
    find(objs, "RayJob", "orfeas-reindex")["spec"]["entrypoint"] = "ray job submit -- echo hi"
    problems = _problems(objs)
    _one(problems, "orfeas-ingest", "jobs.no_such_job does not exist")
    _one(problems, "orfeas-reindex", "is not `python -m")


def test_entrypoint_module_outside_the_repository_fails(fresh):
    objs = fresh("jobs")
    find(objs, "RayJob", "orfeas-ingest")["spec"]["entrypoint"] = "python -m json.tool"
    _one(_problems(objs), "resolves outside the repository")


def test_vllm_model_without_a_matching_gpu_group_fails(fresh):
    objs = fresh("aws")
    groups = find(objs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    groups[1]["rayStartParams"]["resources"] = '"{\\"accelerator_type:T4\\": 1}"'
    _one(_problems(objs), "qwen2.5-7b-instruct", "type A10G", "T4")


def test_vllm_model_on_a_cluster_without_gpus_fails(fresh):
    objs = fresh("gpu")
    groups = find(objs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    del groups[1]
    _one(_problems(objs), "qwen2.5-7b-instruct", "declare nothing")


def test_data_volume_without_the_state_resource_fails(fresh):
    objs = fresh("dev")
    cluster = find(objs, "RayService")["spec"]["rayClusterConfig"]
    del cluster["headGroupSpec"]["rayStartParams"]["resources"]
    cluster["workerGroupSpecs"][0]["rayStartParams"]["resources"] = '"{\\"orfeas_state\\": 1}"'
    problems = _problems(objs)
    _one(problems, "headGroupSpec mounts a PersistentVolumeClaim", "orfeas_state")
    _one(problems, "workerGroupSpecs[cpu-workers] advertises 'orfeas_state' but mounts no PersistentVolumeClaim")


def test_gpu_on_the_head_fails(fresh):
    objs = fresh("gpu")
    _head(objs)["resources"]["limits"]["nvidia.com/gpu"] = "1"
    _one(_problems(objs), "the head must not take GPUs")


def test_autoscaling_off_or_unbounded_fails(fresh):
    objs = fresh("dev")
    cluster = find(objs, "RayService")["spec"]["rayClusterConfig"]
    cluster["enableInTreeAutoscaling"] = False
    cluster["workerGroupSpecs"][0]["minReplicas"] = 5
    del cluster["workerGroupSpecs"][0]["idleTimeoutSeconds"]
    problems = _problems(objs)
    _one(problems, "enableInTreeAutoscaling")
    _one(problems, "minReplicas <= maxReplicas")
    _one(problems, "idleTimeoutSeconds is missing")


def test_hpa_on_ray_fails(fresh):
    objs = fresh("dev") + [{
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "bad", "namespace": "orfeas"},
        "spec": {"scaleTargetRef": {"apiVersion": "ray.io/v1", "kind": "RayCluster", "name": "x"},
                 "minReplicas": 1, "maxReplicas": 3},
    }]
    _one(_problems(objs), "HorizontalPodAutoscaler/orfeas/bad", "KubeRay autoscaler")


def test_secret_values_fail(fresh):
    objs = fresh("dev") + [{
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "leak", "namespace": "orfeas"},
        "stringData": {"api-key": "sk-123"},
    }]
    _head(objs)["env"].append({"name": "OPENAI_API_KEY", "value": "sk-123"})
    find(objs, "ConfigMap", "orfeas-env")["data"]["QDRANT_API_KEY"] = "abc"
    problems = _problems(objs)
    _one(problems, "Secret/orfeas/leak")
    _one(problems, "OPENAI_API_KEY carries a literal value")
    _one(problems, "QDRANT_API_KEY looks like a secret")


def test_ingress_rules(fresh):
    objs = fresh("dev")
    api, dash = find(objs, "Ingress", "orfeas-api"), find(objs, "Ingress", "orfeas-dashboard")
    api["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"] = "8m"
    del api["metadata"]["annotations"]["nginx.ingress.kubernetes.io/limit-rps"]
    del dash["metadata"]["annotations"]["nginx.ingress.kubernetes.io/auth-type"]
    del dash["spec"]["tls"]
    problems = _problems(objs)
    _one(problems, "orfeas-api", "differs from the gateway's limits.max_body_bytes 1048576")
    _one(problems, "orfeas-api", "limit-rps is missing")
    _one(problems, "orfeas-dashboard", "without authentication")
    _one(problems, "orfeas-dashboard", "needs TLS")
