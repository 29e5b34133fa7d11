"""The coordinator: a detached, named async actor that runs workflows (checkpointed, so a new
coordinator resumes them from the last checkpoint), settles conflicting answers, and gives agent
steps to its agent registry (agents.registry: discovery, assignment by capability and load, tasks
tracked with heartbeats).

    coordinator(settings)            # handle to this data directory's coordinator (created once)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayTaskError

from agents import limits
from agents import scheduling as sch
from agents.agent import AgentError, gateway_chat, usage_of
from agents.assignment import Candidate, judge_prompt, pick, read_judge_choice, resolve
from agents.checkpoints import RUN_ID, CheckpointStore
from security.audit import audit_event
from security.encryption import field_cipher
from security.log_redaction import install_log_redaction
from agents.engine import RunExecutor, StepFailed
from agents.expressions import ExpressionError, render
from agents.metrics import WorkflowMetrics
from agents.registry import AgentRegistry, Conflict
from agents.scheduling import RunState
from agents.spec import StepSpec, WorkflowError, WorkflowSpec
from agents.tools import SHIPPED_TOOLS, ToolError, build_tools
from config import AgentSpec, Settings, settings_from_dict
from config.actors import detached_actor
from security.auth import OPERATOR, Principal
from models.errors import InvalidRequest, NotFound
from observability import tracing

log = logging.getLogger(__name__)

EVENTS_KEPT = 5_000
CANCEL_WAIT_S = 10.0
# Ray gives each concurrency group of an async actor its own event loop and thread, so what is
# in these groups is answered while the default loop that drives the runs is busy or held (a slow
# checkpoint write, a burst of step transitions, thousands of fan-out items):
# - control: status, listing, cancel and approve;
# - events: the event long polls (an open SSE stream holds one for up to 15 s: they have their
#   own group, so a crowd of streams cannot take control's places);
# - intake: starting runs (validation, limits, the first checkpoint).
# State shared across the threads: the run table and the agent registry change under `_lock`;
# a run's state changes under its executor's lock (agents.engine); a run's events are numbered
# and written under that run's own lock; dicts are read as snapshots (list(...), atomic under
# the GIL), never iterated while another thread may change them.
CONTROL = "control"
EVENTS = "events"
INTAKE = "intake"
CONCURRENCY_GROUPS = {CONTROL: 100, EVENTS: 1000, INTAKE: 100}


@ray.remote(num_cpus=0, max_retries=0)
def run_tool(settings: dict, name: str, args: dict, idempotency_key: str, caller: Principal | None = None) -> Any:
    """A workflow's tool step, as a plain Ray task (a crashing tool cannot take the coordinator),
    made for the run's caller."""
    from agents.tools import current_caller  # here: a ContextVar cannot travel with the pickled task

    tool = build_tools(settings_from_dict(settings), [name])[name]

    async def call() -> Any:
        current_caller.set(caller)
        return await tool(args, idempotency_key=idempotency_key)

    return asyncio.run(call())


def coordinator_name(settings: Settings) -> str:
    digest = hashlib.sha1(str(settings.resolved_data_dir()).encode()).hexdigest()[:10]
    return f"{settings.agents.coordinator_name}-{digest}"


def checkpoint_root(settings: Settings) -> str:
    return settings.agents.checkpoint_uri or str(settings.resolved_data_dir() / "workflows")


def definitions_dir(settings: Settings) -> Path:
    return Path(settings.agents.workflows_dir) if settings.agents.workflows_dir else \
        settings.resolved_data_dir() / "workflows" / "definitions"


def coordinator(settings: Settings):
    """This data directory's coordinator (created on first use; restarted by Ray if it dies)."""
    remote = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(Coordinator)
    return detached_actor(remote, coordinator_name(settings), settings.to_dict(), durable=True,
                          max_concurrency=1000)


def _text(value: Any) -> str:
    """A rendered template as message text: a template that is one expression renders to its
    value (a number, a list), which a chat message carries as JSON text."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


class Coordinator:
    def __init__(self, settings: dict):
        self.settings = settings_from_dict(settings)
        self.cfg = self.settings.agents
        self.name = coordinator_name(self.settings)
        self.store = CheckpointStore(checkpoint_root(self.settings), field_cipher(self.settings))
        self.metrics = WorkflowMetrics()
        self._lock = threading.RLock()  # the run table (runs, drivers) and the registry
        self.registry = AgentRegistry(self.cfg, self.name, self.settings.to_dict(), self._lock, self._tracked)
        self.runs: dict[str, RunExecutor] = {}
        self.drivers: dict[str, asyncio.Task] = {}  # run id -> the task driving it (on the default loop)
        self.events: dict[str, list[dict]] = {}
        self._emitting: dict[str, threading.Lock] = {}  # run id -> the lock its events are written under
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}  # events_after's
        self._chat = gateway_chat(self.settings)
        self._resumed_at_start: list[str] = []
        self.traces: dict[str, dict[str, str]] = {}  # run id -> the W3C carrier of the request that started it
        self.inflight: dict[str, set] = {}  # run id -> the Ray refs its steps await (a cancel cancels them)
        self._loop: asyncio.AbstractEventLoop | None = None  # the default group's loop, where runs are driven
        tracing.configure(self.settings.tracing, "coordinator")
        install_log_redaction(self.settings)  # run errors it logs may quote user content (pii.logs)
        self._started = False

    # ------------------------------------------------------------ lifecycle

    async def ping(self) -> dict[str, Any]:
        await self._start_once()
        return {"name": self.name, "runs_active": len(self.drivers), "resumed_at_start": self._resumed_at_start}

    async def _start_once(self) -> None:
        if self._started:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        asyncio.create_task(self.registry.watchdog())
        if self.cfg.auto_resume:
            for run_id in self.store.run_ids():
                run = self.store.load(run_id)
                if run is not None and run.status not in sch.TERMINAL_RUN:
                    self._resumed_at_start.append(run_id)
                    await self._drive(sch.resume(run), "run.resumed")

    async def _ensure_started(self) -> None:
        """Start (resume runs) on the default group's loop, also when the first call is a control
        one: an actor method runs on its group's loop, and runs must be driven on the default one."""
        if self._started:
            return
        try:
            me = ray.get_runtime_context().current_actor
        except RuntimeError:  # a plain object (unit tests): one loop for everything
            me = None
        if me is None:
            await self._start_once()
        else:
            await me.ping.remote()

    @contextmanager
    def _tracked(self, run_id: str, ref):
        """`ref` is in flight for `run_id` while the block runs (a cancel from the control group
        cancels it directly, without waiting for the default loop)."""
        refs = self.inflight.setdefault(run_id, set())
        refs.add(ref)
        try:
            yield ref
        finally:
            refs.discard(ref)

    # ------------------------------------------------------------ registry and tasks (agents.registry)

    async def register_agent(self, spec: dict) -> dict:
        return self.registry.replace_global(AgentSpec.model_validate(spec))

    async def agents(self, capability: str | None = None, include_runs: bool = False) -> list[dict]:
        """The registry (discovery): every global agent, or those with a capability."""
        return self.registry.listing(capability, include_runs)

    async def heartbeat(self, task_id: str) -> None:
        self.registry.heartbeat(task_id)

    async def tasks_in_flight(self) -> list[dict]:
        return self.registry.tasks_in_flight()

    # ------------------------------------------------------------ running steps (StepRunner)

    async def run_step(self, run: RunState, step: StepSpec, ns: dict[str, Any], idem: str) -> tuple[Any, dict]:
        executor = self.runs.get(run.run_id)
        if executor is not None and executor.cancelled:
            raise StepFailed("the run was cancelled", retryable=False)
        try:
            if step.kind == "agent":
                return await self._agent_step(run, step, render(step.task, ns), idem)
            if step.kind == "tool":
                args = render(step.args, ns)
                ref = run_tool.remote(self.settings.to_dict(), step.tool, args, idem, run.caller)
                try:
                    with self._tracked(run.run_id, ref):
                        out = await ref
                except asyncio.CancelledError:
                    ray.cancel(ref)
                    raise
                except RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    raise StepFailed(f"tool {step.tool!r}: {cause if isinstance(cause, ToolError) else e}") from None
                return out, {}
            if step.kind == "model":
                messages = ([{"role": "system", "content": _text(render(step.system, ns))}] if step.system else []) + \
                           [{"role": "user", "content": _text(render(step.prompt, ns))}]
                model = step.model or self.cfg.default_model
                if not model:
                    raise StepFailed("model step names no model and agents.default_model is empty", retryable=False)
                try:
                    reply = await self._chat(model, messages, step.max_tokens, None, run.caller)
                except AgentError as e:
                    raise StepFailed(str(e)) from None
                return reply["content"] or "", usage_of(reply, messages)
        except ExpressionError as e:
            raise StepFailed(f"template: {e}", retryable=False) from None
        raise StepFailed(f"step kind {step.kind!r} is not run by agents", retryable=False)

    async def _agent_step(self, run: RunState, step: StepSpec, task: str, idem: str) -> tuple[Any, dict]:
        if step.agents:
            regs = [self.registry.lookup(run.run_id, n) for n in step.agents]
            results = await asyncio.gather(*(self.registry.on_agent(r, run, step.id, task, f"{idem}:{r.spec.name}")
                                             for r in regs))
            usage = _sum_usage(r.pop("usage", {}) for r in results)
            answers = [{"agent": r["agent"], "answer": r["answer"], "priority": reg.spec.priority}
                       for r, reg in zip(results, regs)]
            policy = step.conflict or self.cfg.conflict_policy
            choice = None
            if policy == "judge" and self.cfg.judge_model and len({a["answer"] for a in answers}) > 1:
                try:
                    prompt = judge_prompt(task, answers)
                    verdict = await self._chat(self.cfg.judge_model, prompt, 16, None, run.caller)
                    choice = read_judge_choice(verdict["content"] or "", len(answers))
                    for k, v in usage_of(verdict, prompt).items():
                        usage[k] += v
                except AgentError as e:
                    log.warning("judge model failed, falling back to a vote: %s", e)
            return resolve(answers, policy, choice), usage
        regs = self.registry.candidates(run.run_id, step)
        if not regs:
            raise StepFailed(f"no agent for step {step.id!r}", retryable=False)
        chosen = pick([Candidate(r.spec.name, s.index, s.load, r.spec.priority) for r in regs for s in r.slots])
        reg = next(r for r in regs if r.spec.name == chosen.agent)
        result = await self.registry.on_slot(reg, reg.slots[chosen.slot], run, step.id, task, idem)
        usage = result.pop("usage", {})
        return result, usage

    # ------------------------------------------------------------ runs

    def _check_runnable(self, wf: WorkflowSpec, run_id: str) -> None:
        """Everything a run needs must exist before it starts: agents, capabilities, tools, models."""
        local = {a.name for a in wf.agents}
        for s in wf.steps:
            if s.kind == "agent":
                for name in ([s.agent] if s.agent else []) + s.agents:
                    if name not in local and not self.registry.has_global(name):
                        raise InvalidRequest(f"step {s.id!r}: no agent named {name!r}", "definition")
                if not s.agent and not s.agents:
                    cap = s.capability or "general"
                    if not any(cap in a.capabilities for a in wf.agents) and not self.registry.global_capability(cap):
                        raise InvalidRequest(f"step {s.id!r}: no agent has capability {cap!r}", "definition")
            if s.kind == "tool" and s.tool not in SHIPPED_TOOLS:
                raise InvalidRequest(f"step {s.id!r}: unknown tool {s.tool!r}; shipped: {list(SHIPPED_TOOLS)}",
                                     "definition")
        limits.check_model_steps(wf, self.cfg.default_model)
        for a in wf.agents:
            bad = [t for t in a.tools if t not in SHIPPED_TOOLS]
            if bad:
                raise InvalidRequest(f"agent {a.name!r}: unknown tool(s) {bad}", "definition")

    @ray.method(concurrency_group=INTAKE)
    async def start_run(self, definition: Any, inputs: dict | None = None, owner: str = "anonymous",
                        run_id: str | None = None, caller: Principal | None = None,
                        trace: dict[str, str] | None = None) -> dict:
        """Start a run of a registered workflow (by name) or an inline definition (dict/YAML);
        its model calls are made for `caller` (the key that started it). A Ray driver that names
        none (it holds the cluster itself: the CLI, a test) acts as the operator, by that name.
        `trace`: the starting request's W3C carrier, the parent of the run's `workflow.run` span.

        In the intake group: answered while the default loop is busy with running steps. The
        checks through the run's entry in the run table are one step under `_lock`, so two
        starts (or a start and a resume) never both pass a limit only one fits in."""
        await self._ensure_started()
        if isinstance(definition, str) and "\n" not in definition and ":" not in definition:
            definition = self._definition(definition)
        try:
            wf = WorkflowSpec.parse(definition)
        except WorkflowError as e:
            raise InvalidRequest(str(e), "definition") from None
        if inputs is not None and not isinstance(inputs, dict):
            raise InvalidRequest("inputs must be a JSON object", "inputs")
        run_id = run_id or "run_" + uuid.uuid4().hex[:16]
        if not RUN_ID.match(run_id):
            raise InvalidRequest(f"invalid run id {run_id!r}", "run_id")
        if run_id in self.runs or self.store.load(run_id) is not None:
            raise Conflict(f"run {run_id!r} already exists", "run_id")
        self._check_runnable(wf, run_id)
        size = limits.run_size(wf, inputs or {}, self.cfg)  # 400 over a per-run limit
        with self._lock:
            if run_id in self.runs or self.store.load(run_id) is not None:  # started meanwhile
                raise Conflict(f"run {run_id!r} already exists", "run_id")
            limits.admit([ex.run for ex in list(self.runs.values())], owner, size, self.cfg)  # 429 over a per-key one
            run = RunState.new(run_id, wf, inputs, owner, caller=caller if caller is not None else OPERATOR)
            if trace:
                self.traces[run_id] = trace
            self.store.save(run)
            executor = self._adopt(run)
        self.metrics.run_started(wf.name)
        await self._start_driving(executor, "run.created")
        return self._summary(run)

    async def _drive(self, run: RunState, first_event: str) -> None:
        await self._start_driving(self._adopt(run), first_event)

    def _adopt(self, run: RunState) -> RunExecutor:
        """The run's executor, entered in the run table (from then on the run counts against its
        key's limits and a cancel or approval goes to the executor); not driven yet."""
        with self._lock:
            self.registry.adopt_run(run.run_id, run.workflow.agents)
            self.events.setdefault(run.run_id, self.store.events(run.run_id)[-EVENTS_KEPT:])
            executor = RunExecutor(run, self, self.store.save, lambda e, d, rid=run.run_id: self._emit(rid, e, d),
                                   self.cfg.max_parallel_steps, self.cfg.step_timeout_s,
                                   on_finish=self._finished, on_step=self.metrics.step_done,
                                   trace=self.traces.pop(run.run_id, None),
                                   max_foreach_items=self.cfg.max_foreach_items)
            self.runs[run.run_id] = executor
            return executor

    async def _start_driving(self, executor: RunExecutor, first_event: str) -> None:
        """Emit the run's first event and drive it on the default loop (from another group's loop:
        handed over, not waited for)."""
        run = executor.run
        await self._emit(run.run_id, first_event, {"workflow": run.workflow.name, "resumed": run.resumed})

        def drive() -> None:
            if self.runs.get(run.run_id) is executor and run.run_id not in self.drivers:  # not erased meanwhile
                self.drivers[run.run_id] = asyncio.get_running_loop().create_task(self._guarded(executor))

        if self._on_default_loop():
            drive()
        else:
            self._loop.call_soon_threadsafe(drive)

    def _on_default_loop(self) -> bool:
        return self._loop is None or asyncio.get_running_loop() is self._loop

    def _driven(self, run_id: str) -> RunExecutor | None:
        """The executor driving (or about to drive) an unfinished run; None when the run is only on disk."""
        executor = self.runs.get(run_id)
        return executor if executor is not None and executor.run.status not in sch.TERMINAL_RUN else None

    async def _guarded(self, executor: RunExecutor) -> None:
        run_id = executor.run.run_id
        try:
            await executor.drive()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug must not leave the run silently stuck
            log.exception("run %s crashed", run_id)
            executor.run = executor.run.model_copy(update={"status": "failed", "error": f"engine error: {e}",
                                                           "finished_at": time.time()})
            self.store.save(executor.run)
            await self._emit(run_id, "run.failed", {"error": str(e)})
        finally:
            self.drivers.pop(run_id, None)

    def _finished(self, run: RunState) -> None:
        self.metrics.run_finished(run)
        self.inflight.pop(run.run_id, None)
        with self._lock:
            self.registry.release_run(run.run_id)

    @asynccontextmanager
    async def _writing_events(self, run_id: str):
        """Hold a run's event lock. Another group's thread may hold it through a slow write: this
        waits without holding up its own loop (the other runs' calls on it go on)."""
        lock = self._emitting.setdefault(run_id, threading.Lock())  # setdefault: atomic under the GIL
        while not lock.acquire(blocking=False):
            await asyncio.sleep(0.005)
        try:
            yield
        finally:
            lock.release()

    async def _emit(self, run_id: str, event: str, data: dict) -> None:
        """Number, keep and write one event of a run, from any group's loop."""
        async with self._writing_events(run_id):
            self._append_event(run_id, event, data)

    def _append_event(self, run_id: str, event: str, data: dict) -> None:
        """(Under the run's event lock.) Then the run's events_after waiters are woken, on
        whichever loops they wait."""
        events = self.events.get(run_id)
        if events is None:  # a run not loaded yet (a cancel of a run only on disk): continue its numbering
            events = self.events.setdefault(run_id, self.store.events(run_id)[-EVENTS_KEPT:])
        record = {"seq": (events[-1]["seq"] + 1) if events else 1, "event": event, "time": time.time(), **data}
        events.append(record)
        del events[:-EVENTS_KEPT]
        self.store.append_events(run_id, [record])
        for loop, arrived in list(self._waiters.get(run_id, ())):
            loop.call_soon_threadsafe(arrived.set)

    def _load(self, run_id: str) -> RunState:
        if run_id in self.runs:
            return self.runs[run_id].run
        run = self.store.load(run_id) if RUN_ID.match(run_id or "") else None
        if run is None:
            raise NotFound(f"no workflow run {run_id!r}")
        return run

    def _check_owner(self, run: RunState, owner: str | None) -> None:
        if owner is not None and run.owner != owner:
            raise NotFound(f"no workflow run {run.run_id!r}")  # others' runs are invisible, not forbidden

    def _summary(self, run: RunState) -> dict:
        waiting = [sid for sid, st in run.steps.items() if st.status == "awaiting_approval"]
        return {"id": run.run_id, "object": "workflow.run", "workflow": run.workflow.name, "owner": run.owner,
                "status": run.status, "created_at": run.created_at, "finished_at": run.finished_at,
                "error": run.error, "awaiting_approval": waiting}

    @ray.method(concurrency_group=CONTROL)
    async def get_run(self, run_id: str, owner: str | None = None) -> dict:
        await self._ensure_started()
        run = self._load(run_id)
        self._check_owner(run, owner)
        return {**self._summary(run), "inputs": run.inputs, "output": run.output,
                "steps": {sid: st.model_dump(exclude={"items"}) for sid, st in run.steps.items()},
                "analytics": sch.analytics(run), "definition": run.workflow.model_dump(mode="json", by_alias=True)}

    @ray.method(concurrency_group=CONTROL)
    async def list_runs(self, owner: str | None = None, limit: int = 100) -> list[dict]:
        await self._ensure_started()
        out = []
        for run_id in self.store.run_ids():
            executor = self.runs.get(run_id)
            run = executor.run if executor is not None else self.store.load(run_id)
            if run is not None and (owner is None or run.owner == owner):
                out.append(self._summary(run))
        out.sort(key=lambda r: r["created_at"], reverse=True)
        return out[:limit]

    @ray.method(concurrency_group=EVENTS)
    async def events_after(self, run_id: str, after: int = 0, timeout_s: float = 0.0,
                           owner: str | None = None) -> dict:
        """Events with seq > after (waiting up to timeout_s for one) and whether the run is over.
        In the events group: a stream is fed while the default loop is busy."""
        run = self._load(run_id)
        self._check_owner(run, owner)
        if run_id not in self.events:
            self.events.setdefault(run_id, self.store.events(run_id)[-EVENTS_KEPT:])
        arrived = asyncio.Event()
        waiter = (asyncio.get_running_loop(), arrived)
        self._waiters.setdefault(run_id, set()).add(waiter)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                arrived.clear()  # before reading: an event kept after the read sets it again
                status = self._load(run_id).status
                kept = list(self.events.get(run_id, ()))
                new = [e for e in kept if e["seq"] > after]
                left = deadline - time.monotonic()
                over = status in sch.TERMINAL_RUN
                # The run's state turns terminal (on the loop that drives it) a moment before its
                # run.<status> event is written: the stream is over once that event is kept too,
                # or when a wait for it runs out (a finished run whose events were trimmed).
                settled = over and any(e["event"] == f"run.{status}" for e in kept)
                if new or left <= 0 or settled:
                    return {"events": new, "status": status, "done": settled or (over and timeout_s > 0 and left <= 0)}
                try:
                    await asyncio.wait_for(arrived.wait(), left)
                except TimeoutError:
                    pass
        finally:
            self._waiters.get(run_id, set()).discard(waiter)

    @ray.method(concurrency_group=CONTROL)
    async def cancel(self, run_id: str, owner: str | None = None) -> dict:
        """Cancel a run, on the control group's own loop: the cancel is checkpointed and no step of
        the run starts once it is, whatever the default loop is doing; the Ray tasks and agent
        tasks in flight are cancelled from here. The answer waits (up to CANCEL_WAIT_S) for the
        run to settle as cancelled."""
        await self._ensure_started()
        run = self._load(run_id)
        self._check_owner(run, owner)
        if run.status in sch.TERMINAL_RUN:
            raise Conflict(f"run {run_id!r} is already {run.status}")
        executor = self._driven(run_id)
        if executor is not None:
            executor.request_cancel()
            for ref in list(self.inflight.get(run_id, ())):
                ray.cancel(ref)
            deadline = time.monotonic() + CANCEL_WAIT_S
            while executor.run.status not in sch.TERMINAL_RUN and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        else:  # not being driven (e.g. not resumed yet): settle it on disk
            with self._lock:
                executor = self._driven(run_id)  # adopted meanwhile (a resume): cancel that
                if executor is None:
                    p = sch.plan(sch.cancel(run), time.time())
                    self.store.save(sch.apply_plan(sch.cancel(run), p, time.time()))
            if executor is not None:
                executor.request_cancel()
            else:
                await self._emit(run_id, "run.cancelled", {})
        return self._summary(self._load(run_id))

    @ray.method(concurrency_group=CONTROL)
    async def approve(self, run_id: str, step_id: str | None = None, by: str = "anonymous", approved: bool = True,
                      comment: str = "", owner: str | None = None, request_id: str = "", source: str = "") -> dict:
        """Settle an approval gate, on the control group's loop: the approval is checkpointed and
        the run's loop woken without waiting for it. The change is made on the executor's current
        state under its lock (a step that finishes at the same moment is not lost), and the event
        is written before the loop can emit anything that follows from it."""
        await self._ensure_started()
        action = "workflow.approve" if approved else "workflow.reject"
        where = {"actor": by, "target": f"run:{run_id}", "request_id": request_id, "source": source}
        settle = lambda run: sch.approve(run, step_id, by, approved, comment)  # noqa: E731
        resumed = None
        try:
            self._check_owner(self._load(run_id), owner)
            async with self._writing_events(run_id):
                executor = self._driven(run_id)
                if executor is not None:
                    run, new = executor.apply(settle)
                else:  # only on disk (not resumed): settled there, then driven
                    with self._lock:
                        executor = self._driven(run_id)
                        if executor is not None:
                            run, new = executor.apply(settle)
                        else:
                            run = self._load(run_id)
                            new = settle(run)
                            self.store.save(new)
                            resumed = self._adopt(new)
                settled = next(s for s in new.steps if new.steps[s].approved_by and not run.steps[s].approved_by)
                event = "step.approved" if approved else "step.rejected"
                self._append_event(run_id, event, {"step": settled, "by": by, "comment": comment})
        except (NotFound, sch.ApprovalError) as e:  # a refused approval is audited too
            audit_event(self.settings, action, {"step": step_id, "reason": str(e)[:300]}, outcome="error", **where)
            if isinstance(e, sch.ApprovalError):
                raise Conflict(str(e), "step") from None
            raise
        audit_event(self.settings, action, {"step": settled}, **where)
        if resumed is not None:
            await self._start_driving(resumed, "run.resumed")
        return self._summary(new)

    async def resume(self, run_id: str, owner: str | None = None) -> dict:
        """Continue a run from its last checkpoint (no-op when it is already being driven)."""
        await self._start_once()
        run = self._load(run_id)
        self._check_owner(run, owner)
        with self._lock:
            if self._driven(run_id) is not None:
                return {**self._summary(run), "resumed": False, "reason": "already running"}
            if run.status in sch.TERMINAL_RUN:
                return {**self._summary(run), "resumed": False, "reason": f"run is {run.status}"}
            run = sch.resume(self.store.load(run_id) or run)
            self.store.save(run)
            executor = self._adopt(run)
        await self._start_driving(executor, "run.resumed")
        return {**self._summary(run), "resumed": True}

    # ------------------------------------------------------------ erasure and retention

    async def delete_runs(self, owners: list[str] | None = None, user: str = "",
                          finished_before: float | None = None) -> list[str]:
        """Remove runs from memory and disk: a data subject's (`owners`: the key ids that started
        them, or `user`: whose principal they ran for), running ones cancelled first; or, for
        retention, the runs that finished before `finished_before`. Returns their ids."""
        await self._start_once()
        owners_ = set(owners or ())
        gone = []
        for run_id in self.store.run_ids():
            run = self.runs[run_id].run if run_id in self.runs else self.store.load(run_id)
            if run is None:
                continue
            if finished_before is not None:
                hit = run.status in sch.TERMINAL_RUN and (run.finished_at or run.created_at) < finished_before
            else:
                hit = run.owner in owners_ or bool(user and run.caller is not None and run.caller.user == user)
            if not hit:
                continue
            driver = self.drivers.pop(run_id, None)
            if driver is not None:
                driver.cancel()
                await asyncio.wait([driver], timeout=CANCEL_WAIT_S)
            with self._lock:
                self.runs.pop(run_id, None)
                self.registry.release_run(run_id)  # its own agents
            self.events.pop(run_id, None)
            self._emitting.pop(run_id, None)
            self._waiters.pop(run_id, None)
            self.traces.pop(run_id, None)
            self.store.delete(run_id)
            gone.append(run_id)
        return gone

    # ------------------------------------------------------------ registered workflows

    def _definition(self, name: str) -> dict:
        path = definitions_dir(self.settings) / f"{name}.yaml"
        if not RUN_ID.match(name) or not path.exists():
            raise NotFound(f"no registered workflow {name!r}")
        return path.read_text()

    async def register_workflow(self, definition: Any) -> dict:
        try:
            wf = WorkflowSpec.parse(definition)
        except WorkflowError as e:
            raise InvalidRequest(str(e), "definition") from None
        self._check_runnable(wf, "")
        d = definitions_dir(self.settings)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{wf.name}.yaml").write_text(wf.to_yaml())
        return {"name": wf.name, "steps": len(wf.steps)}

    async def workflows(self) -> list[dict]:
        d = definitions_dir(self.settings)
        out = []
        for p in sorted(d.glob("*.yaml")) if d.exists() else []:
            try:
                wf = WorkflowSpec.parse(p.read_text())
                out.append({"name": wf.name, "description": wf.description, "steps": [s.id for s in wf.steps]})
            except WorkflowError as e:
                out.append({"name": p.stem, "error": str(e)})
        return out


def _sum_usage(usages) -> dict:
    total = {"model_calls": 0, "tokens": 0, "cost": 0.0}
    for u in usages:
        for k in total:
            total[k] += u.get(k, 0)
    return total
