"""Workflow definitions: a DAG of steps, written in YAML or built in Python.

    name: review-pipeline
    inputs: {topic: "Ray Serve"}
    agents:                                   # optional: agents only this workflow uses
      - {name: researcher, capabilities: [research], tools: [kb_search], model: tiny-chat}
    steps:
      - {id: research, kind: agent, capability: research, task: "Find facts about ${inputs.topic}"}
      - {id: draft, kind: agent, agent: writer, task: "Write about: ${steps.research.output.answer}"}
      - {id: review, kind: agent, agents: [rev_a, rev_b, rev_c], conflict: vote, task: "Review ${steps.draft.output.answer}"}
      - {id: ok, kind: condition, expr: "steps.review.output.answer == 'approve'", then: [publish], else: [fix]}
      - {id: publish, kind: approval, message: "Publish?"}
      - {id: fix, kind: model, model: tiny-chat, prompt: "Fix ${steps.draft.output.answer}"}
      - {id: sums, kind: tool, tool: calculator, foreach: "${inputs.exprs}", args: {expression: "${item}"}}

Dependencies are the explicit `needs` plus every step a template reads (`${steps.X...}`) and,
for branch targets, their condition. The same model is built in Python with `WorkflowSpec(...)`
and `StepSpec(...)` (or `WorkflowSpec.from_yaml(text)`).
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agents.expressions import ExpressionError, check, check_templates, references
from config import AgentSpec
from config.settings import ConflictPolicy

StepKind = Literal["agent", "tool", "model", "condition", "approval"]
IDENT = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"


class WorkflowError(ValueError):
    """An invalid workflow definition; the message names the step and the problem."""


class Backoff(BaseModel):
    model_config = ConfigDict(extra="forbid")

    initial_s: float = Field(0.5, ge=0)
    factor: float = Field(2.0, ge=1)
    max_s: float = Field(30.0, ge=0)


class StepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: str = Field(pattern=IDENT)
    kind: StepKind
    needs: list[str] = Field(default_factory=list)
    # agent
    task: str | None = None
    agent: str | None = Field(None, description="A registered agent by name.")
    capability: str | None = Field(None, description="Any agent with this capability (least loaded).")
    agents: list[str] = Field(default_factory=list, description="Several agents answer; conflicts are resolved.")
    conflict: ConflictPolicy | None = None
    # tool
    tool: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    # model
    model: str | None = None
    prompt: str | None = None
    system: str | None = None
    max_tokens: int = Field(256, ge=1)
    # condition
    expr: str | None = None
    then: list[str] = Field(default_factory=list)
    else_: list[str] = Field(default_factory=list, alias="else")
    # approval
    message: str | None = None
    # fan-out: run the step once per item of a list (`item`, `index` in templates); output is the list
    foreach: str | None = None
    # control
    timeout_s: float | None = Field(None, gt=0)
    retries: int = Field(0, ge=0, le=20)
    backoff: Backoff = Field(default_factory=Backoff)
    on_failure: str | None = Field(None, description="Step that runs if this one fails for good; its output "
                                   "stands in for this step's.")

    @model_validator(mode="after")
    def _kind_fields(self) -> "StepSpec":
        need = {"agent": ["task"], "tool": ["tool"], "model": ["prompt"], "condition": ["expr"], "approval": []}
        missing = [f for f in need[self.kind] if getattr(self, f) in (None, "")]
        if missing:
            raise ValueError(f"a {self.kind} step needs {', '.join(missing)}")
        if self.kind == "agent" and sum(bool(x) for x in (self.agent, self.capability, self.agents)) > 1:
            raise ValueError("an agent step names one of agent, capability or agents")
        if self.kind in ("condition", "approval") and self.foreach:
            raise ValueError(f"a {self.kind} step cannot fan out")
        if self.kind != "condition" and (self.then or self.else_):
            raise ValueError("then/else belong to condition steps")
        # Every expression is checked now, when the workflow is defined, not when its step runs.
        for name, value in [("expr", self.expr), ("task", self.task), ("args", self.args), ("prompt", self.prompt),
                            ("system", self.system), ("message", self.message), ("foreach", self.foreach)]:
            try:
                if name == "expr" and value:
                    check(value)
                else:
                    check_templates(value)
            except ExpressionError as e:
                raise ValueError(f"{name}: {e}") from None
        return self

    def dependencies(self) -> set[str]:
        deps = set(self.needs)
        for value in (self.task, self.args, self.prompt, self.system, self.message, self.foreach):
            deps |= references(value)
        if self.expr:
            deps |= references("${" + self.expr + "}")
        return deps


class WorkflowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    description: str = ""
    inputs: dict[str, Any] = Field(default_factory=dict, description="Defaults; a run's inputs override them.")
    agents: list[AgentSpec] = Field(default_factory=list)
    steps: list[StepSpec] = Field(min_length=1)
    output: str | None = Field(None, description="Template of the run's output (default: the last step's).")

    @model_validator(mode="after")
    def _graph(self) -> "WorkflowSpec":
        ids = [s.id for s in self.steps]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"step id(s) {dup} appear more than once")
        known = set(ids)
        for s in self.steps:
            for ref, what in [(d, "needs/reads") for d in s.dependencies()] + \
                             [(t, "then/else") for t in s.then + s.else_] + \
                             ([(s.on_failure, "on_failure")] if s.on_failure else []):
                if ref not in known:
                    raise ValueError(f"step {s.id!r} {what} unknown step {ref!r}")
                if ref == s.id:
                    raise ValueError(f"step {s.id!r} refers to itself")
        self.dependency_map()  # raises on cycles
        try:
            check_templates(self.output)
        except ExpressionError as e:
            raise ValueError(f"output: {e}") from None
        return self

    # ------------------------------------------------------------ graph helpers

    def step(self, step_id: str) -> StepSpec:
        return next(s for s in self.steps if s.id == step_id)

    def branch_owner(self) -> dict[str, tuple[str, bool]]:
        """step id -> (condition step id, branch value that runs it)."""
        owner: dict[str, tuple[str, bool]] = {}
        for s in self.steps:
            for t in s.then:
                owner[t] = (s.id, True)
            for t in s.else_:
                owner[t] = (s.id, False)
        return owner

    def handlers(self) -> dict[str, str]:
        """on_failure handler id -> the step it covers."""
        return {s.on_failure: s.id for s in self.steps if s.on_failure}

    def dependency_map(self) -> dict[str, set[str]]:
        owners = self.branch_owner()
        deps = {s.id: s.dependencies() | ({owners[s.id][0]} if s.id in owners else set()) for s in self.steps}
        # Topological check (Kahn): every step must be reachable without a cycle.
        remaining = {k: set(v) for k, v in deps.items()}
        while remaining:
            ready = [k for k, v in remaining.items() if not v]
            if not ready:
                raise ValueError(f"the steps {sorted(remaining)} form a cycle")
            for k in ready:
                del remaining[k]
            for v in remaining.values():
                v.difference_update(ready)
        return deps

    # ------------------------------------------------------------ loading

    @classmethod
    def parse(cls, data: Any) -> "WorkflowSpec":
        """Validate a definition (dict, YAML text or a WorkflowSpec); WorkflowError names the problem."""
        if isinstance(data, WorkflowSpec):
            return data
        if isinstance(data, str):
            try:
                data = yaml.safe_load(data)
            except yaml.YAMLError as e:
                raise WorkflowError(f"workflow is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise WorkflowError("a workflow definition must be a mapping")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            where = _step_name(data, first["loc"])
            raise WorkflowError(f"invalid workflow: {where}{loc + ': ' if loc else ''}"
                                f"{first['msg'].removeprefix('Value error, ')}") from None

    @classmethod
    def from_yaml(cls, text: str) -> "WorkflowSpec":
        return cls.parse(text)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True, exclude_defaults=True), sort_keys=False)


def _step_name(data: dict, loc: tuple) -> str:
    if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
        steps = data.get("steps") or []
        if loc[1] < len(steps) and isinstance(steps[loc[1]], dict) and "id" in steps[loc[1]]:
            return f"step {steps[loc[1]]['id']!r}: "
    return ""
