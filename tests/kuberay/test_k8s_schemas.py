"""Schemas: built-in objects against Kubernetes' (kubernetes-validate, strict), KubeRay objects
against the v1.7 CRDs' openAPIV3Schema (jsonschema, strict), monitors against their minimal
schema. Each validator is shown failing on a manifest broken on purpose."""

from __future__ import annotations

import pytest

from k8s_fixtures import fresh, rendered  # noqa: F401  (fixtures)

from cluster import k8s_render, k8s_schemas

find = k8s_render.find_object


@pytest.mark.parametrize("overlay", k8s_render.ALL_TARGETS)
def test_every_object_validates(rendered, overlay):
    assert k8s_schemas.all_schema_problems(rendered[overlay]) == []


def test_crds_are_kuberay_v1_with_every_kind():
    kinds = {kind for (api, kind) in k8s_schemas.crd_schemas() if api == "ray.io/v1"}
    assert kinds == {"RayCluster", "RayService", "RayJob", "RayCronJob"}


def _one(problems: list[str], *needles: str) -> None:
    assert problems, "the broken manifest validated"
    assert any(all(n in p for n in needles) for p in problems), problems


# -- built-in kinds (kubernetes-validate) -------------------------------------------------------

def test_builtin_unknown_field_fails(fresh):
    sts = find(fresh("dev"), "StatefulSet", "orfeas-qdrant")
    sts["spec"]["replica"] = 2
    _one(k8s_schemas.all_schema_problems([sts]), "StatefulSet/orfeas/orfeas-qdrant", "replica")


def test_builtin_wrong_type_fails(fresh):
    ing = find(fresh("dev"), "Ingress", "orfeas-api")
    ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"]["number"] = "eight thousand"
    _one(k8s_schemas.all_schema_problems([ing]), "Ingress/orfeas/orfeas-api", "number")


def test_builtin_missing_required_fails(fresh):
    pdb = find(fresh("dev"), "NetworkPolicy", "qdrant")
    del pdb["spec"]["podSelector"]
    _one(k8s_schemas.all_schema_problems([pdb]), "podSelector")


def test_unknown_kind_fails():
    obj = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    _one(k8s_schemas.all_schema_problems([obj]), "Widget")


# -- KubeRay kinds (CRD openAPIV3Schema) --------------------------------------------------------

def test_rayservice_typo_fails(fresh):
    rs = find(fresh("dev"), "RayService")
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    _one(k8s_schemas.schema_problems(rs), "workerGroupSpecs.0", "minReplica")


def test_rayservice_missing_required_fails(fresh):
    rs = find(fresh("gpu"), "RayService")
    del rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["maxReplicas"]
    _one(k8s_schemas.schema_problems(rs), "maxReplicas")


def test_rayservice_bad_enum_fails(fresh):
    rs = find(fresh("dev"), "RayService")
    rs["spec"]["rayClusterConfig"]["autoscalerOptions"]["upscalingMode"] = "Eager"
    _one(k8s_schemas.schema_problems(rs), "upscalingMode")


def test_rayjob_wrong_type_fails(fresh):
    job = find(fresh("jobs"), "RayJob", "orfeas-ingest")
    job["spec"]["shutdownAfterJobFinishes"] = "yes"
    _one(k8s_schemas.schema_problems(job), "shutdownAfterJobFinishes")


def test_rayjob_pod_template_is_checked_deep_down(fresh):
    job = find(fresh("jobs"), "RayJob", "orfeas-reindex")
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    _one(k8s_schemas.schema_problems(job), "imagePullPolcy")


def test_raycronjob_missing_schedule_fails(fresh):
    cron = find(fresh("dev"), "RayCronJob")
    del cron["spec"]["schedule"]
    _one(k8s_schemas.schema_problems(cron), "schedule")


def test_unserved_kuberay_version_fails(fresh):
    rs = find(fresh("dev"), "RayService")
    rs["apiVersion"] = "ray.io/v2"
    _one(k8s_schemas.schema_problems(rs), "no KubeRay CRD")


# -- Prometheus Operator kinds ------------------------------------------------------------------

def test_podmonitor_typo_fails(fresh):
    pm = find(fresh("dev"), "PodMonitor")
    pm["spec"]["podMetricsEndpoint"] = pm["spec"].pop("podMetricsEndpoints")
    _one(k8s_schemas.schema_problems(pm), "podMetricsEndpoint")


def test_servicemonitor_bad_interval_fails(fresh):
    sm = find(fresh("dev"), "ServiceMonitor", "orfeas-qdrant")
    sm["spec"]["endpoints"][0]["interval"] = "often"
    _one(k8s_schemas.schema_problems(sm), "interval")
