"""Workflow metrics through `ray.util.metrics` (Ray's Prometheus export): runs and steps by
status, step durations, retries, model calls and estimated cost."""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from agents.scheduling import RunState


class WorkflowMetrics:
    def __init__(self):
        self.runs = Counter("orfeas_workflow_runs_total", "Workflow runs by final status.",
                            tag_keys=("workflow", "status"))
        self.active = Gauge("orfeas_workflow_runs_active", "Workflow runs in progress.", tag_keys=("workflow",))
        self.steps = Counter("orfeas_workflow_steps_total", "Workflow step attempts by outcome.",
                             tag_keys=("workflow", "kind", "status"))
        self.step_seconds = Histogram("orfeas_workflow_step_seconds", "Step run time (all attempts).",
                                      boundaries=[0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600],
                                      tag_keys=("workflow", "kind"))
        self.retries = Counter("orfeas_workflow_step_retries_total", "Step attempts that were retried.",
                               tag_keys=("workflow", "kind"))
        self.cost = Counter("orfeas_workflow_cost_total", "Estimated model cost of workflow runs.",
                            tag_keys=("workflow",))
        self.model_calls = Counter("orfeas_workflow_model_calls_total", "Model calls made by workflow steps.",
                                   tag_keys=("workflow",))
        self._active: dict[str, int] = {}

    def run_started(self, workflow: str) -> None:
        self._active[workflow] = self._active.get(workflow, 0) + 1
        self.active.set(self._active[workflow], {"workflow": workflow})

    def run_finished(self, run: RunState) -> None:
        wf = run.workflow.name
        self._active[wf] = max(self._active.get(wf, 1) - 1, 0)
        self.active.set(self._active[wf], {"workflow": wf})
        self.runs.inc(1, {"workflow": wf, "status": run.status})
        cost = sum(s.cost for s in run.steps.values())
        if cost:
            self.cost.inc(cost, {"workflow": wf})

    def step_done(self, run: RunState, step_id: str) -> None:
        st, spec = run.steps[step_id], run.workflow.step(step_id)
        tags = {"workflow": run.workflow.name, "kind": spec.kind}
        self.steps.inc(1, {**tags, "status": st.status})
        if st.status == "retry_wait":
            self.retries.inc(1, tags)
        elif st.status in ("succeeded", "failed"):
            self.step_seconds.observe(st.run_time_s, tags)
            if st.model_calls:
                self.model_calls.inc(st.model_calls, {"workflow": run.workflow.name})
