"""Fixtures for the offline KubeRay manifest tests (imported by name: tests/conftest.py owns `conftest`)."""

from __future__ import annotations

import copy

import pytest

from cluster import k8s_render


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    return {name: k8s_render.render(name) for name in k8s_render.ALL_TARGETS}


@pytest.fixture
def fresh(rendered):
    """A deep copy of an overlay's objects, to break on purpose."""
    return lambda name: copy.deepcopy(rendered[name])
