"""Offline validation of rendered manifests, no cluster needed: the schemas (cluster.k8s_schemas)
and ORFEAS's policy.

- Policy: requests, limits and probes on every container, no `latest` or untagged images, no
  privileged containers, every Serve `import_path` imports, every RayJob entrypoint module
  exists, vLLM models fit a GPU group, the Ray group that mounts the data volume advertises
  the durable-state resource, secrets only referenced, Ray pods never under an HPA.

Every function returns a list of problems (strings naming the object and the field); empty is
valid.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cluster.k8s_render import REPO_ROOT, object_id
from cluster.k8s_schemas import KUBERAY_KINDS, all_schema_problems
from config import ModelSpec, settings_from_dict
from config.actors import STATE_RESOURCE
from config.names import GATEWAY_APP

# ---------------------------------------------------------------------------------------------
# walking pod templates


def pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) for every pod template in an object, KubeRay's nested ones included."""
    spec = obj.get("spec") or {}
    kind = obj.get("kind")
    if kind == "Pod":
        yield "spec", spec
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        yield "spec.template.spec", (spec.get("template") or {}).get("spec") or {}
    elif kind == "CronJob":
        yield "spec.jobTemplate.spec.template.spec", spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind == "RayCluster":
        yield from _ray_cluster_pods(spec, "spec")
    elif kind == "RayService":
        yield from _ray_cluster_pods(spec.get("rayClusterConfig") or {}, "spec.rayClusterConfig")
    elif kind == "RayJob":
        yield from _ray_job_pods(spec, "spec")
    elif kind == "RayCronJob":
        yield from _ray_job_pods(spec.get("jobTemplate") or {}, "spec.jobTemplate")


def _ray_cluster_pods(cluster: dict[str, Any], where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    head = cluster.get("headGroupSpec") or {}
    yield f"{where}.headGroupSpec.template.spec", (head.get("template") or {}).get("spec") or {}
    for g in cluster.get("workerGroupSpecs") or []:
        yield f"{where}.workerGroupSpecs[{g.get('groupName')}].template.spec", (g.get("template") or {}).get("spec") or {}


def _ray_job_pods(job: dict[str, Any], where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if job.get("rayClusterSpec"):
        yield from _ray_cluster_pods(job["rayClusterSpec"], f"{where}.rayClusterSpec")
    if job.get("submitterPodTemplate"):
        yield f"{where}.submitterPodTemplate.spec", job["submitterPodTemplate"].get("spec") or {}


def containers(pod: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for field in ("initContainers", "containers"):
        for c in pod.get(field) or []:
            yield f"{field}[{c.get('name')}]", c


# ---------------------------------------------------------------------------------------------
# policy

_SECRETISH = re.compile(r"(^|_)(API_?KEY|KEY|TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIALS?)(_|$)", re.I)


def _image_problem(image: str) -> str | None:
    if not image:
        return "has no image"
    if "@sha256:" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"image {image!r} has no tag (that means latest)"
    tag = last.rsplit(":", 1)[1]
    if tag == "latest" or tag.endswith("-latest") or tag.startswith("latest"):
        return f"image {image!r} uses a latest tag"
    return None


def container_problems(obj: dict[str, Any]) -> list[str]:
    out = []
    for where, pod in pod_specs(obj):
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(flag):
                out.append(f"{object_id(obj)}: {where}.{flag} is set")
        for v in pod.get("volumes") or []:
            if "hostPath" in v:
                out.append(f"{object_id(obj)}: {where}.volumes[{v.get('name')}] mounts a hostPath")
        pod_sc = pod.get("securityContext") or {}
        for cwhere, c in containers(pod):
            at = f"{object_id(obj)}: {where}.{cwhere}"
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in (res.get(part) or {}):
                        out.append(f"{at}: resources.{part}.{r} is missing")
            run_to_completion = cwhere.startswith("initContainers")
            if not run_to_completion:
                for probe in ("readinessProbe", "livenessProbe"):
                    if not c.get(probe):
                        out.append(f"{at}: {probe} is missing")
            problem = _image_problem(c.get("image", ""))
            if problem:
                out.append(f"{at}: {problem}")
            sc = c.get("securityContext") or {}
            if sc.get("privileged"):
                out.append(f"{at}: runs privileged")
            if sc.get("allowPrivilegeEscalation", True):
                out.append(f"{at}: securityContext.allowPrivilegeEscalation must be false")
            if (sc.get("capabilities") or {}).get("add"):
                out.append(f"{at}: adds capabilities {sc['capabilities']['add']}")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                out.append(f"{at}: securityContext.capabilities.drop must include ALL")
            if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
                out.append(f"{at}: runAsNonRoot is not set (container or pod)")
            if sc.get("runAsUser") == 0 or (pod_sc.get("runAsUser") == 0 and "runAsUser" not in sc):
                out.append(f"{at}: runs as root (runAsUser 0)")
            # A value that is a file under one of the container's mounts (RAY_TLS_SERVER_KEY) names
            # where a secret is, not the secret.
            mounts = tuple(m["mountPath"].rstrip("/") + "/" for m in c.get("volumeMounts") or [] if m.get("mountPath"))
            for e in c.get("env") or []:
                if "value" in e and str(e["value"]).startswith(mounts or ("\0",)):
                    continue
                if "value" in e and _SECRETISH.search(e.get("name", "")) and not e.get("name", "").endswith("_ENV") and e["value"] not in ("", "0", "1", "true", "false"):
                    out.append(f"{at}: env {e['name']} carries a literal value; reference a Secret")
    return out


def secret_problems(obj: dict[str, Any]) -> list[str]:
    if obj.get("kind") == "Secret" and (obj.get("data") or obj.get("stringData")):
        return [f"{object_id(obj)}: a Secret with values is in the manifests; reference it, create it out of band"]
    if obj.get("kind") == "ConfigMap":
        return [
            f"{object_id(obj)}: ConfigMap key {k} looks like a secret"
            for k in (obj.get("data") or {})
            if _SECRETISH.search(k) and not k.endswith("_ENV")  # *_ENV names a variable, holds no value
        ]
    return []


def hpa_problems(obj: dict[str, Any]) -> list[str]:
    if obj.get("kind") == "HorizontalPodAutoscaler":
        target = (obj.get("spec") or {}).get("scaleTargetRef") or {}
        if target.get("kind") in KUBERAY_KINDS or str(target.get("apiVersion", "")).startswith("ray.io/"):
            return [f"{object_id(obj)}: Ray pods scale through the KubeRay autoscaler, not an HPA"]
    return []


def _ray_clusters(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, cluster spec) of the Ray cluster an object brings up, if any."""
    spec, kind = obj.get("spec") or {}, obj.get("kind")
    if kind == "RayService":
        return [("spec.rayClusterConfig", spec.get("rayClusterConfig") or {})]
    if kind == "RayCluster":
        return [("spec", spec)]
    if kind == "RayJob" and spec.get("rayClusterSpec"):
        return [("spec.rayClusterSpec", spec["rayClusterSpec"])]
    if kind == "RayCronJob" and (spec.get("jobTemplate") or {}).get("rayClusterSpec"):
        return [("spec.jobTemplate.rayClusterSpec", spec["jobTemplate"]["rayClusterSpec"])]
    return []


def autoscaling_problems(obj: dict[str, Any]) -> list[str]:
    out = []
    for where, c in _ray_clusters(obj):
        at = f"{object_id(obj)}: {where}"
        if not c.get("enableInTreeAutoscaling"):
            out.append(f"{at}.enableInTreeAutoscaling must be true")
        head = c.get("headGroupSpec") or {}
        for _, ctr in containers((head.get("template") or {}).get("spec") or {}):
            if any(k.startswith("nvidia.com/") for k in (ctr.get("resources") or {}).get("limits") or {}):
                out.append(f"{at}.headGroupSpec: the head must not take GPUs")
        if obj.get("kind") == "RayService" and (c.get("autoscalerOptions") or {}).get("version") != "v2":
            out.append(f"{at}.autoscalerOptions.version must be v2 (KubeRay autoscaler v2)")
        for g in c.get("workerGroupSpecs") or []:
            name = g.get("groupName")
            lo, hi = g.get("minReplicas"), g.get("maxReplicas")
            if lo is None or hi is None or lo > hi:
                out.append(f"{at}.workerGroupSpecs[{name}]: needs minReplicas <= maxReplicas")
            if g.get("idleTimeoutSeconds") is None:
                out.append(f"{at}.workerGroupSpecs[{name}]: idleTimeoutSeconds is missing")
            pod = (g.get("template") or {}).get("spec") or {}
            if obj.get("kind") == "RayService" and pod.get("restartPolicy") != "Never":
                out.append(f"{at}.workerGroupSpecs[{name}]: autoscaler v2 needs restartPolicy Never on worker pods "
                           "(the autoscaler replaces a failed worker; restarted in place it is miscounted)")
    return out


def _labels(group: dict[str, Any]) -> dict[str, str]:
    """The Ray node labels a group's rayStartParams declare (`--labels k=v,k2=v2`)."""
    raw = (group.get("rayStartParams") or {}).get("labels") or ""
    pairs = [p.split("=", 1) for p in raw.split(",") if "=" in p]
    return {k.strip(): v.strip() for k, v in pairs}


def serve_autoscaling_problems(obj: dict[str, Any]) -> list[str]:
    """Every application of the RayService names each of its deployments' autoscaling_config
    (bounded), so what scales, and how, is in the manifest."""
    cfg = serve_config_of(obj)
    if cfg is None:
        return []
    out = []
    for app in cfg.get("applications") or []:
        deps = app.get("deployments") or []
        at = f"{object_id(obj)}: application {app.get('name')}"
        if not any(d.get("autoscaling_config") for d in deps):
            out.append(f"{at} has no deployment with an autoscaling_config")
        for d in deps:
            a = d.get("autoscaling_config")
            if a is None:
                out.append(f"{at}: deployment {d.get('name')} has no autoscaling_config")
            elif not (0 <= a.get("min_replicas", 1) <= a.get("max_replicas", 1)):
                out.append(f"{at}: deployment {d.get('name')} needs min_replicas <= max_replicas")
    return out


def vllm_placement_problems(obj: dict[str, Any]) -> list[str]:
    """vLLM applications (replicas and Serve's build task, which follows their shared label
    selector) ask for a node label that only GPU groups declare."""
    cfg = serve_config_of(obj)
    if cfg is None:
        return []
    groups = (obj["spec"].get("rayClusterConfig") or {}).get("workerGroupSpecs") or []
    out = []
    for app in cfg.get("applications") or []:
        if app.get("import_path") != "models.engines.vllm_engine:build_vllm_app":
            continue
        at = f"{object_id(obj)}: vLLM application {app.get('name')}"
        selectors = [((d.get("ray_actor_options") or {}).get("label_selector") or {}) for d in app.get("deployments") or []]
        selector = next((s for s in selectors if s), None)
        if not selector:
            out.append(f"{at} has no ray_actor_options.label_selector: it (and its build task, which imports "
                       "vLLM) may land on a CPU-image worker")
            continue
        matching = [g for g in groups if all(_labels(g).get(k) == v for k, v in selector.items())]
        if not matching:
            out.append(f"{at}: no worker group declares the labels {selector}")
        for g in matching:
            if not _gpus(g):
                out.append(f"{at}: its label {selector} matches the non-GPU group {g.get('groupName')}")
    return out


def pdb_problems(obj: dict[str, Any]) -> list[str]:
    """A budget over Ray pods that allows no disruption blocks every node drain (the head is one
    pod: maxUnavailable 0, or minAvailable >= 1, can never be met)."""
    if obj.get("kind") != "PodDisruptionBudget":
        return []
    spec = obj.get("spec") or {}
    labels = (spec.get("selector") or {}).get("matchLabels") or {}
    if not labels.get("app.kubernetes.io/component", "").startswith("ray-"):
        return []
    if spec.get("maxUnavailable") in (0, "0", "0%") or (spec.get("minAvailable") not in (None, 0, "0", "0%")):
        return [f"{object_id(obj)}: allows no disruption of Ray pods, so it blocks node drains"]
    return []


def _custom_resources(group: dict[str, Any]) -> dict[str, Any]:
    """The custom resources a Ray group advertises: rayStartParams `resources` (a quoted JSON
    object, as `ray start --resources` takes it) and the group's own `resources` field."""
    raw = (group.get("rayStartParams") or {}).get("resources")
    found: dict[str, Any] = {}
    if raw:
        text = raw.strip()
        if text.startswith('"') and text.endswith('"'):
            text = text[1:-1].replace('\\"', '"')
        try:
            parsed = json.loads(text)
            if isinstance(parsed, dict):
                found.update(parsed)
        except ValueError:
            pass
    found.update(group.get("resources") or {})
    return found


def _accelerator_types(group: dict[str, Any]) -> set[str]:
    return {k.split(":", 1)[1] for k in _custom_resources(group) if k.startswith("accelerator_type:")}


def _gpus(group: dict[str, Any]) -> float:
    total = 0.0
    for _, c in containers((group.get("template") or {}).get("spec") or {}):
        total += float(((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0))
    return total


def serve_config_of(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj.get("kind") != "RayService":
        return None
    return yaml.safe_load(obj["spec"].get("serveConfigV2") or "") or {}


def import_path_problems(obj: dict[str, Any]) -> list[str]:
    cfg = serve_config_of(obj)
    if cfg is None:
        return []
    out = []
    apps = cfg.get("applications") or []
    if not apps:
        out.append(f"{object_id(obj)}: serveConfigV2 has no applications")
    for app in apps:
        path = app.get("import_path", "")
        module, _, attr = path.partition(":")
        if not module or not attr:
            out.append(f"{object_id(obj)}: application {app.get('name')}: import_path {path!r} is not module:attribute")
            continue
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # any import failure is the finding
            out.append(f"{object_id(obj)}: application {app.get('name')}: {module} does not import: {e!r}")
            continue
        if not callable(getattr(mod, attr, None)):
            out.append(f"{object_id(obj)}: application {app.get('name')}: {module} has no callable {attr}")
    return out


def gpu_problems(obj: dict[str, Any]) -> list[str]:
    """Every vLLM application fits a GPU worker group: its accelerator type and GPU count."""
    cfg = serve_config_of(obj)
    if cfg is None:
        return []
    groups = (obj["spec"].get("rayClusterConfig") or {}).get("workerGroupSpecs") or []
    out = []
    for app in cfg.get("applications") or []:
        args = app.get("args") or {}
        if "model" not in args:
            continue
        try:  # the args carry non-default fields only: read them back with the defaults
            model = ModelSpec.model_validate(args["model"])
        except ValidationError as e:
            out.append(f"{object_id(obj)}: application {app.get('name')}: invalid model args: {e}")
            continue
        if model.engine != "vllm":
            continue
        need, accel = float(model.num_gpus), model.accelerator_type
        fits = [g for g in groups if _gpus(g) >= max(need, 1) and (accel is None or accel in _accelerator_types(g))]
        if not fits:
            declared = {g.get("groupName"): sorted(_accelerator_types(g)) for g in groups if _gpus(g)}
            out.append(
                f"{object_id(obj)}: vLLM model {model.id!r} needs {need:g} GPU(s) of type {accel}; "
                f"GPU groups declare {declared or 'nothing'}"
            )
        for g in fits:
            pod = (g.get("template") or {}).get("spec") or {}
            if not pod.get("tolerations") or not pod.get("nodeSelector"):
                out.append(f"{object_id(obj)}: GPU group {g.get('groupName')} needs tolerations and a nodeSelector")
    return out


def _mounts_a_claim(group: dict[str, Any]) -> bool:
    pod = (group.get("template") or {}).get("spec") or {}
    claims = {v.get("name") for v in pod.get("volumes") or [] if v.get("persistentVolumeClaim")}
    return any(m.get("name") in claims for _, c in containers(pod) for m in c.get("volumeMounts") or [])


def state_resource_problems(obj: dict[str, Any]) -> list[str]:
    """Durable-state actors (config/actors.py, durable=True) land where the persistent volume is:
    a Ray group whose pods mount a PersistentVolumeClaim advertises STATE_RESOURCE, and no other
    group does (its actors would write to a volume that dies with the pod)."""
    out = []
    for where, c in _ray_clusters(obj):
        head = c.get("headGroupSpec") or {}
        groups = [("headGroupSpec", head)] + [(f"workerGroupSpecs[{g.get('groupName')}]", g)
                                              for g in c.get("workerGroupSpecs") or []]
        for name, g in groups:
            at = f"{object_id(obj)}: {where}.{name}"
            advertises = bool(_custom_resources(g).get(STATE_RESOURCE))
            if _mounts_a_claim(g) and not advertises:
                out.append(f"{at} mounts a PersistentVolumeClaim but does not advertise the {STATE_RESOURCE!r} "
                           "resource (rayStartParams resources): durable-state actors would not be placed there")
            elif advertises and not _mounts_a_claim(g):
                out.append(f"{at} advertises {STATE_RESOURCE!r} but mounts no PersistentVolumeClaim: durable-state "
                           "actors placed there would lose their state with the pod")
    return out


def _entrypoint_module(entrypoint: str) -> str | None:
    words = shlex.split(entrypoint)
    for i, w in enumerate(words[:-1]):
        if w == "-m" and words[i - 1].split("/")[-1].startswith("python"):
            return words[i + 1]
    return None


def entrypoint_problems(obj: dict[str, Any]) -> list[str]:
    kind = obj.get("kind")
    if kind == "RayJob":
        entry = obj["spec"].get("entrypoint")
    elif kind == "RayCronJob":
        entry = (obj["spec"].get("jobTemplate") or {}).get("entrypoint")
    else:
        return []
    if not entry:
        return [f"{object_id(obj)}: has no entrypoint"]
    module = _entrypoint_module(entry)
    if module is None:
        return [f"{object_id(obj)}: entrypoint {entry!r} is not `python -m <module> ...`"]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return [f"{object_id(obj)}: entrypoint module {module} does not exist in the repository"]
    origin = Path(spec.origin).resolve()
    if REPO_ROOT not in origin.parents:
        return [f"{object_id(obj)}: entrypoint module {module} resolves outside the repository ({origin})"]
    return []


def _size_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)([kmg]?)", str(text).strip().lower())
    if not m:
        raise ValueError(f"not an nginx size: {text!r}")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2)]


def ingress_problems(objs: list[dict[str, Any]]) -> list[str]:
    """The API ingress enforces the gateway's body limit, rate limits, TLS; the dashboard has auth."""
    out = []
    limit = None
    for o in objs:
        cfg = serve_config_of(o)
        for app in (cfg or {}).get("applications") or []:
            if app.get("name") == GATEWAY_APP and "settings" in (app.get("args") or {}):
                # Non-default settings only: the gateway's replicas fill in the defaults the same way.
                limit = settings_from_dict(app["args"]["settings"]).limits.max_body_bytes
    for o in objs:
        if o.get("kind") != "Ingress":
            continue
        ann = (o.get("metadata") or {}).get("annotations") or {}
        at = object_id(o)
        if not (ann.get("cert-manager.io/cluster-issuer") or ann.get("cert-manager.io/issuer")) or not o["spec"].get("tls"):
            out.append(f"{at}: needs TLS (a cert-manager issuer annotation and spec.tls)")
        for a in ("proxy-body-size", "limit-rps", "limit-connections"):
            if f"nginx.ingress.kubernetes.io/{a}" not in ann:
                out.append(f"{at}: nginx.ingress.kubernetes.io/{a} is missing")
        backends = {
            p["backend"]["service"]["name"] + ":" + str(p["backend"]["service"]["port"].get("number"))
            for r in o["spec"].get("rules") or []
            for p in (r.get("http") or {}).get("paths") or []
        }
        if any(b.endswith(":8265") for b in backends) and not (
            ann.get("nginx.ingress.kubernetes.io/auth-type") or ann.get("nginx.ingress.kubernetes.io/auth-url")
        ):
            out.append(f"{at}: exposes the Ray dashboard without authentication")
        if any(b.endswith(":8000") for b in backends) and limit is not None:
            body = ann.get("nginx.ingress.kubernetes.io/proxy-body-size")
            if body is not None and _size_bytes(body) != limit:
                out.append(f"{at}: proxy-body-size {body} differs from the gateway's limits.max_body_bytes {limit}")
    return out


RAY_TLS_ENV = ("RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT")


def _tls_env_problems(c: dict[str, Any], at: str, mounts: list[dict[str, Any]]) -> list[str]:
    env = {e.get("name"): e.get("value") for e in c.get("env") or []}
    if env.get("RAY_USE_TLS") not in ("1", "true"):
        return [f"{at}: RAY_USE_TLS is not 1 (Ray's gRPC between pods would be plaintext)"]
    dirs = [m["mountPath"].rstrip("/") + "/" for m in mounts if m.get("mountPath")]
    return [f"{at}: {name} {env.get(name)!r} is not a file under one of its volume mounts"
            for name in RAY_TLS_ENV if not str(env.get(name) or "").startswith(tuple(dirs) or ("\0",))]


def _ray_cluster_spec(obj: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    spec = obj.get("spec") or {}
    kind = obj.get("kind")
    if kind == "RayService":
        return "spec.rayClusterConfig", spec.get("rayClusterConfig") or {}
    if kind == "RayCluster":
        return "spec", spec
    if kind == "RayJob" and spec.get("rayClusterSpec"):
        return "spec.rayClusterSpec", spec["rayClusterSpec"]
    if kind == "RayCronJob" and (spec.get("jobTemplate") or {}).get("rayClusterSpec"):
        return "spec.jobTemplate.rayClusterSpec", spec["jobTemplate"]["rayClusterSpec"]
    return None


def ray_tls_problems(obj: dict[str, Any]) -> list[str]:
    """Every Ray cluster runs Ray's TLS: each Ray container and the autoscaler sidecar have
    RAY_USE_TLS=1 and the RAY_TLS_* files on a mounted volume (made by the ray-tls initContainer)."""
    found = _ray_cluster_spec(obj)
    if found is None:
        return []
    where_cluster, cluster = found
    out: list[str] = []
    name = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
    for where, pod in _ray_cluster_pods(cluster, where_cluster):
        ray = (pod.get("containers") or [{}])[0]
        at = f"{name}: {where}.containers[{ray.get('name')}]"
        out += _tls_env_problems(ray, at, ray.get("volumeMounts") or [])
        if not any(c.get("name") == "ray-tls" for c in pod.get("initContainers") or []):
            out.append(f"{name}: {where}: no ray-tls initContainer makes the pod's certificate")
    if cluster.get("enableInTreeAutoscaling"):
        a = cluster.get("autoscalerOptions") or {}
        out += _tls_env_problems(a, f"{name}: {where_cluster}.autoscalerOptions", a.get("volumeMounts") or [])
    return out


def policy_problems(objs: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for o in objs:
        out += ray_tls_problems(o)
        out += container_problems(o)
        out += secret_problems(o)
        out += hpa_problems(o)
        out += autoscaling_problems(o)
        out += serve_autoscaling_problems(o)
        out += vllm_placement_problems(o)
        out += pdb_problems(o)
        out += gpu_problems(o)
        out += state_resource_problems(o)
        out += import_path_problems(o)
        out += entrypoint_problems(o)
    out += ingress_problems(objs)
    return out


def text_problems(root: Path = REPO_ROOT / "kuberay") -> list[str]:
    """No `latest` image tag anywhere under kuberay/ (manifests, Dockerfiles), comments included."""
    out = []
    pattern = re.compile(r"[\w./-]+:latest\b|FROM\s+[^\s:@]+\s*$", re.M)
    for f in sorted(root.rglob("*")):
        if f.is_file() and (f.suffix in (".yaml", ".yml") or f.name.startswith("Dockerfile")):
            for m in pattern.finditer(f.read_text()):
                out.append(f"{f.relative_to(root)}: {m.group(0).strip()!r} is an unpinned image")
    return out


def validate(objs: list[dict[str, Any]]) -> list[str]:
    return all_schema_problems(objs) + policy_problems(objs)
