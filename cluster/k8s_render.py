"""Kubernetes rendering: the RayService's serveConfigV2 from `orfeas.yaml`, and kustomize builds.

The Serve applications a KubeRay cluster runs are the ones `serve.applications.serve_config`
returns for the same `orfeas.yaml` that `orfeas up` deploys locally. Only the facts that differ
inside a container are changed (`in_cluster`): Serve listens on all interfaces, the data
directory is the pod's volume, and model directories under the repository are found where the
image keeps the repository. Overlays that add models (the GPU overlays add vLLM models) keep a
small `orfeas.overlay.yaml` merged over `orfeas.yaml`.

`write_generated()` writes those serveConfigV2 values as kustomize patches
(`generated/serve-config.yaml`); a test re-renders them and fails when the committed files are
stale. `build()` runs real kustomize (`kustomize build` where a standalone kustomize is on PATH,
else `kubectl kustomize`, kubectl >= 1.27): without either it fails and says what to install.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
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
# The Ray node label of the gpu-workers group (kuberay/base/rayservice.yaml rayStartParams labels).
GPU_NODE_LABEL = {"orfeas.io/image": "gpu"}
# The namespace's Qdrant server (kuberay/base/qdrant.yaml) and the variable holding its API key
# (from the orfeas-qdrant Secret in every Ray pod).
QDRANT_URL = "http://orfeas-qdrant:6333"
QDRANT_API_KEY_ENV = "ORFEAS_QDRANT_API_KEY"
# Serve's HTTPS certificate: the orfeas-serve-tls Secret (type kubernetes.io/tls), mounted on every
# Ray pod of the serving cluster (Serve runs a proxy per node; rayservice.yaml).
SERVE_TLS_DIR = "/etc/orfeas/tls"


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
    s.serve.gpu_node_label = dict(GPU_NODE_LABEL)
    s.ray.address = "auto"
    s.ray.dashboard_host = "0.0.0.0"
    s.data_dir = Path(DATA_DIR)
    # /docs and /openapi.json need an API key on a cluster unless the file says otherwise.
    if "docs" not in s.auth.model_fields_set:
        s.auth.docs = "auth"
    for m in s.models:
        if m.engine != "openai":
            m.source = _rebase(m.source, root)
    # HTTPS between the ingress controller and Serve unless the file names its own certificate.
    if not s.serve.tls.enabled:
        s.serve.tls.certfile, s.serve.tls.keyfile = f"{SERVE_TLS_DIR}/tls.crt", f"{SERVE_TLS_DIR}/tls.key"
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

    return yaml.safe_dump(serve_config(settings, Path(APP_DIR)), sort_keys=False, width=120)


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
# kustomize (the real one: `kustomize build`, else `kubectl kustomize`)

# kubectl 1.27 is the first release with kustomize v5 built in.
MIN_KUSTOMIZE, MIN_KUBECTL = (5, 0), (1, 27)
INSTALL_HINT = (
    "`orfeas k8s` builds the manifests with kustomize: install kubectl >= 1.27 "
    "(kustomize v5 built in: https://kubernetes.io/docs/tasks/tools/) or a standalone kustomize v5 "
    "(https://kubectl.docs.kubernetes.io/installation/kustomize/) and put it on PATH"
)


class KustomizeNotFound(RenderError):
    """Neither `kustomize` nor `kubectl` (new enough) is on PATH; the message says what to install."""


def _version(text: str) -> tuple[int, int] | None:
    m = re.search(r"v?(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


@functools.lru_cache(maxsize=8)
def _too_old(exe: str, tool: str) -> str | None:
    """Why the kustomize in this `kustomize` or `kubectl` binary is too old, or None (new
    enough, or the binary does not say: then kustomize's own errors speak)."""
    args = [exe, "version"] if tool == "kustomize" else [exe, "version", "--client", "-o", "json"]
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    if tool == "kustomize":
        v = _version(out)
        return f"{exe} is kustomize v{v[0]}.{v[1]}" if v and v < MIN_KUSTOMIZE else None
    try:
        info = json.loads(out)
    except ValueError:
        return None
    v = _version(info.get("kustomizeVersion") or "")
    if v is not None:
        return f"{exe} has kustomize v{v[0]}.{v[1]}" if v < MIN_KUSTOMIZE else None
    client = info.get("clientVersion") or {}
    k = _version(f"{client.get('major', '')}.{client.get('minor', '')}") or _version(client.get("gitVersion") or "")
    return f"{exe} is kubectl {k[0]}.{k[1]}" if k and k < MIN_KUBECTL else None


def kustomize_command() -> list[str]:
    """The command that builds a kustomization directory: `kustomize build` when a standalone
    kustomize is on PATH, else `kubectl kustomize`; KustomizeNotFound when there is neither (or
    only ones older than kustomize v5)."""
    found = []
    for tool, sub in (("kustomize", "build"), ("kubectl", "kustomize")):
        exe = shutil.which(tool)
        if exe is None:
            continue
        old = _too_old(exe, tool)
        if old is None:
            return [exe, sub]
        found.append(old)
    raise KustomizeNotFound(f"{INSTALL_HINT} ({'; '.join(found) if found else 'neither kustomize nor kubectl is on PATH'})")


def build_yaml(directory: Path) -> str:
    """`kustomize build directory`: the YAML stream `kubectl apply -k` would send."""
    directory = Path(directory)
    if not (directory / "kustomization.yaml").exists():
        raise RenderError(f"{directory} has no kustomization.yaml")
    cmd = [*kustomize_command(), str(directory)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise RenderError(f"`{' '.join(cmd)}` did not finish within 300 s") from None
    if proc.returncode != 0:
        raise RenderError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or f'exit status {proc.returncode}'}")
    return proc.stdout


_FastLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def build(directory: Path) -> list[dict[str, Any]]:
    """The objects of `kustomize build directory`."""
    return [d for d in yaml.load_all(build_yaml(directory), Loader=_FastLoader) if d is not None]


def _directory(overlay: str | None) -> Path:
    if overlay is None:
        return BASE_DIR
    if overlay == "jobs":
        return JOBS_DIR
    if overlay not in OVERLAYS:
        raise RenderError(f"unknown overlay {overlay!r}; choose one of {', '.join(OVERLAYS)} (or jobs)")
    return OVERLAYS_DIR / overlay


def render_yaml(overlay: str | None) -> str:
    """An overlay (None: the base) as kustomize renders it."""
    return build_yaml(_directory(overlay))


def render(overlay: str | None) -> list[dict[str, Any]]:
    """The objects of an overlay (None: the base), as `kubectl apply -k` would send them."""
    return build(_directory(overlay))


def object_id(o: dict[str, Any]) -> str:
    md = o.get("metadata") or {}
    ns = md.get("namespace")
    return f"{o.get('kind')}/{(ns + '/') if ns else ''}{md.get('name')}"


def find_object(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The object of that kind (and name); KeyError when there is none."""
    for o in objs:
        if o.get("kind") == kind and (name is None or (o.get("metadata") or {}).get("name") == name):
            return o
    raise KeyError(f"no {kind}{'/' + name if name else ''}")


ALL_TARGETS = (*OVERLAYS, "jobs")
