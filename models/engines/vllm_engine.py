"""vLLM on GPUs through Ray Serve's own LLM library (`ray.serve.llm`); no wrapper of our own.

Nothing here imports vLLM at module import: it is the `gpu` extra, absent on CPU machines.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import AsyncIterator
from typing import Any

from config import ModelSpec
from models.errors import InvalidRequest, UpstreamError
from models.protocol import GenerationEvent, StreamReader

MISSING_EXTRA = (
    "model {id!r} uses engine 'vllm', which needs vLLM: install the gpu extra "
    "(pip install 'orfeas[gpu]') on a machine with a CUDA GPU"
)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def llm_config(spec: ModelSpec):
    from ray.serve.llm import LLMConfig

    return LLMConfig(
        model_loading_config={"model_id": spec.id, "model_source": spec.source},
        accelerator_type=spec.accelerator_type,
        deployment_config={
            "num_replicas": spec.num_replicas,
            "max_ongoing_requests": spec.max_ongoing_requests,
        },
        engine_kwargs={"max_model_len": spec.max_context, **spec.engine_kwargs},
    )


def build_vllm_app(args: dict[str, Any]):
    """Serve application builder: the model's LLMServer deployment from `ray.serve.llm`."""
    spec = ModelSpec.model_validate(args["model"])
    if not vllm_available():
        raise RuntimeError(MISSING_EXTRA.format(id=spec.id))
    from ray.serve.llm import build_llm_deployment

    return build_llm_deployment(llm_config(spec))


async def stream_from_llm_server(handle, kind: str, payload: dict[str, Any]) -> AsyncIterator[GenerationEvent]:
    """Call an LLMServer deployment handle and turn its OpenAI stream into generation events."""
    from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

    request_cls, method = (ChatCompletionRequest, "chat") if kind == "chat" else (CompletionRequest, "completions")
    request = request_cls(**payload, stream=True, stream_options={"include_usage": True})
    reader = StreamReader(kind)
    async for batch in getattr(handle.options(stream=True), method).remote(request):
        for item in batch if isinstance(batch, list) else [batch]:
            if not isinstance(item, str):  # an ErrorResponse object
                body = item.model_dump() if hasattr(item, "model_dump") else {"error": str(item)}
                err = body.get("error", body)
                message = err.get("message", str(err)) if isinstance(err, dict) else str(err)
                code = err.get("code") if isinstance(err, dict) else None
                raise (InvalidRequest if code == 400 else UpstreamError)(f"vLLM: {message}")
            for line in item.splitlines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                for event in reader.read(json.loads(line[5:])):
                    yield event
    yield reader.final()
