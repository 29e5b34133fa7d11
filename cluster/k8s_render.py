"""Kubernetes rendering: the RayService's serveConfigV2 from `orfeas.yaml`, and kustomize builds.

The Serve applications a KubeRay cluster runs are the ones `serve.applications.serve_config`
returns for the same `orfeas.yaml` that `orfeas up` deploys locally. Only the facts that differ
inside a container are changed (`in_cluster`): Serve listens on all interfaces, the data
directory is the pod's volume, and model directories under the repository are found where the
image keeps the repository. Overlays that add models (the GPU overlays add vLLM models) keep a
small `orfeas.overlay.yaml` merged over `orfeas.yaml`.

`write_generated()` writes those serveConfigV2 values as kustomize patches
(`generated/serve-config.yaml`); a test re-renders them and fails when the committed files are
stale. `build()` is a kustomize equivalent in Python for the subset of kustomize the manifests
use (resources, namespace, labels, strategic-merge and JSON 6902 patches), so rendering and the
offline validation need neither a cluster nor a kustomize binary; a test checks it against
`kubectl kustomize` wherever kubectl is installed.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from config import Settings, load_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
KUBERAY_DIR = REPO_ROOT / "kuberay"
BASE_DIR = KUBERAY_DIR / "base"
OVERLAYS_DIR = KUBERAY_DIR / "overlays"
JOBS_DIR = KUBERAY_DIR / "jobs"
OVERLAYS = ("dev", "gpu", "aws", "gcp", "azure")
OVERLAY_CONFIG = "orfeas.overlay.yaml"
GENERATED = Path("generated") / "serve-config.yaml"
RAYSERVICE_NAME = "orfeas"

# Where the images (kuberay/images/) keep things: the repository is copied to APP_DIR (its
# orfeas.yaml included) and the pods mount their data volume at DATA_DIR.
APP_DIR = "/home/ray/orfeas"
DATA_DIR = "/home/ray/data"
SERVE_PORT = 8000
# The namespace's Qdrant server (kuberay/base/qdrant.yaml) and the variable holding its API key
# (from the orfeas-qdrant Secret in every Ray pod).
QDRANT_URL = "http://orfeas-qdrant:6333"
QDRANT_API_KEY_ENV = "ORFEAS_QDRANT_API_KEY"


class RenderError(Exception):
    """A manifest or overlay that cannot be rendered; the message says which file and why."""


# ---------------------------------------------------------------------------------------------
# serveConfigV2


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


@contextmanager
def _without_orfeas_env() -> Iterator[None]:
    """Render from the files alone: a developer's ORFEAS_* variables must not leak into git."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("ORFEAS_")}
    for k in saved:
        del os.environ[k]
    try:
        yield
    finally:
        os.environ.update(saved)


def _rebase(path: str, root: Path) -> str:
    """A path under the repository, as the image sees it (APP_DIR); other paths unchanged."""
    p = Path(path)
    if p.is_absolute():
        try:
            return str(Path(APP_DIR) / p.relative_to(root))
        except ValueError:
            return path
    return path


def in_cluster(settings: Settings, config_file: Path) -> Settings:
    """The same settings with the few facts that differ inside a KubeRay pod."""
    root = config_file.resolve().parent
    s = settings.model_copy(deep=True)
    s.serve.host = "0.0.0.0"
    s.serve.port = SERVE_PORT
    s.ray.address = "auto"
    s.ray.dashboard_host = "0.0.0.0"
    s.data_dir = Path(DATA_DIR)
    for m in s.models:
        if m.engine != "openai":
            m.source = _rebase(m.source, root)
    # The RAG settings (rag.qdrant_url, rag.qdrant_api_key_env): the cluster uses its Qdrant
    # server unless the file names another one.
    rag = getattr(s, "rag", None)
    if rag is not None and hasattr(rag, "qdrant_url") and not rag.qdrant_url:
        rag.qdrant_url = QDRANT_URL
        if hasattr(rag, "qdrant_api_key_env") and not rag.qdrant_api_key_env:
            rag.qdrant_api_key_env = QDRANT_API_KEY_ENV
    return s


def k8s_settings(config_file: Path | None = None, overlay: str | None = None) -> Settings:
    """Settings for the RayService of `overlay` (None: the base), read from the files only."""
    config_file = Path(config_file or REPO_ROOT / "orfeas.yaml")
    extra = _overlay_config(overlay) if overlay else None
    with _without_orfeas_env():
        if extra is None:
            return in_cluster(load_settings(config_file), config_file)
        # Merge the overlay over the file; relative paths resolve against the merged file's
        # folder, which `in_cluster` then maps to the image's copy of the repository.
        data = yaml.safe_load(config_file.read_text()) or {}
        extra = dict(extra)
        added = extra.pop("extra_models", [])
        merged = _deep_merge(data, extra)
        merged["models"] = list(merged.get("models") or []) + list(added)
        with tempfile.TemporaryDirectory() as tmp:
            merged_file = Path(tmp) / "orfeas.yaml"
            merged_file.write_text(yaml.safe_dump(merged, sort_keys=False))
            return in_cluster(load_settings(merged_file), merged_file)


def _overlay_config(overlay: str) -> dict[str, Any] | None:
    f = OVERLAYS_DIR / overlay / OVERLAY_CONFIG
    if not f.exists():
        return None
    data = yaml.safe_load(f.read_text()) or {}
    if not isinstance(data, dict):
        raise RenderError(f"{f}: the top level must be a mapping")
    return data


def serve_config_v2(settings: Settings) -> str:
    """The serveConfigV2 string: Serve's declarative config as YAML, keys in a stable order."""
    from serve.applications import serve_config

    return yaml.safe_dump(serve_config(settings), sort_keys=False, width=120)


def serve_config_patch(settings: Settings) -> str:
    header = (
        "# GENERATED by `orfeas k8s render` from orfeas.yaml (and this overlay's orfeas.overlay.yaml,\n"
        "# if any). Do not edit: change the config and re-render; a test fails when this is stale.\n"
    )
    patch = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": RAYSERVICE_NAME},
        "spec": {"serveConfigV2": serve_config_v2(settings)},
    }
    return header + yaml.dump(patch, Dumper=_LiteralDumper, sort_keys=False, width=120)


class _LiteralDumper(yaml.SafeDumper):
    pass


def _str_presenter(dumper: yaml.SafeDumper, data: str):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_LiteralDumper.add_representer(str, _str_presenter)


@dataclass(frozen=True)
class Generated:
    path: Path
    text: str


def generated_files(config_file: Path | None = None) -> list[Generated]:
    """Every generated serve-config patch: the base's, and one per overlay with its own config."""
    out = [Generated(BASE_DIR / GENERATED, serve_config_patch(k8s_settings(config_file)))]
    for name in OVERLAYS:
        if (OVERLAYS_DIR / name / OVERLAY_CONFIG).exists():
            out.append(Generated(OVERLAYS_DIR / name / GENERATED, serve_config_patch(k8s_settings(config_file, name))))
    return out


def write_generated(config_file: Path | None = None) -> list[Path]:
    """Write the generated patches; returns the files that changed."""
    changed = []
    for g in generated_files(config_file):
        if not g.path.exists() or g.path.read_text() != g.text:
            g.path.parent.mkdir(parents=True, exist_ok=True)
            g.path.write_text(g.text)
            changed.append(g.path)
    return changed


def stale_generated(config_file: Path | None = None) -> list[Path]:
    """Generated files whose committed text differs from a fresh render."""
    return [g.path for g in generated_files(config_file) if not g.path.exists() or g.path.read_text() != g.text]


# ---------------------------------------------------------------------------------------------
# kustomize (the subset the manifests use)

# Lists whose items kustomize merges by a key when they have one (kyaml's associative keys);
# any other list in a strategic-merge patch replaces the original.
_ASSOCIATIVE_KEYS = ("mountPath", "devicePath", "ip", "type", "topologyKey", "name", "containerPort")
_SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "labels", "patches", "components"}


def _load_docs(path: Path) -> list[dict[str, Any]]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        raise RenderError(f"{path} is not valid YAML: {e}") from e
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
            raise RenderError(f"{path}: every document must be a Kubernetes object with apiVersion and kind")
    return docs


def _key_of(items: list[Any]) -> str | None:
    for k in _ASSOCIATIVE_KEYS:
        if items and all(isinstance(i, dict) and k in i for i in items):
            return k
    return None


def strategic_merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list):
        key = _key_of(base + patch)
        if key is None:
            return copy.deepcopy(patch)
        out = [copy.deepcopy(i) for i in base]
        for item in patch:
            idx = next((n for n, b in enumerate(out) if b[key] == item[key]), None)
            if idx is None:
                out.append(copy.deepcopy(item))
            else:
                out[idx] = strategic_merge(out[idx], item)
        return out
    return copy.deepcopy(patch)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"JSON patch path {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json6902(doc: dict[str, Any], ops: list[dict[str, Any]], where: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(op["path"])
        parent: Any = doc
        try:
            for p in parts[:-1]:
                parent = parent[int(p)] if isinstance(parent, list) else parent[p]
            last = parts[-1]
            kind = op["op"]
            if isinstance(parent, list):
                idx = len(parent) if last == "-" else int(last)
                if kind == "add":
                    parent.insert(idx, copy.deepcopy(op["value"]))
                elif kind == "replace":
                    parent[idx] = copy.deepcopy(op["value"])
                elif kind == "remove":
                    del parent[idx]
                else:
                    raise RenderError(f"{where}: unsupported JSON patch op {kind!r}")
            else:
                if kind in ("add", "replace"):
                    if kind == "replace" and last not in parent:
                        raise KeyError(last)
                    parent[last] = copy.deepcopy(op["value"])
                elif kind == "remove":
                    del parent[last]
                else:
                    raise RenderError(f"{where}: unsupported JSON patch op {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise RenderError(f"{where}: JSON patch {op['op']} {op['path']} does not apply ({e!r})") from None
    return doc


def _matches(obj: dict[str, Any], target: dict[str, Any]) -> bool:
    if "kind" in target and obj["kind"] != target["kind"]:
        return False
    if "name" in target and obj["metadata"].get("name") != target["name"]:
        return False
    if "group" in target or "version" in target:
        group, _, version = obj["apiVersion"].rpartition("/")
        if target.get("group", group) != group or target.get("version", version) != version:
            return False
    return True


def build(directory: Path) -> list[dict[str, Any]]:
    """`kustomize build directory` for the features the manifests use."""
    directory = Path(directory)
    kfile = directory / "kustomization.yaml"
    if not kfile.exists():
        raise RenderError(f"{directory} has no kustomization.yaml")
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(k) - _SUPPORTED
    if unknown:
        raise RenderError(f"{kfile}: fields {sorted(unknown)} are not supported by the built-in renderer")
    objs: list[dict[str, Any]] = []
    for entry in list(k.get("resources") or []) + list(k.get("components") or []):
        p = (directory / entry).resolve()
        objs.extend(build(p) if p.is_dir() else _load_docs(p))
    for patch in k.get("patches") or []:
        where = f"{kfile} patch {patch.get('path', '(inline)')}"
        text = (directory / patch["path"]).read_text() if "path" in patch else patch["patch"]
        try:
            bodies = [b for b in yaml.safe_load_all(text) if b is not None]
        except yaml.YAMLError as e:
            raise RenderError(f"{where} is not valid YAML: {e}") from e
        target = patch.get("target")
        if len(bodies) == 1 and isinstance(bodies[0], list):  # JSON 6902
            if not target:
                raise RenderError(f"{where}: a JSON 6902 patch needs a target")
            hits = [i for i, o in enumerate(objs) if _matches(o, target)]
            if not hits:
                raise RenderError(f"{where}: matches no resource")
            for i in hits:
                objs[i] = json6902(objs[i], bodies[0], where)
            continue
        for body in bodies:  # strategic merge: each document patches the object it names
            t = target or {"kind": body.get("kind"), "name": (body.get("metadata") or {}).get("name")}
            hits = [i for i, o in enumerate(objs) if _matches(o, t)]
            if not hits:
                raise RenderError(f"{where}: {t.get('kind')}/{t.get('name')} matches no resource")
            if body.get("$patch") == "delete":
                objs = [o for i, o in enumerate(objs) if i not in hits]
            else:
                for i in hits:
                    objs[i] = strategic_merge(objs[i], body)
    for spec in k.get("labels") or []:
        for o in objs:
            o.setdefault("metadata", {}).setdefault("labels", {}).update(spec.get("pairs", {}))
    if k.get("namespace"):
        for o in objs:
            if o["kind"] not in _CLUSTER_SCOPED:
                o["metadata"]["namespace"] = k["namespace"]
            _namespace_subjects(o, k["namespace"])
    return objs


_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass", "StorageClass"}


def _namespace_subjects(o: dict[str, Any], ns: str) -> None:
    # kustomize moves ServiceAccount subjects of role bindings into the namespace too.
    if o["kind"] in ("RoleBinding", "ClusterRoleBinding"):
        for s in o.get("subjects") or []:
            if s.get("kind") == "ServiceAccount":
                s["namespace"] = ns


def render(overlay: str | None) -> list[dict[str, Any]]:
    """The objects of an overlay (None: the base), as `kubectl apply -k` would send them."""
    if overlay is None:
        return build(BASE_DIR)
    if overlay == "jobs":
        return build(JOBS_DIR)
    if overlay not in OVERLAYS:
        raise RenderError(f"unknown overlay {overlay!r}; choose one of {', '.join(OVERLAYS)} (or jobs)")
    return build(OVERLAYS_DIR / overlay)


def to_yaml(objs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objs, Dumper=_LiteralDumper, sort_keys=False, width=120)


def object_id(o: dict[str, Any]) -> str:
    md = o.get("metadata") or {}
    ns = md.get("namespace")
    return f"{o.get('kind')}/{(ns + '/') if ns else ''}{md.get('name')}"


def dumps_json(o: Any) -> str:
    return json.dumps(o, sort_keys=True)


def find_object(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The object of that kind (and name); KeyError when there is none."""
    for o in objs:
        if o.get("kind") == kind and (name is None or (o.get("metadata") or {}).get("name") == name):
            return o
    raise KeyError(f"no {kind}{'/' + name if name else ''}")


ALL_TARGETS = (*OVERLAYS, "jobs")
