"""Bounds on workflow runs, checked when a run is created (pure functions; the coordinator
calls them): one key cannot stall the workflows service with a `foreach` over 100,000 items,
thousands of runs or a queue no worker will reach.

- `agents.max_foreach_items`: items of one fan-out (a `foreach` that reads only the run's inputs
  is resolved at creation; one that reads a step's output is checked when it resolves);
- `agents.max_steps_per_run`: step executions of a run, each fan-out item counted;
- `agents.max_active_runs_per_key`: runs of one key not yet finished (429);
- `agents.max_queued_steps_per_key`: step executions of one key's unfinished runs still to do (429).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from agents.expressions import ExpressionError, references, render
from agents.scheduling import TERMINAL_RUN, TERMINAL_STEP, RunState
from agents.spec import StepSpec, WorkflowSpec
from config.settings import AgentsSettings
from models.errors import APIError, InvalidRequest

RETRY_AFTER_S = 5


class WorkflowTooLarge(InvalidRequest):
    """A definition or its inputs go over a per-run limit (400, the limit named)."""

    code = "workflow_limit"


class WorkflowCapacity(APIError):
    """A key has too much unfinished workflow work to start more (429; retry when runs finish)."""

    status, type, code = 429, "rate_limit_error", "workflow_limit"
    retry_after_s = RETRY_AFTER_S


def foreach_width(step: StepSpec, inputs: dict[str, Any]) -> int | None:
    """Items of a fan-out that reads only the run's inputs (None: no fan-out, or known only when
    the steps it reads have run). A foreach that cannot give a list is refused now."""
    if not step.foreach or references(step.foreach):
        return None
    try:
        items = render(step.foreach, {"inputs": inputs, "steps": {}})
    except ExpressionError as e:
        raise InvalidRequest(f"step {step.id!r}: foreach: {e}", "definition") from None
    if not isinstance(items, list):
        raise InvalidRequest(f"step {step.id!r}: foreach must give a list, not {type(items).__name__}", "definition")
    return len(items)


def check_width(step_id: str, width: int, cfg: AgentsSettings) -> None:
    if width > cfg.max_foreach_items:
        raise WorkflowTooLarge(f"step {step_id!r}: foreach gives {width} items, over the limit of "
                               f"{cfg.max_foreach_items} (agents.max_foreach_items)", "definition")


def run_size(wf: WorkflowSpec, inputs: dict[str, Any], cfg: AgentsSettings) -> int:
    """Step executions a new run asks for (a fan-out counts its items); over a limit: 400."""
    merged = {**wf.inputs, **(inputs or {})}
    size = 0
    for step in wf.steps:
        width = foreach_width(step, merged)
        if width is not None:
            check_width(step.id, width, cfg)
        size += 1 if width is None else max(width, 1)
    if size > cfg.max_steps_per_run:
        raise WorkflowTooLarge(f"the run has {size} step executions (fan-out items counted), over the limit of "
                               f"{cfg.max_steps_per_run} (agents.max_steps_per_run)", "definition")
    return size


def steps_left(run: RunState) -> int:
    """Step executions of a run still to do (a fan-out's unfinished items each count)."""
    left = 0
    for sid, st in run.steps.items():
        if st.status in TERMINAL_STEP:
            continue
        if st.items is not None:
            left += max(len(st.items) - len(st.item_outputs), 1)
            continue
        try:
            width = foreach_width(run.workflow.step(sid), run.inputs)
        except InvalidRequest:
            width = None
        left += max(width or 1, 1)
    return left


def admit(active: Iterable[RunState], owner: str, size: int, cfg: AgentsSettings) -> None:
    """Whether `owner` may start a run of `size` step executions beside its unfinished runs (429 if not)."""
    mine = [r for r in active if r.owner == owner and r.status not in TERMINAL_RUN]
    if len(mine) >= cfg.max_active_runs_per_key:
        raise WorkflowCapacity(f"this key has {len(mine)} unfinished workflow runs, the limit "
                               f"(agents.max_active_runs_per_key = {cfg.max_active_runs_per_key}); "
                               "retry when one finishes or cancel one")
    queued = sum(steps_left(r) for r in mine)
    if queued + size > cfg.max_queued_steps_per_key:
        raise WorkflowCapacity(f"this key's unfinished runs have {queued} step executions to do; {size} more would "
                               f"pass the limit (agents.max_queued_steps_per_key = {cfg.max_queued_steps_per_key})")


def check_model_steps(wf: WorkflowSpec, default_model: str | None) -> None:
    """A model step must name a model unless `agents.default_model` is set (400 now, not when it runs)."""
    for step in wf.steps:
        if step.kind == "model" and not (step.model or default_model):
            raise InvalidRequest(f"step {step.id!r}: a model step needs 'model' (agents.default_model is empty)",
                                 "definition")
