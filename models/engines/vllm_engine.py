"""vLLM on GPUs through Ray Serve's own LLM library (`ray.serve.llm`); no wrapper of our own.

`build_vllm_app` deploys the model's LLMServer; `VLLMEngine` is the gateway's engine for it,
calling the LLMServer deployment through its handle with vLLM's own OpenAI request types, every
parameter the client set included (vLLM honours them all: JSON mode and schemas by guided
decoding, penalties, logit_bias, logprobs).

Nothing here imports vLLM at module import: it is the `gpu` extra, absent on CPU machines.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from config import ModelSpec
from models.engine import Engine, EngineStatus
from models.errors import InvalidRequest, UpstreamError
from models.protocol import GenerationEvent, GenerationKind, GenerationRequest, StreamReader

MISSING_EXTRA = (
    "model {id!r} uses engine 'vllm', which needs vLLM: install the gpu extra "
    "(pip install 'orfeas[gpu]') on a machine with a CUDA GPU"
)
STATUS_TIMEOUT_S = 3.0
# The JSON entry point of OrfeasLLMServer (models/engines/vllm_server.py) for each kind: the
# gateway sends plain dicts and never imports vLLM or its types.
METHODS = {GenerationKind.CHAT: "chat_json", GenerationKind.COMPLETION: "completions_json"}


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def configured_max_model_len(spec: ModelSpec) -> int | None:
    """The context length the catalog sets (engine_kwargs.max_model_len, else an explicit
    max_context), or None: then vLLM uses the model's own context from its config."""
    if "max_model_len" in spec.engine_kwargs:
        return int(spec.engine_kwargs["max_model_len"])
    return spec.max_context if "max_context" in spec.model_fields_set else None


def max_model_len(spec: ModelSpec) -> int:
    """The context the gateway budgets with: the configured one, else max_context's default (a
    lower bound of what vLLM was given)."""
    return configured_max_model_len(spec) or spec.max_context


def engine_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """vLLM's engine arguments: the catalog's, plus max_model_len when the catalog sets one and
    tensor parallelism over the GPUs the entry asks for (num_gpus: 2 shards the model on 2 GPUs)."""
    kwargs = dict(spec.engine_kwargs)
    if (n := configured_max_model_len(spec)) is not None:
        kwargs["max_model_len"] = n
    if spec.num_gpus > 1 and "tensor_parallel_size" not in kwargs and "pipeline_parallel_size" not in kwargs:
        kwargs["tensor_parallel_size"] = int(spec.num_gpus)
    return kwargs


# Ray Serve LLM sets this hook in its replicas' runtime_env; a declarative `ray_actor_options`
# replaces the code's, so the serve config's override carries it again.
LLM_SETUP_HOOK = "ray.llm._internal.serve._worker_process_setup_hook"


def replica_options_override(gpu_label: dict[str, str]) -> dict[str, Any]:
    """`ray_actor_options` of a vLLM deployment in the declarative config: pinned to GPU-image
    nodes, which also pins Serve's build task for the app (it follows a shared label selector)."""
    return {"label_selector": dict(gpu_label), "runtime_env": {"worker_process_setup_hook": LLM_SETUP_HOOK}}


def llm_config(spec: ModelSpec, autoscaling_config: dict[str, Any] | None = None,
               gpu_label: dict[str, str] | None = None):
    from ray.serve.llm import LLMConfig

    deployment: dict[str, Any] = {"max_ongoing_requests": spec.max_ongoing_requests}
    if gpu_label:
        deployment["ray_actor_options"] = {"label_selector": dict(gpu_label)}
    if autoscaling_config is not None:
        deployment["autoscaling_config"] = autoscaling_config
    else:
        deployment["num_replicas"] = spec.num_replicas
    return LLMConfig(
        model_loading_config={"model_id": spec.id, "model_source": spec.source},
        accelerator_type=spec.accelerator_type,
        deployment_config=deployment,
        engine_kwargs=engine_kwargs(spec),
    )


def build_vllm_app(args: dict[str, Any]):
    """Serve application builder: the model's LLMServer deployment from `ray.serve.llm`
    (`autoscaling_config`: the one serve.applications chose for it, or None)."""
    spec = ModelSpec.model_validate(args["model"])
    if not vllm_available():
        raise RuntimeError(MISSING_EXTRA.format(id=spec.id))
    from ray.serve.llm import build_llm_deployment

    from models.engines.vllm_server import OrfeasLLMServer

    # The class name stays LLMServer's in the deployment name (serve.applications names it).
    return build_llm_deployment(llm_config(spec, args.get("autoscaling_config"), args.get("gpu_label")),
                                deployment_cls=OrfeasLLMServer, name_prefix="LLMServer:")


def prompt_tokens_bound(request: GenerationRequest) -> int:
    """At most how many tokens the prompt can be once templated, without a tokenizer: a token of
    the byte-level and byte-fallback tokenizers vLLM serves covers at least one byte of text, and
    templates add a few special tokens per message plus a preamble."""
    if request.kind is GenerationKind.COMPLETION:
        return len((request.prompt or "").encode()) + 16
    text = json.dumps(request.messages, ensure_ascii=False) + json.dumps(request.tools or [], ensure_ascii=False)
    return len(text.encode()) + 16 * len(request.messages or []) + 64


def vllm_body(request: GenerationRequest, spec: ModelSpec) -> dict[str, Any]:
    """The OpenAI-compatible body LLMServer is sent. `max_tokens` is always the gateway's budget
    (the client's limit, or the cap). Without a client limit it is also kept to what fits the
    model's context after the prompt: vLLM refuses a max_tokens that does not fit, where the
    client asked for no particular length."""
    body = request.openai_body(spec.id)
    if request.params.max_tokens is None:
        room = max_model_len(spec) - prompt_tokens_bound(request)
        body["max_tokens"] = max(1, min(body["max_tokens"], room))
    return body


class VLLMEngine(Engine):
    """vLLM's LLMServer deployment, reached through its Serve handle (`handle()` returns it)."""

    def __init__(self, spec: ModelSpec, handle: Callable[[], Any]):
        super().__init__(spec)
        self._handle = handle

    @property
    def handle(self):
        return self._handle()

    async def status(self) -> EngineStatus:
        if not vllm_available():
            return EngineStatus.unhealthy(MISSING_EXTRA.format(id=self.spec.id))
        try:
            await asyncio.wait_for(self.handle.check_health.remote(), STATUS_TIMEOUT_S)
        except Exception as e:  # a replica that cannot answer its health check is not serving
            return EngineStatus.unhealthy(f"vLLM health check failed: {type(e).__name__}: {e}"[:500])
        return EngineStatus.ready(max_context=max_model_len(self.spec))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """LLMServer's OpenAI stream as generation events."""
        method, body = METHODS[request.kind], vllm_body(request, self.spec)
        reader = StreamReader(request.kind)
        async for batch in getattr(self.handle.options(stream=True), method).remote(body):
            for item in batch if isinstance(batch, list) else [batch]:
                if not isinstance(item, str):  # an ErrorResponse object
                    raise _error(item)
                for line in item.splitlines():
                    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if "error" in chunk:
                        raise _error(chunk)
                    for event in reader.read(chunk):
                        yield event
        yield reader.final()


def _error(item: Any) -> Exception:
    body = item.model_dump() if hasattr(item, "model_dump") else item if isinstance(item, dict) else {"error": str(item)}
    err = body.get("error", body)
    if not isinstance(err, dict):
        return UpstreamError(f"vLLM: {err}")
    message, code = err.get("message", str(err)), err.get("code")
    if code == 400 or err.get("type") == "BadRequestError":
        param = err.get("param") if isinstance(err.get("param"), str) else None
        return InvalidRequest(f"vLLM: {message}", param)
    return UpstreamError(f"vLLM: {message}")
