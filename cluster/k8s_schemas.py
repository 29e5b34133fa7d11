"""Offline schema validation of rendered manifests (cluster.k8s_validate adds the policy checks).

- Built-in kinds validate against Kubernetes' own JSON schemas (`kubernetes-validate`, strict:
  an unknown field is an error, as `kubectl apply --validate=strict` makes it).
- KubeRay kinds validate against the `openAPIV3Schema` of the operator's CRDs (KubeRay v1.7,
  `shared/kuberay/crds`, vendored gzipped in kuberay/crds), made strict the same way: an object
  schema that lists its properties and does not preserve unknown fields rejects any other field.
- Prometheus Operator kinds (PodMonitor, ServiceMonitor) validate against a minimal strict
  schema of the fields ORFEAS uses (their CRDs are not vendored here).

Every function returns a list of problems (strings naming the object and the field); empty is
valid.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import yaml

from cluster.k8s_render import REPO_ROOT, object_id

K8S_VERSION = "1.32"
# The CRDs are 4 MB of YAML: libyaml's loader reads them in a fraction of the pure-Python time.
_FastLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
CRDS_ENV = "ORFEAS_KUBERAY_CRDS"
KUBERAY_KINDS = {"RayCluster", "RayService", "RayJob", "RayCronJob"}
MONITORING_KINDS = {"PodMonitor", "ServiceMonitor"}


# The KubeRay v1.7.0 CRDs, vendored (gzipped) so a clone validates offline anywhere.
VENDORED_CRDS = REPO_ROOT / "kuberay" / "crds"


def crd_dir() -> Path:
    """Where the KubeRay CRDs are: $ORFEAS_KUBERAY_CRDS, else shared/ beside the repository,
    else the vendored copy in kuberay/crds."""
    if os.environ.get(CRDS_ENV):
        return Path(os.environ[CRDS_ENV])
    for candidate in (REPO_ROOT.parent / "shared" / "kuberay" / "crds", REPO_ROOT / "shared" / "kuberay" / "crds",
                      VENDORED_CRDS):
        if candidate.is_dir() and _crd_files(candidate):
            return candidate
    raise FileNotFoundError(
        f"KubeRay CRDs not found: set {CRDS_ENV} or put them in ../shared/kuberay/crds (see kuberay/README.md)"
    )


def _crd_files(directory: Path) -> list[Path]:
    return sorted([*directory.glob("*.yaml"), *directory.glob("*.yaml.gz")])


def _read_crd(path: Path) -> str:
    if path.suffix == ".gz":
        import gzip

        return gzip.decompress(path.read_bytes()).decode()
    return path.read_text()


def _strict(schema: Any) -> Any:
    """Reject unknown fields where the API server would (properties listed, nothing preserved)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict JSON schema, for every served version of every KubeRay CRD."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for f in _crd_files(crd_dir()):
        crd = yaml.load(_read_crd(f), Loader=_FastLoader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            if v.get("served", True):
                out[(f"{group}/{v['name']}", kind)] = _strict(v["schema"]["openAPIV3Schema"])
    return out


@functools.cache
def _crd_validator(api_version: str, kind: str):
    import jsonschema

    schema = crd_schemas().get((api_version, kind))
    if schema is None:
        return None
    return jsonschema.Draft7Validator(schema)


_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _LABELS,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "replacement": {"type": "string"},
        "action": {"type": "string"},
        "separator": {"type": "string"},
    },
}
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string"},
        "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
        "scheme": {"enum": ["http", "https"]},
        "relabelings": {"type": "array", "items": _RELABEL},
        "authorization": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "type": {"type": "string"},
                "credentials": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["key", "name"],
                    "properties": {"key": {"type": "string"}, "name": {"type": "string"}, "optional": {"type": "boolean"}},
                },
            },
        },
    },
}


def _monitor_schema(kind: str) -> dict[str, Any]:
    endpoints = "podMetricsEndpoints" if kind == "PodMonitor" else "endpoints"
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": {"type": "object"},
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", endpoints],
                "properties": {
                    "selector": _SELECTOR,
                    "namespaceSelector": {"type": "object"},
                    endpoints: {"type": "array", "minItems": 1, "items": _ENDPOINT},
                },
            },
        },
    }


def _errors(validator, obj: dict[str, Any]) -> list[str]:
    out = []
    for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        out.append(f"{object_id(obj)}: {path}: {e.message}")
    return out


def schema_problems(obj: dict[str, Any]) -> list[str]:
    """Problems of one object against its schema; an object of an unknown kind is a problem."""
    kind, api_version = obj.get("kind"), obj.get("apiVersion")
    if not isinstance(obj.get("metadata"), dict) or not obj["metadata"].get("name"):
        return [f"{object_id(obj)}: metadata.name is missing"]
    if kind in KUBERAY_KINDS:
        validator = _crd_validator(api_version, kind)
        if validator is None:
            return [f"{object_id(obj)}: no KubeRay CRD serves {api_version} {kind}"]
        return _errors(validator, obj)
    if kind in MONITORING_KINDS:
        import jsonschema

        return _errors(jsonschema.Draft7Validator(_monitor_schema(kind)), obj)
    return _builtin_problems(obj)


def _builtin_problems(obj: dict[str, Any]) -> list[str]:
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path) or "(top level)"
        return [f"{object_id(obj)}: {path}: {e.message}"]
    except SchemaNotFoundError as e:
        return [f"{object_id(obj)}: {e.message}"]
    return []


def _speed_up_kubernetes_validate() -> None:
    """kubernetes-validate re-reads its (large) schema files for every object: cache them."""
    from kubernetes_validate import utils

    if not getattr(utils.schema_contents, "_orfeas_cached", False):
        cached = functools.lru_cache(maxsize=None)(utils.schema_contents)
        cached._orfeas_cached = True  # type: ignore[attr-defined]
        utils.schema_contents = cached


def all_schema_problems(objs: list[dict[str, Any]]) -> list[str]:
    _speed_up_kubernetes_validate()
    return [p for o in objs for p in schema_problems(o)]
