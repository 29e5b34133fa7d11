"""Workflow scheduling as pure functions over a run's state (no Ray, no I/O, no clock reads).

The engine asks `plan(run, now)` what to do, applies it with `apply_plan`, and reports each
step's end with `record_success` / `record_failure`. `resume(run)` turns a checkpoint taken
before a crash back into a run that can continue: steps that were in flight run again, steps
that finished keep their checkpointed output and never run again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field

from agents.spec import StepSpec, WorkflowSpec
from security.auth import Principal

StepStatus = Literal["pending", "running", "retry_wait", "awaiting_approval", "succeeded", "failed",
                     "recovered", "skipped", "cancelled"]
RunStatus = Literal["running", "awaiting_approval", "succeeded", "failed", "cancelled"]

DONE_OK = ("succeeded", "recovered", "skipped")
TERMINAL_STEP = DONE_OK + ("failed", "cancelled")
TERMINAL_RUN = ("succeeded", "failed", "cancelled")
# Losing the actor that runs a step is not the step's fault: it is retried on a new actor
# without spending the step's own retries, this many times at most.
MAX_INFRA_RETRIES = 3


class StepState(BaseModel):
    status: StepStatus = "pending"
    attempts: int = 0
    infra_failures: int = 0
    output: Any = None
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    next_attempt_at: float | None = None
    triggered: bool = False          # an on_failure handler that was activated
    handled_by: str | None = None    # the handler that covers this failed step
    items: list[Any] | None = None   # fan-out: the resolved list
    item_outputs: dict[str, Any] = Field(default_factory=dict)  # fan-out checkpoints by index
    agent: str | None = None
    approved_by: str | None = None
    run_time_s: float = 0.0          # summed over attempts
    model_calls: int = 0
    tokens: int = 0
    cost: float = 0.0


class RunState(BaseModel):
    run_id: str
    workflow: WorkflowSpec
    owner: str = "anonymous"
    caller: Principal | None = None  # whose key the run's model calls are made for (None: the platform's)
    inputs: dict[str, Any] = Field(default_factory=dict)
    status: RunStatus = "running"
    created_at: float = Field(default_factory=time.time)
    finished_at: float | None = None
    cancel_requested: bool = False
    error: str | None = None
    output: Any = None
    steps: dict[str, StepState] = Field(default_factory=dict)
    resumed: int = 0

    @classmethod
    def new(cls, run_id: str, workflow: WorkflowSpec, inputs: dict[str, Any] | None = None,
            owner: str = "anonymous", now: float | None = None, caller: Principal | None = None) -> "RunState":
        merged = {**workflow.inputs, **(inputs or {})}
        return cls(run_id=run_id, workflow=workflow, owner=owner, caller=caller, inputs=merged,
                   created_at=now if now is not None else time.time(),
                   steps={s.id: StepState() for s in workflow.steps})


@dataclass
class Plan:
    start: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    await_approval: list[str] = field(default_factory=list)
    wake_at: float | None = None          # earliest retry due
    finish: RunStatus | None = None       # the run is over with this status
    error: str | None = None


def namespace(run: RunState) -> dict[str, Any]:
    """What templates and conditions see: inputs and each step's output and status."""
    return {"inputs": run.inputs,
            "steps": {sid: {"output": st.output, "status": st.status, "error": st.error}
                      for sid, st in run.steps.items()}}


def backoff_delay(step: StepSpec, attempt: int) -> float:
    """Seconds to wait before attempt `attempt + 1` after `attempt` failed attempts (>= 1)."""
    b = step.backoff
    return min(b.initial_s * b.factor ** max(attempt - 1, 0), b.max_s)


def plan(run: RunState, now: float, max_parallel: int = 1_000_000) -> Plan:
    """Which steps start, get skipped or wait for approval now, and whether the run is over."""
    out = Plan()
    wf = run.workflow
    if run.status in TERMINAL_RUN:
        return out
    if run.cancel_requested:
        out.finish = "cancelled"
        return out
    failed = [sid for sid, st in run.steps.items() if st.status == "failed" and not _covered(run, sid)]
    if failed:
        out.finish, out.error = "failed", f"step {failed[0]!r} failed: {run.steps[failed[0]].error}"
        return out

    deps = wf.dependency_map()
    owners = wf.branch_owner()
    handlers = wf.handlers()
    status = {sid: st.status for sid, st in run.steps.items()}
    running = sum(1 for s in status.values() if s == "running")
    for s in wf.steps:
        st = run.steps[s.id]
        if st.status == "retry_wait":
            if st.next_attempt_at is None or st.next_attempt_at <= now:
                if running < max_parallel:
                    out.start.append(s.id)
                    running += 1
            else:
                out.wake_at = min(out.wake_at or st.next_attempt_at, st.next_attempt_at)
            continue
        if st.status != "pending":
            continue
        if s.id in handlers and not st.triggered:
            continue  # dormant until the step it covers fails
        mine = deps[s.id] - {handlers.get(s.id)}  # a handler may read the step it covers
        if any(status[d] not in DONE_OK for d in mine):
            continue
        if s.id in owners:
            cond, branch = owners[s.id]
            if status[cond] == "skipped" or bool(run.steps[cond].output) != branch:
                out.skip.append(s.id)
                status[s.id] = "skipped"
                continue
        if mine and all(status[d] == "skipped" for d in mine):
            out.skip.append(s.id)
            status[s.id] = "skipped"
            continue
        if s.kind == "approval":
            out.await_approval.append(s.id)
            continue
        if running < max_parallel:
            out.start.append(s.id)
            running += 1

    # Over when nothing can move any more: every step terminal, or only dormant handlers left.
    def settled(sid: str) -> bool:
        st = run.steps[sid]
        return status[sid] in TERMINAL_STEP or (sid in handlers and not st.triggered and status[sid] == "pending")

    if not out.start and all(settled(sid) for sid in run.steps):
        out.finish = "succeeded"
    return out


def _covered(run: RunState, sid: str) -> bool:
    """A failed step whose on_failure handler is still running or has succeeded."""
    handler = run.steps[sid].handled_by
    return handler is not None and run.steps[handler].status not in ("failed", "cancelled", "skipped")


def apply_plan(run: RunState, p: Plan, now: float) -> RunState:
    run = run.model_copy(deep=True)
    for sid in p.skip:
        run.steps[sid].status = "skipped"
        run.steps[sid].finished_at = now
    for sid in p.await_approval:
        run.steps[sid].status = "awaiting_approval"
        run.steps[sid].started_at = run.steps[sid].started_at or now
    for sid in p.start:
        st = run.steps[sid]
        st.status, st.attempts, st.started_at, st.next_attempt_at = "running", st.attempts + 1, now, None
    if p.finish:
        run.status, run.finished_at, run.error = p.finish, now, p.error
        for st in run.steps.values():
            if st.status in ("pending", "running", "retry_wait", "awaiting_approval"):
                st.status = "cancelled" if p.finish == "cancelled" else ("skipped" if st.status == "pending" else "cancelled")
        if p.finish == "succeeded":
            run.output = run_output(run)
    elif any(st.status == "awaiting_approval" for st in run.steps.values()) and \
            not any(st.status in ("running", "retry_wait") for st in run.steps.values()):
        run.status = "awaiting_approval"
    else:
        run.status = "running"
    return run


def run_output(run: RunState) -> Any:
    from agents.expressions import ExpressionError, render

    if run.workflow.output:
        try:
            return render(run.workflow.output, namespace(run))
        except ExpressionError as e:
            return {"error": f"output template: {e}"}
    for s in reversed(run.workflow.steps):
        if run.steps[s.id].status in ("succeeded", "recovered"):
            return run.steps[s.id].output
    return None


def record_success(run: RunState, step_id: str, output: Any, now: float,
                   usage: dict[str, float] | None = None) -> RunState:
    run = run.model_copy(deep=True)
    st = run.steps[step_id]
    st.status, st.output, st.error, st.finished_at = "succeeded", output, None, now
    _add_usage(st, usage, now)
    covered = run.workflow.handlers().get(step_id)
    if covered is not None:
        failed = run.steps[covered]
        failed.status, failed.output = "recovered", output
    return run


def record_failure(run: RunState, step_id: str, error: str, now: float, *, infra: bool = False,
                   retryable: bool = True, usage: dict[str, float] | None = None) -> RunState:
    """A failed attempt: retry after a backoff while retries remain (actor loss does not spend
    them), otherwise fail the step, activating its on_failure handler when it has one."""
    run = run.model_copy(deep=True)
    spec = run.workflow.step(step_id)
    st = run.steps[step_id]
    st.error = error
    _add_usage(st, usage, now)
    if infra and st.infra_failures < MAX_INFRA_RETRIES:
        st.infra_failures += 1
        st.attempts -= 1  # the lost attempt does not count
        st.status, st.next_attempt_at = "retry_wait", now
        return run
    if retryable and st.attempts <= spec.retries:
        st.status, st.next_attempt_at = "retry_wait", now + backoff_delay(spec, st.attempts)
        return run
    st.status, st.finished_at = "failed", now
    if spec.on_failure:
        handler = run.steps[spec.on_failure]
        if handler.status == "pending":
            handler.triggered = True
            st.handled_by = spec.on_failure
    return run


def _add_usage(st: StepState, usage: dict[str, float] | None, now: float) -> None:
    if st.started_at is not None:
        st.run_time_s += max(now - st.started_at, 0.0)
    if usage:
        st.model_calls += int(usage.get("model_calls", 0))
        st.tokens += int(usage.get("tokens", 0))
        st.cost += float(usage.get("cost", 0.0))


def checkpoint_item(run: RunState, step_id: str, index: int, output: Any,
                    usage: dict[str, float] | None = None) -> RunState:
    """A fan-out item's output, and its model use (counted now, so that a resumed run that does
    not run the item again still counts it)."""
    run = run.model_copy(deep=True)
    st = run.steps[step_id]
    st.item_outputs[str(index)] = output
    if usage:
        st.model_calls += int(usage.get("model_calls", 0))
        st.tokens += int(usage.get("tokens", 0))
        st.cost += float(usage.get("cost", 0.0))
    return run


def set_items(run: RunState, step_id: str, items: list[Any]) -> RunState:
    run = run.model_copy(deep=True)
    run.steps[step_id].items = items
    return run


class ApprovalError(ValueError):
    pass


def approve(run: RunState, step_id: str | None, who: str, approved: bool = True,
            comment: str = "", now: float | None = None) -> RunState:
    """Settle an approval gate (the only one waiting when `step_id` is None)."""
    waiting = [sid for sid, st in run.steps.items() if st.status == "awaiting_approval"]
    if step_id is None:
        if not waiting:
            raise ApprovalError("no step of this run is waiting for approval")
        step_id = waiting[0]
    if step_id not in run.steps:
        raise ApprovalError(f"run has no step {step_id!r}")
    if step_id not in waiting:
        raise ApprovalError(f"step {step_id!r} is not waiting for approval (it is {run.steps[step_id].status})")
    now = now if now is not None else time.time()
    run = run.model_copy(deep=True)
    st = run.steps[step_id]
    st.approved_by, st.finished_at = who, now
    st.output = {"approved": approved, "by": who, "comment": comment}
    if approved:
        st.status = "succeeded"
    else:
        st.status, st.error = "failed", f"rejected by {who}" + (f": {comment}" if comment else "")
        handler = run.workflow.step(step_id).on_failure
        if handler and run.steps[handler].status == "pending":
            run.steps[handler].triggered = True
            st.handled_by = handler
    return run


def cancel(run: RunState) -> RunState:
    run = run.model_copy(deep=True)
    run.cancel_requested = True
    return run


def resume(run: RunState) -> RunState:
    """A checkpointed run made ready to continue after its coordinator was lost: steps that were
    in flight go back to pending (the interrupted attempt does not count), finished steps and
    fan-out items keep their outputs."""
    run = run.model_copy(deep=True)
    if run.status in TERMINAL_RUN:
        return run
    for st in run.steps.values():
        if st.status == "running":
            st.status = "pending" if st.attempts <= 1 else "retry_wait"
            st.attempts = max(st.attempts - 1, 0)
            st.next_attempt_at = None
    run.resumed += 1
    return run


def analytics(run: RunState) -> dict[str, Any]:
    """Per-run and per-step figures: status, timings, retries, model use and cost."""
    steps = {}
    for sid, st in run.steps.items():
        steps[sid] = {"status": st.status, "attempts": st.attempts, "retries": max(st.attempts - 1, 0),
                      "actor_losses": st.infra_failures, "run_time_s": round(st.run_time_s, 6),
                      "started_at": st.started_at, "finished_at": st.finished_at,
                      "model_calls": st.model_calls, "tokens": st.tokens, "cost": round(st.cost, 6),
                      "agent": st.agent}
    end = run.finished_at
    return {"status": run.status, "created_at": run.created_at, "finished_at": end,
            "duration_s": round(end - run.created_at, 6) if end else None,
            "steps_total": len(run.steps),
            "steps_succeeded": sum(1 for s in run.steps.values() if s.status in ("succeeded", "recovered")),
            "retries": sum(max(s.attempts - 1, 0) for s in run.steps.values()),
            "model_calls": sum(s.model_calls for s in run.steps.values()),
            "tokens": sum(s.tokens for s in run.steps.values()),
            "cost": round(sum(s.cost for s in run.steps.values()), 6), "resumed": run.resumed, "steps": steps}
