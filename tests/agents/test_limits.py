"""Workflow limits and definition checks, without Ray: the pure checks, and a coordinator run
in-process (its runs wait on approval gates, so no step needs the cluster)."""

import asyncio

import pytest

from agents import limits
from agents import scheduling as sch
from agents.engine import RunExecutor
from agents.spec import WorkflowError, WorkflowSpec
from config import Settings
from config.settings import AgentsSettings
from models.errors import InvalidRequest


def wf(*steps, **kw) -> WorkflowSpec:
    return WorkflowSpec.parse({"name": "w", "steps": list(steps), **kw})


FAN = {"id": "fan", "kind": "tool", "tool": "calculator", "foreach": "${inputs.xs}", "args": {"expression": "${item}"}}


@pytest.mark.parametrize("step", [
    {"id": "a", "kind": "condition", "expr": "__import__('os').system('id')"},
    {"id": "a", "kind": "model", "model": "m", "prompt": "${__import__('os').getcwd()}"},
    {"id": "a", "kind": "tool", "tool": "calculator", "args": {"expression": "${inputs.__class__}"}},
    {"id": "a", "kind": "agent", "task": "${open('/etc/passwd')}"},
    {"id": "a", "kind": "tool", "tool": "calculator", "foreach": "${[x for x in inputs.xs]}"},
    {"id": "a", "kind": "condition", "expr": "os.environ"},
])
def test_unsafe_expressions_are_refused_when_the_workflow_is_defined(step):
    with pytest.raises(WorkflowError, match="not allowed|unknown function|unknown name"):
        wf(step)


def test_safe_expressions_still_parse():
    spec = wf({"id": "a", "kind": "condition", "expr": "len(inputs.xs) > 2 and lower(inputs.s) == 'x'",
               "then": ["b"]}, {"id": "b", "kind": "model", "model": "m", "prompt": "${steps.a.output} ${inputs['s']}"},
              output="${steps.b.output}")
    assert [s.id for s in spec.steps] == ["a", "b"]
    with pytest.raises(WorkflowError, match="output"):
        wf({"id": "a", "kind": "approval"}, output="${__import__('os')}")


def test_a_foreach_over_too_many_items_is_refused_at_creation_naming_the_limit():
    cfg = AgentsSettings(max_foreach_items=100)
    assert limits.run_size(wf(FAN), {"xs": list(range(100))}, cfg) == 100
    with pytest.raises(limits.WorkflowTooLarge, match=r"100000 items.*limit of 100 \(agents.max_foreach_items\)"):
        limits.run_size(wf(FAN), {"xs": list(range(100_000))}, cfg)
    with pytest.raises(InvalidRequest, match="must give a list"):
        limits.run_size(wf(FAN), {"xs": "abc"}, cfg)
    # a fan-out over a step's output is known only when it runs: counted as one now
    dyn = wf({"id": "a", "kind": "approval"}, {**FAN, "foreach": "${steps.a.output.xs}"})
    assert limits.run_size(dyn, {}, cfg) == 2


def test_steps_per_run_count_fan_out_items():
    cfg = AgentsSettings(max_steps_per_run=50)
    with pytest.raises(limits.WorkflowTooLarge, match=r"51 step executions.*agents.max_steps_per_run"):
        limits.run_size(wf(FAN, {"id": "b", "kind": "approval"}), {"xs": list(range(50))}, cfg)


def test_model_step_without_a_model_is_refused_unless_there_is_a_default():
    spec = wf({"id": "a", "kind": "model", "prompt": "hi"})
    with pytest.raises(InvalidRequest, match="needs 'model'"):
        limits.check_model_steps(spec, None)
    limits.check_model_steps(spec, "tiny-chat")


def _coordinator(tmp_path, **agents):
    from agents.coordinator import Coordinator

    settings = Settings(data_dir=tmp_path, agents={"default_model": None, **agents})
    return Coordinator(settings.to_dict())


GATED = {"name": "gated", "steps": [{"id": "gate", "kind": "approval"}]}


def test_coordinator_admits_runs_per_key_and_refuses_with_429_naming_the_limit(tmp_path):
    async def go():
        c = _coordinator(tmp_path, max_active_runs_per_key=2)
        for _ in range(2):
            await c.start_run(GATED, {}, "alice")
        with pytest.raises(limits.WorkflowCapacity, match="agents.max_active_runs_per_key = 2") as e:
            await c.start_run(GATED, {}, "alice")
        assert e.value.status == 429 and e.value.retry_after_s > 0
        await c.start_run(GATED, {}, "bob")  # another key is not held up
        with pytest.raises(InvalidRequest, match="needs 'model'"):
            await c.start_run({"name": "m", "steps": [{"id": "a", "kind": "model", "prompt": "p"}]}, {}, "bob")
        first = (await c.list_runs("alice"))[0]["id"]
        assert (await c.cancel(first, "alice"))["status"] == "cancelled"
        await c.start_run(GATED, {}, "alice")  # a finished run frees its place
        for t in list(c.drivers.values()):
            t.cancel()

    asyncio.run(go())


def test_queued_steps_per_key_count_unfinished_fan_out_items(tmp_path):
    async def go():
        c = _coordinator(tmp_path, max_queued_steps_per_key=30, max_foreach_items=30)
        run = {"name": "fan", "steps": [{"id": "gate", "kind": "approval"}, {**FAN, "needs": ["gate"]}]}
        await c.start_run(run, {"xs": list(range(20))}, "alice")
        with pytest.raises(limits.WorkflowCapacity, match="agents.max_queued_steps_per_key = 30"):
            await c.start_run(run, {"xs": list(range(20))}, "alice")
        for t in list(c.drivers.values()):
            t.cancel()

    asyncio.run(go())


class _Runner:
    """Fan-out items that each make one model call; the first run is interrupted after `stop_after`."""

    def __init__(self, stop_after: int | None = None):
        self.calls, self.stop_after, self.running, self.most = 0, stop_after, 0, 0

    async def run_step(self, run, step, ns, idem):
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0.001)
            self.calls += 1
            if self.stop_after is not None and self.calls > self.stop_after:
                await asyncio.Event().wait()  # hangs: the "coordinator" is lost here
            return ns["item"], {"model_calls": 1, "tokens": 5, "cost": 0.0}
        finally:
            self.running -= 1


def test_a_resumed_fan_out_counts_every_model_call_and_items_run_max_parallel_at_a_time():
    spec = wf({"id": "fan", "kind": "model", "model": "m", "prompt": "${item}", "foreach": "${inputs.xs}"})
    saved: list[sch.RunState] = []

    async def emit(event, data):
        pass

    async def go():
        first = _Runner(stop_after=4)
        ex = RunExecutor(sch.RunState.new("r1", spec, {"xs": list(range(10))}), first, saved.append, emit,
                         max_parallel=1)
        task = asyncio.create_task(ex.drive())
        while not saved or len(saved[-1].steps["fan"].item_outputs) < 4:
            await asyncio.sleep(0.005)
        task.cancel()  # the coordinator dies with 4 items checkpointed
        await asyncio.gather(task, return_exceptions=True)
        assert first.most == 1
        again = _Runner()
        ex = RunExecutor(sch.resume(saved[-1]), again, saved.append, emit, max_parallel=3)
        done = await ex.drive()
        assert again.calls == 6 and again.most <= 3
        return done

    done = asyncio.run(go())
    assert done.status == "succeeded" and done.steps["fan"].output == list(range(10))
    assert sch.analytics(done)["model_calls"] == 10 and sch.analytics(done)["tokens"] == 50


def test_a_dynamic_foreach_over_the_limit_fails_its_step_naming_the_limit():
    spec = wf({"id": "fan", "kind": "model", "model": "m", "prompt": "${item}", "foreach": "${inputs.xs}"})

    async def emit(event, data):
        pass

    async def go():
        ex = RunExecutor(sch.RunState.new("r2", spec, {"xs": list(range(50))}), _Runner(), lambda r: None, emit,
                         max_foreach_items=10)
        return await ex.drive()

    done = asyncio.run(go())
    assert done.status == "failed" and "agents.max_foreach_items" in done.error
