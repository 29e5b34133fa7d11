"""The coordinator's agent registry: the agents it can give tasks to (global ones from settings or
registered later, and each run's own), a replica slot per agent replica (one Ray actor each, one
task at a time), the tasks in flight on them and the heartbeat watchdog that replaces a silent
agent. The coordinator (agents.coordinator) owns one and runs workflow steps through it.

State shared across the coordinator's concurrency-group threads: entries change under the lock
the coordinator passes in (its run-table lock), dicts are read as snapshots."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from agents.agent import AgentActor, AgentError
from agents.engine import StepFailed
from agents.scheduling import RunState
from agents.spec import StepSpec
from agents.tools import SHIPPED_TOOLS
from config import AgentSpec, AgentsSettings
from config.names import ACTOR_NAMESPACE
from models.errors import InvalidRequest
from observability import tracing

log = logging.getLogger(__name__)

GLOBAL = "global"  # the scope of agents every run may use; a run's own agents are scoped by its id
# How long a task waits for its agent actor's first heartbeat (process start, imports) before the
# actor is taken for lost.
AGENT_START_TIMEOUT_S = 60.0


class Conflict(InvalidRequest):
    status, type = 409, "conflict_error"


@dataclass
class Slot:
    agent: str
    index: int
    actor: Any = None
    actor_name: str = ""
    generation: int = 0
    load: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class Registered:
    spec: AgentSpec
    scope: str  # GLOBAL or a run id
    slots: list[Slot]


class AgentRegistry:
    """`track(run_id, ref)`: the coordinator's context manager that keeps a Ray ref in flight for
    its run while it is awaited (a cancel cancels it). `actor_settings`: the settings dict each
    agent actor is started with; `owner`: the coordinator's name (agent actors report to it and
    are named after it)."""

    def __init__(self, cfg: AgentsSettings, owner: str, actor_settings: dict, lock: threading.RLock,
                 track: Callable[[str, Any], AbstractContextManager]):
        self.cfg = cfg
        self.owner = owner
        self._actor_settings = actor_settings
        self._lock = lock
        self._track = track
        self.entries: dict[tuple[str, str], Registered] = {}
        self.tasks: dict[str, dict[str, Any]] = {}  # task id -> the task in flight on a slot
        for spec in cfg.agents:
            self.register(spec, GLOBAL)

    # ------------------------------------------------------------ registration and discovery

    def register(self, spec: AgentSpec, scope: str) -> Registered:
        unknown = [t for t in spec.tools if t not in SHIPPED_TOOLS]
        if unknown:
            raise InvalidRequest(f"agent {spec.name!r}: unknown tool(s) {unknown}; shipped: {list(SHIPPED_TOOLS)}")
        reg = Registered(spec, scope, [Slot(spec.name, i) for i in range(spec.replicas)])
        with self._lock:
            self.entries[(scope, spec.name)] = reg
        return reg

    def replace_global(self, spec: AgentSpec) -> dict:
        """Register (or re-register) a global agent; refused while the old one has tasks."""
        old = self.entries.get((GLOBAL, spec.name))
        if old is not None:
            if any(s.load for s in old.slots):
                raise Conflict(f"agent {spec.name!r} is busy; register it again when its tasks are done")
            self.release(old)
        return self.describe(self.register(spec, GLOBAL))

    def adopt_run(self, run_id: str, specs: list[AgentSpec]) -> None:
        """(Under the lock.) A run's own agents, registered once (a resumed run keeps them)."""
        for spec in specs:
            if (run_id, spec.name) not in self.entries:
                self.register(spec, run_id)

    def release(self, reg: Registered) -> None:
        for slot in reg.slots:
            if slot.actor is not None:
                ray.kill(slot.actor, no_restart=True)
                slot.actor = None

    def release_run(self, run_id: str) -> None:
        """(Under the lock.) Drop a run's own agents and kill their actors."""
        for key in [k for k in list(self.entries) if k[0] == run_id]:
            self.release(self.entries.pop(key))

    def describe(self, reg: Registered) -> dict:
        s = reg.spec
        return {"name": s.name, "role": s.role, "capabilities": s.capabilities, "tools": s.tools,
                "model": s.model or self.cfg.default_model, "fallback_models": s.fallback_models,
                "priority": s.priority, "replicas": s.replicas, "scope": reg.scope,
                "load": sum(sl.load for sl in reg.slots),
                "actors": [{"name": sl.actor_name or None, "alive": sl.actor is not None, "load": sl.load}
                           for sl in reg.slots]}

    def listing(self, capability: str | None = None, include_runs: bool = False) -> list[dict]:
        """Every global agent (and the runs' own with `include_runs`), or those with a capability."""
        return [self.describe(r) for r in list(self.entries.values())
                if (include_runs or r.scope == GLOBAL) and (capability is None or capability in r.spec.capabilities)]

    def has_global(self, name: str) -> bool:
        return (GLOBAL, name) in self.entries

    def global_capability(self, cap: str) -> bool:
        return any(cap in r.spec.capabilities for (scope, _), r in list(self.entries.items()) if scope == GLOBAL)

    def lookup(self, run_id: str, name: str) -> Registered | None:
        return self.entries.get((run_id, name)) or self.entries.get((GLOBAL, name))

    def candidates(self, run_id: str, step: StepSpec) -> list[Registered]:
        """The agents that may take a step: the one it names, or every agent with its capability
        (a run's own agent shadows a global one of the same name)."""
        if step.agent:
            reg = self.lookup(run_id, step.agent)
            return [reg] if reg else []
        cap = step.capability or "general"
        seen: dict[str, Registered] = {}
        for (scope, name), reg in list(self.entries.items()):
            if scope in (run_id, GLOBAL) and cap in reg.spec.capabilities and (name not in seen or scope == run_id):
                seen[name] = reg
        return list(seen.values())

    # ------------------------------------------------------------ tasks

    def heartbeat(self, task_id: str) -> None:
        task = self.tasks.get(task_id)
        if task is not None:
            task["heartbeat"] = time.time()

    def tasks_in_flight(self) -> list[dict]:
        return [{k: v for k, v in t.items() if k != "slot"} for t in list(self.tasks.values())]

    async def watchdog(self) -> None:
        """Kill agents whose task stopped heartbeating: the step fails over to a new actor.

        Silence counts from the agent's first heartbeat; before it, a new actor may still be
        starting (a worker process on a busy node takes seconds), so it gets a longer limit."""
        limit = max(10 * self.cfg.heartbeat_s, 5.0)
        start_limit = max(limit, AGENT_START_TIMEOUT_S)
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            now = time.time()
            for task in list(self.tasks.values()):
                beat = task["heartbeat"]
                silent = now - (beat or task["started"])
                if silent > (limit if beat else start_limit) and task.get("slot") is not None:
                    slot = task["slot"]
                    log.warning("task %s on %s %s for %.0fs: replacing the agent", task["id"], slot.actor_name,
                                "missed heartbeats" if beat else "did not start", silent)
                    if slot.actor is not None:
                        ray.kill(slot.actor, no_restart=True)
                    task["heartbeat"] = now

    def _actor(self, reg: Registered, slot: Slot):
        if slot.actor is None:
            slot.generation += 1
            scope = "" if reg.scope == GLOBAL else f"-{reg.scope[:12]}"
            slot.actor_name = f"{self.owner}-{reg.spec.name}{scope}-{slot.index}-g{slot.generation}"
            slot.actor = ray.remote(AgentActor).options(
                name=slot.actor_name, namespace=ACTOR_NAMESPACE, num_cpus=0, max_restarts=0,
            ).remote(reg.spec.model_dump(mode="json"), self._actor_settings, self.owner)
        return slot.actor

    async def on_agent(self, reg: Registered, run: RunState, step_id: str, task: str, idem: str) -> dict:
        """One task on the least-loaded replica of an agent; one task at a time per replica."""
        slot = min(reg.slots, key=lambda s: (s.load, s.index))
        return await self.on_slot(reg, slot, run, step_id, task, idem)

    async def on_slot(self, reg: Registered, slot: Slot, run: RunState, step_id: str, task: str, idem: str) -> dict:
        run_id = run.run_id
        slot.load += 1
        task_id = uuid.uuid4().hex[:16]
        try:
            async with slot.lock:
                actor = self._actor(reg, slot)
                self.tasks[task_id] = {"id": task_id, "run_id": run_id, "step": step_id, "agent": reg.spec.name,
                                       "actor": slot.actor_name, "started": time.time(), "heartbeat": None,
                                       "slot": slot}
                carrier = tracing.inject()  # the step's span parents the agent's task
                ref = actor.run_task.remote(task_id, task, idem, run.caller, trace=carrier) if carrier else \
                    actor.run_task.remote(task_id, task, idem, run.caller)
                try:
                    with self._track(run_id, ref):
                        return await ref
                except asyncio.CancelledError:
                    ray.cancel(ref)
                    raise
                except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
                    if slot.actor is actor:
                        slot.actor = None  # the next task gets a fresh actor
                    raise StepFailed(f"agent actor {slot.actor_name} was lost: {type(e).__name__}", infra=True) from None
                except RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    raise StepFailed(str(cause) if isinstance(cause, AgentError) else f"agent failed: {e}") from None
        finally:
            slot.load -= 1
            self.tasks.pop(task_id, None)
