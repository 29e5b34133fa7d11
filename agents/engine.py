"""Drives one workflow run: asks the pure scheduler what to do, runs the steps through a
`StepRunner` (the coordinator), checkpoints every transition and emits events.

The executor holds no decision logic of its own: readiness, retries, backoff, on-failure and
approval all come from `agents.scheduling`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Awaitable, Callable, Protocol

from agents import scheduling as sch
from agents.expressions import ExpressionError, evaluate, render
from agents.scheduling import RunState
from agents.spec import StepSpec
from observability import tracing

log = logging.getLogger(__name__)


class StepFailed(Exception):
    """A step attempt failed. `infra`: the actor running it was lost (retried on a new one);
    `retryable`: False when trying again cannot help (bad template, not a list)."""

    def __init__(self, message: str, *, infra: bool = False, retryable: bool = True, usage: dict | None = None):
        super().__init__(message)
        self.infra, self.retryable, self.usage = infra, retryable, usage


class StepRunner(Protocol):
    async def run_step(self, run: RunState, step: StepSpec, ns: dict[str, Any], idem: str) -> tuple[Any, dict]:
        """Run one attempt (or one fan-out item) of an agent, tool or model step: (output, usage)."""


class RunExecutor:
    def __init__(self, run: RunState, runner: StepRunner, save: Callable[[RunState], None],
                 emit: Callable[[str, dict], Awaitable[None]], max_parallel: int = 16, default_timeout_s: float = 300,
                 on_finish: Callable[[RunState], None] | None = None,
                 on_step: Callable[[RunState, str], None] | None = None, trace: dict[str, str] | None = None,
                 max_foreach_items: int | None = None):
        self.run = run
        self.trace = trace  # the W3C carrier the run's span continues (the request that started it)
        self.max_foreach_items = max_foreach_items
        self.runner, self.save, self.emit = runner, save, emit
        self.max_parallel, self.default_timeout_s = max_parallel, default_timeout_s
        self.on_finish, self.on_step = on_finish, on_step
        self.wake = asyncio.Event()
        self.tasks: dict[str, asyncio.Task] = {}
        # Cancel and approve come from the coordinator's control thread (its own event loop), so
        # that they never queue behind this loop. Every change of the run state, from either
        # thread, is computed from the current state and saved under one lock (`_change`), so
        # none is lost; once `cancelled` is set nothing of the run starts any more.
        self.cancelled = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ outside requests

    def poke(self) -> None:
        """Wake the loop, from any thread."""
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if self.loop is None or here is self.loop:
            self.wake.set()
        else:
            self.loop.call_soon_threadsafe(self.wake.set)

    def apply(self, change: Callable[[RunState], RunState]) -> tuple[RunState, RunState]:
        """Apply a change made outside the loop (approve) from any thread: computed from the
        current state and checkpointed in one step, then the loop is woken. (before, after)."""
        with self._lock:
            before = self.run
            self._set(change(before))
            after = self.run
        self.poke()
        return before, after

    def request_cancel(self) -> None:
        """Cancel the run from any thread: checkpointed before this returns, no step or fan-out item
        starts after it, and the loop is woken to cancel what is in flight and finish the run."""
        with self._lock:
            self.cancelled = True
            self._set(sch.cancel(self.run))
        self.poke()

    def _commit(self, change: Callable[[RunState], RunState]) -> None:
        """The run's next state, computed from the current one under the lock and checkpointed."""
        with self._lock:
            self._set(change(self.run))

    def _set(self, run: RunState) -> None:
        """(Under the lock.) A cancel that came in meanwhile is kept."""
        if self.cancelled and not run.cancel_requested:
            run = sch.cancel(run)
        self.run = run
        self.save(run)

    def _plan(self, now: float) -> tuple[sch.Plan, str]:
        """The scheduler's next moves, checkpointed in the same locked step they were planned in
        (an approval or cancel lands before or after, never between): (plan, status before)."""
        with self._lock:
            p = sch.plan(self.run, now, self.max_parallel)
            before = self.run.status
            if (p.start or p.skip or p.await_approval or p.finish) and not (p.finish and self.tasks):
                self._set(sch.apply_plan(self.run, p, now))
            return p, before

    # ------------------------------------------------------------ the loop

    async def drive(self) -> RunState:
        """Run to the end, as one `workflow.run` span; each step attempt is its child."""
        with tracing.span("workflow.run", {"orfeas.workflow": self.run.workflow.name, "orfeas.run_id": self.run.run_id,
                                           "orfeas.resumed": bool(self.run.resumed)}, parent=self.trace) as s:
            run = await self._drive()
            s.set_attribute("orfeas.status", run.status)
            return run

    async def _drive(self) -> RunState:
        self.loop = asyncio.get_running_loop()
        try:
            while True:
                p, before = self._plan(time.time())
                if p.finish and self.tasks:  # not applied yet: the steps in flight end first
                    for t in self.tasks.values():
                        t.cancel()
                    await asyncio.gather(*self.tasks.values(), return_exceptions=True)
                    self.tasks.clear()
                    continue
                if p.start or p.skip or p.await_approval or p.finish:
                    if self.cancelled and not p.finish:
                        continue  # cancelled while this plan was made: nothing of it starts
                    for sid in p.skip:
                        await self.emit("step.skipped", {"step": sid})
                    for sid in p.await_approval:
                        await self.emit("step.awaiting_approval", {"step": sid,
                                                                   "message": self._approval_message(sid)})
                    for sid in p.start:
                        st = self.run.steps[sid]
                        await self.emit("step.started", {"step": sid, "attempt": st.attempts})
                        self.tasks[sid] = asyncio.create_task(self._attempt(sid))
                    if self.run.status != before and not p.finish:
                        await self.emit("run." + self.run.status, {})
                if p.finish:
                    await self.emit("run." + p.finish, {"error": p.error, "output": self.run.output})
                    if self.on_finish:
                        self.on_finish(self.run)
                    return self.run
                timeout = None if p.wake_at is None else max(p.wake_at - time.time(), 0)
                waiters = [asyncio.create_task(self.wake.wait())] + list(self.tasks.values())
                done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                waiters[0].cancel()
                self.wake.clear()
                for sid, task in list(self.tasks.items()):
                    if task.done():
                        del self.tasks[sid]
                        await self._finish_step(sid, task)
        except asyncio.CancelledError:
            for t in self.tasks.values():
                t.cancel()
            raise

    def _approval_message(self, sid: str) -> str | None:
        msg = self.run.workflow.step(sid).message
        try:
            return render(msg, sch.namespace(self.run)) if msg else None
        except ExpressionError:
            return msg

    async def _finish_step(self, sid: str, task: asyncio.Task) -> None:
        now = time.time()
        if task.cancelled() or self.cancelled:
            return  # a cancelled run's steps end as cancelled, whatever they answered
        exc = task.exception()
        if exc is None:
            output, usage = task.result()
            self._commit(lambda run: sch.record_success(run, sid, output, now, usage))
            await self.emit("step.succeeded", {"step": sid, "output": output,
                                               "attempt": self.run.steps[sid].attempts})
            covered = self.run.workflow.handlers().get(sid)
            if covered:
                await self.emit("step.recovered", {"step": covered, "by": sid})
        else:
            failed = exc if isinstance(exc, StepFailed) else StepFailed(f"{type(exc).__name__}: {exc}")
            self._commit(lambda run: sch.record_failure(run, sid, str(failed), now, infra=failed.infra,
                                                        retryable=failed.retryable, usage=failed.usage))
            st = self.run.steps[sid]
            if st.status == "retry_wait":
                await self.emit("step.retrying", {"step": sid, "error": str(failed), "infra": failed.infra,
                                                  "retry_at": st.next_attempt_at})
            else:
                await self.emit("step.failed", {"step": sid, "error": str(failed), "handler": st.handled_by})
        if self.on_step:
            self.on_step(self.run, sid)

    async def _attempt(self, sid: str) -> tuple[Any, dict]:
        step = self.run.workflow.step(sid)
        with tracing.span("workflow.step", {"orfeas.step": sid, "orfeas.step.kind": step.kind,
                                            "orfeas.attempt": self.run.steps[sid].attempts}):
            return await self._run_attempt(sid)

    async def _run_attempt(self, sid: str) -> tuple[Any, dict]:
        step = self.run.workflow.step(sid)
        timeout = step.timeout_s or self.default_timeout_s
        try:
            async with asyncio.timeout(timeout):
                if step.kind == "condition":
                    try:
                        return bool(evaluate(step.expr, sch.namespace(self.run))), {}
                    except ExpressionError as e:
                        raise StepFailed(f"condition {step.expr!r}: {e}", retryable=False) from None
                if step.foreach:
                    return await self._fan_out(step)
                attempt = self.run.steps[sid].attempts
                return await self.runner.run_step(self.run, step, sch.namespace(self.run),
                                                  f"{self.run.run_id}:{sid}:{attempt}")
        except TimeoutError:
            raise StepFailed(f"step {sid!r} timed out after {timeout:g}s") from None

    async def _fan_out(self, step: StepSpec) -> tuple[list[Any], dict]:
        st = self.run.steps[step.id]
        items = st.items
        if items is None:
            try:
                items = render(step.foreach, sch.namespace(self.run))
            except ExpressionError as e:
                raise StepFailed(f"foreach: {e}", retryable=False) from None
            if not isinstance(items, list):
                raise StepFailed(f"foreach must give a list, not {type(items).__name__}", retryable=False)
            if self.max_foreach_items is not None and len(items) > self.max_foreach_items:
                raise StepFailed(f"foreach gives {len(items)} items, over the limit of {self.max_foreach_items} "
                                 "(agents.max_foreach_items)", retryable=False)
            self._commit(lambda run: sch.set_items(run, step.id, items))
        attempt = st.attempts
        # Items run at most max_parallel at a time: a wide fan-out is a queue, not thousands of
        # tasks at once (and a cancel finds most of it not started).
        slots = asyncio.Semaphore(self.max_parallel)

        async def one(i: int, item: Any):
            async with slots:
                if self.cancelled:  # the run was cancelled while this item waited for a slot
                    raise StepFailed("the run was cancelled", retryable=False)
                ns = {**sch.namespace(self.run), "item": item, "index": i}
                out, u = await self.runner.run_step(self.run, step, ns,
                                                    f"{self.run.run_id}:{step.id}[{i}]:{attempt}")
                # An item's usage is checkpointed with its output: a resumed run counts every call.
                self._commit(lambda run: sch.checkpoint_item(run, step.id, i, out, u))  # each finished item survives a crash
                await self.emit("step.item", {"step": step.id, "index": i})

        todo = [i for i in range(len(items)) if str(i) not in self.run.steps[step.id].item_outputs]
        results = await asyncio.gather(*(one(i, items[i]) for i in todo), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            infra = any(isinstance(e, StepFailed) and e.infra for e in errors)
            raise StepFailed(f"{len(errors)} of {len(todo)} items failed; first: {errors[0]}", infra=infra)
        outputs = self.run.steps[step.id].item_outputs
        return [outputs[str(i)] for i in range(len(items))], {}  # the items' usage is counted already
