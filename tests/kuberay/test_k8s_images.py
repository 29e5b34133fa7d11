"""Container images: pinned Ray bases matching pyproject, non-root, project installed, and a
.dockerignore that keeps local state and secrets out of the build context."""

from __future__ import annotations

import re
import tomllib

import pytest

from k8s_fixtures import fresh, rendered  # noqa: F401  (fixtures)

from cluster import k8s_render

IMAGES = k8s_render.KUBERAY_DIR / "images"


def _ray_version() -> str:
    deps = tomllib.loads((k8s_render.REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(re.search(r"==([\d.]+)", d).group(1) for d in deps if d.startswith("ray["))


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_dockerfile(flavour):
    text = (IMAGES / f"Dockerfile.{flavour}").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms, "no FROM"
    for image in froms:
        assert image.startswith(f"rayproject/ray:{_ray_version()}-py311-"), image
        assert "latest" not in image
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert re.search(r"pip install[^\n]*--no-deps \.", text), "the project itself is installed"
    assert "COPY --chown=1000:100 orfeas.yaml" in text
    if flavour == "gpu":
        assert "optional-dependencies\"][\"gpu\"]" in text.replace("'", '"'), "the gpu extra (vLLM) is installed"


def test_dockerignore():
    lines = {ln.strip() for ln in (IMAGES / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")}
    for must in ("**/.git", "**/.venv", "data", "**/.env", "**/__pycache__"):
        assert must in lines, must
    for flavour in ("cpu", "gpu"):
        assert (IMAGES / f"Dockerfile.{flavour}.dockerignore").read_text() == (IMAGES / ".dockerignore").read_text()


def test_manifest_images_are_the_project_images(rendered):
    from cluster.k8s_validate import containers, pod_specs

    images = {c["image"] for objs in rendered.values() for o in objs for _, pod in pod_specs(o) for _, c in containers(pod)}
    assert {"ghcr.io/orfeas/orfeas:0.1.0-cpu", "ghcr.io/orfeas/orfeas:0.1.0-gpu"} <= images
    version = tomllib.loads((k8s_render.REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert all(i.startswith("qdrant/") or f":{version}-" in i for i in images), images


def test_ray_version_everywhere_is_pyproject_s(rendered):
    found = set()
    for objs in rendered.values():
        for o in objs:
            spec = o.get("spec") or {}
            for cluster in (spec.get("rayClusterConfig"), spec.get("rayClusterSpec"),
                            (spec.get("jobTemplate") or {}).get("rayClusterSpec")):
                if cluster:
                    found.add(cluster["rayVersion"])
    assert found == {_ray_version()}
