"""The one place that maps a catalog entry's `engine` to the class that runs it, for processes that
host an engine themselves (the edge node; model replicas may use it too). Callers never branch on
the engine: they get an `Engine`."""

from __future__ import annotations

from config import ModelSpec
from models.engine import Engine
from models.errors import InvalidRequest


def make_engine(spec: ModelSpec) -> Engine:
    """The engine for `spec` (not loaded: call `load()` where it will serve)."""
    if spec.task != "chat":
        raise InvalidRequest(f"model {spec.id!r} is a {spec.task!r} model, not a chat model", "model")
    if spec.engine in ("transformers", "llama.cpp"):  # in-process engines: one rule, shared with the model replicas
        from models.engines.local import local_chat_engine

        return local_chat_engine(spec)
    if spec.engine == "openai":
        from models.engines.openai_remote import RemoteOpenAIEngine

        return RemoteOpenAIEngine(spec)
    raise InvalidRequest(f"model {spec.id!r}: engine {spec.engine!r} cannot run in this process", "engine")
