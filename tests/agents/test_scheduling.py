"""Workflow scheduling as pure functions: no cluster, no clock."""

import pytest

from agents import scheduling as sch
from agents.spec import WorkflowError, WorkflowSpec


def wf(steps, **kw):
    return WorkflowSpec.parse({"name": "t", "steps": steps, **kw})


def test_dag_order_fan_in_and_templates_add_dependencies():
    spec = wf([{"id": "a", "kind": "tool", "tool": "calculator", "args": {"expression": "1+1"}},
               {"id": "b", "kind": "tool", "tool": "calculator", "args": {"expression": "${steps.a.output.result}"}},
               {"id": "c", "kind": "tool", "tool": "calculator", "args": {"expression": "2"}, "needs": ["a"]},
               {"id": "d", "kind": "model", "prompt": "${steps.b.output} ${steps.c.output}"}])
    run = sch.RunState.new("r1", spec)
    p = sch.plan(run, 0)
    assert p.start == ["a"] and not p.finish
    run = sch.apply_plan(run, p, 0)
    assert sch.plan(run, 1).start == []  # a is running
    run = sch.record_success(run, "a", {"result": 2}, 1)
    p = sch.plan(run, 1)
    assert p.start == ["b", "c"]
    run = sch.apply_plan(run, p, 1)
    run = sch.record_success(run, "b", 2, 2)
    assert sch.plan(run, 2).start == []  # d waits for c too
    run = sch.record_success(run, "c", 2, 2)
    run = sch.apply_plan(run, sch.plan(run, 2), 2)
    run = sch.record_success(run, "d", "done", 3)
    p = sch.plan(run, 3)
    assert p.finish == "succeeded"
    run = sch.apply_plan(run, p, 3)
    assert run.status == "succeeded" and run.output == "done"


def test_retry_with_exponential_backoff_then_failure():
    spec = wf([{"id": "a", "kind": "model", "prompt": "x", "retries": 2,
                "backoff": {"initial_s": 1, "factor": 3, "max_s": 5}}])
    run = sch.apply_plan(sch.RunState.new("r", spec), sch.plan(sch.RunState.new("r", spec), 0), 0)
    run = sch.record_failure(run, "a", "boom", 10)
    assert run.steps["a"].status == "retry_wait" and run.steps["a"].next_attempt_at == 11
    p = sch.plan(run, 10.5)
    assert p.start == [] and p.wake_at == 11
    run = sch.apply_plan(run, sch.plan(run, 11), 11)
    assert run.steps["a"].attempts == 2
    run = sch.record_failure(run, "a", "boom", 12)
    assert run.steps["a"].next_attempt_at == 15  # 1 * 3
    run = sch.apply_plan(run, sch.plan(run, 15), 15)
    run = sch.record_failure(run, "a", "boom again", 16)
    assert run.steps["a"].status == "failed"
    p = sch.plan(run, 16)
    assert p.finish == "failed" and "boom again" in p.error
    assert sch.analytics(sch.apply_plan(run, p, 16))["retries"] == 2


def test_actor_loss_retries_without_spending_retries():
    spec = wf([{"id": "a", "kind": "model", "prompt": "x"}])
    run = sch.apply_plan(sch.RunState.new("r", spec), sch.plan(sch.RunState.new("r", spec), 0), 0)
    for _ in range(sch.MAX_INFRA_RETRIES):
        run = sch.record_failure(run, "a", "actor died", 1, infra=True)
        assert run.steps["a"].status == "retry_wait"
        run = sch.apply_plan(run, sch.plan(run, 1), 1)
        assert run.steps["a"].attempts == 1
    run = sch.record_failure(run, "a", "actor died", 1, infra=True)
    assert run.steps["a"].status == "failed"


def test_on_failure_branch_stands_in_for_the_failed_step():
    spec = wf([{"id": "a", "kind": "model", "prompt": "x", "on_failure": "fix"},
               {"id": "fix", "kind": "model", "prompt": "replan after ${steps.a.error}"},
               {"id": "b", "kind": "model", "prompt": "use ${steps.a.output}"}])
    run = sch.RunState.new("r", spec)
    p = sch.plan(run, 0)
    assert p.start == ["a"]  # the handler is dormant
    run = sch.record_failure(sch.apply_plan(run, p, 0), "a", "bad", 1, retryable=False)
    p = sch.plan(run, 1)
    assert p.start == ["fix"] and not p.finish
    run = sch.record_success(sch.apply_plan(run, p, 1), "fix", "plan B", 2)
    assert run.steps["a"].status == "recovered" and run.steps["a"].output == "plan B"
    p = sch.plan(run, 2)
    assert p.start == ["b"]


def test_unused_handler_is_skipped_at_the_end():
    spec = wf([{"id": "a", "kind": "model", "prompt": "x", "on_failure": "fix"},
               {"id": "fix", "kind": "model", "prompt": "y"}])
    run = sch.RunState.new("r", spec)
    run = sch.record_success(sch.apply_plan(run, sch.plan(run, 0), 0), "a", "ok", 1)
    p = sch.plan(run, 1)
    assert p.finish == "succeeded"
    run = sch.apply_plan(run, p, 1)
    assert run.steps["fix"].status == "skipped" and run.output == "ok"


def test_condition_branches_and_merge():
    spec = wf([{"id": "c", "kind": "condition", "expr": "inputs.n > 2", "then": ["big"], "else": ["small"]},
               {"id": "big", "kind": "model", "prompt": "big"},
               {"id": "small", "kind": "model", "prompt": "small"},
               {"id": "after_big", "kind": "model", "prompt": "x", "needs": ["big"]},
               {"id": "merge", "kind": "model", "prompt": "m", "needs": ["big", "small"]}], inputs={"n": 1})
    run = sch.RunState.new("r", spec)
    run = sch.record_success(sch.apply_plan(run, sch.plan(run, 0), 0), "c", False, 1)
    p = sch.plan(run, 1)
    assert p.skip == ["big", "after_big"] and p.start == ["small"]
    run = sch.record_success(sch.apply_plan(run, p, 1), "small", "s", 2)
    assert sch.plan(run, 2).start == ["merge"]


def test_approval_gate_blocks_until_approved_or_rejected():
    spec = wf([{"id": "gate", "kind": "approval", "message": "ok?"}, {"id": "go", "kind": "model", "prompt": "x",
                                                                     "needs": ["gate"]}])
    run = sch.RunState.new("r", spec)
    p = sch.plan(run, 0)
    assert p.await_approval == ["gate"] and p.start == []
    run = sch.apply_plan(run, p, 0)
    assert run.status == "awaiting_approval"
    assert sch.plan(run, 100).start == [] and not sch.plan(run, 100).finish
    with pytest.raises(sch.ApprovalError):
        sch.approve(run, "go", "alice")
    approved = sch.approve(run, None, "alice", comment="fine")
    assert approved.steps["gate"].output == {"approved": True, "by": "alice", "comment": "fine"}
    assert sch.plan(approved, 1).start == ["go"]
    rejected = sch.approve(run, "gate", "bob", approved=False)
    assert sch.plan(rejected, 1).finish == "failed"


def test_cancel_finishes_the_run_and_cancels_open_steps():
    spec = wf([{"id": "a", "kind": "model", "prompt": "x"}, {"id": "b", "kind": "model", "prompt": "${steps.a.output}"}])
    run = sch.apply_plan(sch.RunState.new("r", spec), sch.plan(sch.RunState.new("r", spec), 0), 0)
    run = sch.cancel(run)
    p = sch.plan(run, 1)
    assert p.finish == "cancelled"
    run = sch.apply_plan(run, p, 1)
    assert run.status == "cancelled" and run.steps["a"].status == "cancelled" and run.steps["b"].status == "cancelled"


def test_resume_reruns_in_flight_steps_only():
    spec = wf([{"id": "a", "kind": "model", "prompt": "x"},
               {"id": "b", "kind": "tool", "tool": "calculator", "foreach": "${inputs.xs}",
                "args": {"expression": "${item}"}, "needs": ["a"]}], inputs={"xs": ["1", "2", "3"]})
    run = sch.RunState.new("r", spec)
    run = sch.record_success(sch.apply_plan(run, sch.plan(run, 0), 0), "a", "A", 1)
    run = sch.apply_plan(run, sch.plan(run, 1), 1)
    run = sch.set_items(run, "b", ["1", "2", "3"])
    run = sch.checkpoint_item(run, "b", 0, 1)
    # ... the coordinator dies here; a new one loads the checkpoint:
    back = sch.resume(sch.RunState.model_validate_json(run.model_dump_json()))
    assert back.steps["a"].status == "succeeded" and back.steps["b"].status == "pending"
    assert back.steps["b"].attempts == 0 and back.steps["b"].item_outputs == {"0": 1} and back.resumed == 1
    assert sch.plan(back, 2).start == ["b"]


def test_max_parallel_limits_starts():
    spec = wf([{"id": f"s{i}", "kind": "model", "prompt": "x"} for i in range(5)])
    assert sch.plan(sch.RunState.new("r", spec), 0, max_parallel=2).start == ["s0", "s1"]


@pytest.mark.parametrize("steps, message", [
    ([{"id": "a", "kind": "model", "prompt": "x"}, {"id": "a", "kind": "model", "prompt": "y"}], "more than once"),
    ([{"id": "a", "kind": "model", "prompt": "${steps.zz.output}"}], "unknown step 'zz'"),
    ([{"id": "a", "kind": "model", "prompt": "x", "needs": ["b"]},
      {"id": "b", "kind": "model", "prompt": "y", "needs": ["a"]}], "cycle"),
    ([{"id": "a", "kind": "agent"}], "needs task"),
    ([{"id": "a", "kind": "teleport"}], "kind"),
    ([{"id": "a", "kind": "condition", "expr": "1 +"}], "expr"),
    ([{"id": "a", "kind": "model", "prompt": "x", "on_failure": "nope"}], "unknown step 'nope'"),
    ([{"id": "bad id", "kind": "model", "prompt": "x"}], "id"),
])
def test_invalid_definitions_name_the_problem(steps, message):
    with pytest.raises(WorkflowError, match=message):
        wf(steps)


def test_yaml_round_trip():
    text = """
name: demo
inputs: {n: 3}
steps:
  - {id: c, kind: condition, expr: "inputs.n > 2", then: [t], else: [e]}
  - {id: t, kind: tool, tool: calculator, args: {expression: "${inputs.n} * 2"}}
  - {id: e, kind: approval}
"""
    spec = WorkflowSpec.from_yaml(text)
    assert spec.step("c").else_ == ["e"]
    assert WorkflowSpec.from_yaml(spec.to_yaml()) == spec
    with pytest.raises(WorkflowError, match="YAML"):
        WorkflowSpec.from_yaml("name: [unclosed")
