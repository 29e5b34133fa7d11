"""Request and response bodies of the gateway's routes beyond OpenAI's own (those are in
`models.protocol`), so `/openapi.json` describes every route."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")

    response_id: str = Field(min_length=1, max_length=200)
    score: float = Field(ge=-1, le=1, description="1 good, 0 neutral, -1 bad (any value in between).")
    comment: str = Field("", max_length=2000)


class FeedbackResult(BaseModel):
    object: Literal["feedback"] = "feedback"
    response_id: str
    score: float
    experiment: str | None = None
    arm: str | None = None
    model: str | None = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    models: dict[str, str] = Field(default_factory=dict, description="Each model's health: ready, loading or "
                                   "unhealthy (for a caller with a valid API key; empty for anonymous callers).")


class UsageTotals(BaseModel):
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


class BudgetView(BaseModel):
    period: Literal["day", "month"]
    limit_usd: float
    spent_usd: float
    remaining_usd: float


class UsageReport(BaseModel):
    object: Literal["usage"] = "usage"
    key_id: str | None = Field(description="The key reported on; null: every key (admins).")
    since: float | None = Field(description="Start of the window, unix seconds; null: all time.")
    totals: UsageTotals
    by_key: dict[str, UsageTotals]
    by_team: dict[str, UsageTotals]
    by_model: dict[str, UsageTotals]
    budget: BudgetView | None = Field(None, description="The key's own budget, when it has one.")


class Orchestration(BaseModel):
    """What `serve.router.orchestrator.Orchestrator.run` answers, with the response's id."""

    id: str
    object: Literal["orchestration"] = "orchestration"
    created: int
    strategy: str
    answer: Any
    plan: dict[str, Any] | None = None
    subtasks: list[dict[str, Any]] = Field(default_factory=list, description="Each subtask and its result.")
    selected: Any = Field(None, description="What a vote or judge chose, when the strategy chooses.")
    validation: Any = Field(None, description="The schema check of the answer, when a schema was given.")
    timings: dict[str, Any] = Field(default_factory=dict)
    calls: list[dict[str, Any]] = Field(default_factory=list, description="Every model call made, with its cost.")
    usage: dict[str, int] = Field(default_factory=dict)
    cost_usd: float = 0.0


class RouterStatus(BaseModel):
    backends: dict[str, Any] = Field(description="Per-backend health and breaker state of this replica.")
    routes: list[dict[str, Any]] = Field(description="The names the router answers and what each routes to.")
