"""An agent: an actor with a role, instructions, a model policy and tools, running a
tool-calling loop through the gateway's chat path until the model answers or the step limit.

The coordinator creates agent actors (it owns them: they go when it goes) and tells each task
its id; while a task runs the agent heartbeats it to the coordinator.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any, Awaitable, Callable

import ray

from agents.protocol import parse_reply, system_prompt, tool_result_messages
from agents.tools import Tool, ToolError, build_tools, current_caller
from config import AgentSpec, Settings, settings_from_dict
from observability import tracing
from security.auth import Principal
from config.names import ACTOR_NAMESPACE

log = logging.getLogger(__name__)

# chat(model, messages, max_tokens, tools, caller) -> the gateway's chat_message dict: content, tool_calls,
# model, usage, cost_usd.
Chat = Callable[[str, list[dict], int, list[dict] | None, Principal | None], Awaitable[dict[str, Any]]]


class AgentError(Exception):
    """The agent could not finish its task (no model answered, step limit reached)."""

    def __reduce__(self):
        return (self.__class__, (str(self),))


def estimate_tokens(messages: list[dict] | str) -> int:
    """About four characters a token, for a backend that reports no usage."""
    text = messages if isinstance(messages, str) else json.dumps(messages)
    return max(1, len(text) // 4)


def usage_of(reply: dict[str, Any], messages: list[dict]) -> dict[str, Any]:
    """One model call's analytics: the backend's token counts and the gateway's price for them."""
    tokens = (reply.get("usage") or {}).get("total_tokens") or \
        estimate_tokens(messages) + estimate_tokens(reply.get("content") or "")
    return {"model_calls": 1, "tokens": tokens, "cost": float(reply.get("cost_usd") or 0.0)}


def gateway_chat(settings: Settings) -> Chat:
    """Chat through the gateway's in-cluster path (same backends, router, limits, metrics and
    cost ledger as HTTP), for `caller`: the key that started the work, whose scopes and budget apply."""
    from ray import serve

    from config.names import GATEWAY_APP

    handle = None

    async def chat(model: str, messages: list[dict], max_tokens: int, tools: list[dict] | None = None,
                   caller: Principal | None = None) -> dict:
        nonlocal handle
        if handle is None:
            handle = serve.get_app_handle(GATEWAY_APP)
        carrier = tracing.inject()  # the caller's span (a step, an agent task) parents the chat
        try:
            response = handle.chat_message.remote(model, messages, max_tokens, tools, caller, trace=carrier) \
                if carrier else handle.chat_message.remote(model, messages, max_tokens, tools, caller)
            try:
                return await response
            except asyncio.CancelledError:  # a cancelled step or run: the gateway's call is cancelled too
                response.cancel()
                raise
        except Exception as e:
            cause = getattr(e, "cause", None) or e
            raise AgentError(f"model {model!r} failed: {getattr(cause, 'message', None) or cause}") from None

    return chat


class AgentCore:
    """The loop itself, independent of Ray (the actor below wraps it)."""

    def __init__(self, spec: AgentSpec, settings: Settings, chat: Chat, tools: dict[str, Tool] | None = None):
        self.spec, self.settings, self.chat = spec, settings, chat
        self.tools = tools if tools is not None else build_tools(settings, spec.tools)
        self.model = spec.model or settings.agents.default_model
        self.max_steps = spec.max_steps or settings.agents.max_steps

    @property
    def native_tools(self) -> bool:
        """Offer tools the OpenAI way when the catalog says the model does tools; otherwise the
        JSON protocol in the system prompt (any chat model can follow it)."""
        spec = self.settings.model(self.model) if self.model else None
        return bool(self.tools) and spec is not None and "tools" in spec.capabilities

    async def _ask(self, messages: list[dict], tools: list[dict] | None, usage: dict,
                   caller: Principal | None) -> dict[str, Any]:
        models = [m for m in [self.model, *self.spec.fallback_models] if m]
        if not models:
            raise AgentError(f"agent {self.spec.name!r} has no model (set its model or agents.default_model)")
        errors = []
        for model in models:
            try:
                reply = await self.chat(model, messages, self.spec.max_tokens, tools, caller)
            except AgentError as e:
                errors.append(str(e))
                continue
            for k, v in usage_of(reply, messages).items():
                usage[k] += v
            return reply
        raise AgentError("; ".join(errors))

    async def run(self, task: str, idempotency_prefix: str = "", caller: Principal | None = None) -> dict[str, Any]:
        current_caller.set(caller)  # this task's tool calls are made for the caller too
        schemas = [t.openai_schema() for t in self.tools.values()]
        native = self.native_tools
        system = system_prompt(self.spec.role, self.spec.instructions, [] if native else schemas)
        messages: list[dict] = [{"role": "system", "content": system}, {"role": "user", "content": task}]
        usage = {"model_calls": 0, "tokens": 0, "cost": 0.0}
        trace: list[dict] = []
        for step in range(self.max_steps):
            reply = await self._ask(messages, schemas if native else None, usage, caller)
            parsed = parse_reply(reply.get("content"), reply.get("tool_calls"), step=step)
            if not parsed.calls:
                return {"answer": parsed.answer, "agent": self.spec.name, "steps": step + 1, "tool_calls": trace,
                        "usage": usage}
            results = []
            for i, call in enumerate(parsed.calls):
                result = await self.call_tool(call.name, call.arguments, call.error,
                                              f"{idempotency_prefix}:{step}:{i}" if idempotency_prefix else None)
                trace.append({"tool": call.name, "arguments": call.arguments, "ok": result[0]})
                results.append((call, result[1]))
            messages += tool_result_messages(parsed, results)
        raise AgentError(f"agent {self.spec.name!r} gave no answer within {self.max_steps} steps")

    async def call_tool(self, name: str, arguments: Any, parse_error: str | None = None,
                        idempotency_key: str | None = None) -> tuple[bool, str]:
        """(ok, text for the model). Unknown tools and bad arguments are errors for the model.
        Traced as an `agent.tool` span."""
        with tracing.span("agent.tool", {"orfeas.agent": self.spec.name, "orfeas.tool": name}) as s:
            ok, text = await self._call_tool(name, arguments, parse_error, idempotency_key)
            s.set_attribute("orfeas.ok", ok)
            return ok, text

    async def _call_tool(self, name: str, arguments: Any, parse_error: str | None,
                         idempotency_key: str | None) -> tuple[bool, str]:
        if parse_error:
            return False, f"error: {parse_error}"
        tool = self.tools.get(name)
        if tool is None:
            return False, f"error: unknown tool {name!r}; available: {sorted(self.tools)}"
        try:
            return True, json.dumps(await tool(arguments, idempotency_key=idempotency_key), default=str)
        except ToolError as e:
            return False, f"error: {e}"
        except Exception as e:  # a tool bug must not kill the agent
            log.exception("tool %s failed", name)
            return False, f"error: tool {name!r} failed: {type(e).__name__}"


class AgentActor:
    """The agent as an async Ray actor."""

    def __init__(self, spec: dict, settings: dict, coordinator: str):
        self.settings = settings_from_dict(settings)
        self.core = AgentCore(AgentSpec.model_validate(spec), self.settings, gateway_chat(self.settings))
        tracing.configure(self.settings.tracing, "agent")
        self.coordinator_name = coordinator
        self._coordinator = None
        self.busy = 0

    def _coord(self):
        if self._coordinator is None:
            self._coordinator = ray.get_actor(self.coordinator_name, namespace=ACTOR_NAMESPACE)
        return self._coordinator

    async def _heartbeats(self, task_id: str) -> None:
        while True:
            try:
                self._coord().heartbeat.remote(task_id)
            except Exception:  # the coordinator may be gone; the task goes on
                self._coordinator = None
            await asyncio.sleep(self.settings.agents.heartbeat_s)

    async def run_task(self, task_id: str, task: str, idempotency_prefix: str = "",
                       caller: Principal | None = None, trace: dict[str, str] | None = None) -> dict[str, Any]:
        """One task; `trace`: the step's W3C carrier, the parent of this task's `agent.task` span."""
        self.busy += 1
        beat = asyncio.create_task(self._heartbeats(task_id))
        try:
            with tracing.span("agent.task", {"orfeas.agent": self.core.spec.name, "orfeas.task_id": task_id},
                              parent=trace):
                return await self.core.run(task, idempotency_prefix, caller)
        finally:
            beat.cancel()
            self.busy -= 1
            if tracing.enabled():  # a run's own agents are killed as soon as it ends: export the task's spans
                # now, not after tracing.export_delay_ms; in a thread of its own, so no step waits on it
                threading.Thread(target=tracing.flush, args=(5.0,), kwargs={"sent": False}, daemon=True).start()

    async def call_tool(self, name: str, arguments: Any, idempotency_key: str | None = None) -> tuple[bool, str]:
        return await self.core.call_tool(name, arguments, None, idempotency_key)

    async def info(self) -> dict[str, Any]:
        return {"name": self.core.spec.name, "busy": self.busy, "tools": sorted(self.core.tools)}
