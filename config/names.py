"""Names every room agrees on: Serve application names, their route prefixes, and the one Ray
namespace of ORFEAS's detached actors. Kept here (the bottom room) so that a room that calls
another app by name never imports the room that builds it."""

from __future__ import annotations

import re

# The Ray namespace of every ORFEAS detached actor and of every driver that looks them up.
ACTOR_NAMESPACE = "orfeas"

GATEWAY_APP, GATEWAY_PREFIX = "gateway", "/"
RAG_APP, RAG_PREFIX = "rag", "/v1/rag"
WORKFLOWS_APP, WORKFLOWS_PREFIX = "workflows", "/v1/workflows"
AGENTS_APP, AGENTS_PREFIX = "agents", "/v1/agents"
ALERTS_APP, ALERTS_PREFIX = "alerts", "/v1/alerts"


def model_app_name(model_id: str) -> str:
    """Serve application name of an in-cluster model (Serve names allow a limited alphabet)."""
    return "model-" + re.sub(r"[^A-Za-z0-9_-]", "-", model_id)
