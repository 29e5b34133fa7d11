"""Scaling on Kubernetes: every deployment autoscales in the RayService, the worker groups carry
KubeRay autoscaler v2's options, the head PDB lets nodes drain, vLLM stays on GPU-image workers
(and out of the gateway), and durable-state actors ask for the head's volume."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from k8s_fixtures import fresh, rendered  # noqa: F401  (fixtures)

from cluster import k8s_render, k8s_validate
from config import ModelSpec
from models.engines.vllm_engine import configured_max_model_len, engine_kwargs

find = k8s_render.find_object
ROOT = Path(__file__).resolve().parents[2]


def _serve(objs) -> dict:
    return yaml.safe_load(find(objs, "RayService")["spec"]["serveConfigV2"])


@pytest.mark.parametrize("overlay", k8s_render.OVERLAYS)
def test_every_deployment_in_the_rayservice_autoscales(rendered, overlay):
    for app in _serve(rendered[overlay])["applications"]:
        deps = app["deployments"]
        assert deps and all(d["autoscaling_config"]["max_replicas"] >= d["autoscaling_config"]["min_replicas"]
                            for d in deps), app["name"]
        policy = deps[0]["autoscaling_config"]["policy"]["policy_function"]
        assert policy == "scaling.policy:ForecastPolicy"


def test_an_app_without_autoscaling_fails(fresh):
    objs = fresh("dev")
    svc = find(objs, "RayService")
    cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    del cfg["applications"][0]["deployments"]
    svc["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)
    assert any("has no deployment with an autoscaling_config" in p for p in k8s_validate.policy_problems(objs))


def test_worker_groups_carry_autoscaler_v2_options(rendered, fresh):
    cluster = find(rendered["gpu"], "RayService")["spec"]["rayClusterConfig"]
    assert cluster["autoscalerOptions"]["version"] == "v2"
    for g in cluster["workerGroupSpecs"]:
        assert g["template"]["spec"]["restartPolicy"] == "Never" and g["idleTimeoutSeconds"] > 0
    objs = fresh("gpu")
    c = find(objs, "RayService")["spec"]["rayClusterConfig"]
    del c["workerGroupSpecs"][0]["template"]["spec"]["restartPolicy"]
    c["autoscalerOptions"]["version"] = "v1"
    problems = k8s_validate.policy_problems(objs)
    assert any("restartPolicy Never" in p for p in problems) and any("must be v2" in p for p in problems)


def test_the_head_pdb_lets_nodes_drain(rendered, fresh):
    pdb = find(rendered["dev"], "PodDisruptionBudget", "orfeas-ray-head")
    assert pdb["spec"]["maxUnavailable"] == 1
    objs = fresh("dev")
    find(objs, "PodDisruptionBudget", "orfeas-ray-head")["spec"]["maxUnavailable"] = 0
    assert any("blocks node drains" in p for p in k8s_validate.policy_problems(objs))


@pytest.mark.parametrize("overlay", ["gpu", "aws", "gcp", "azure"])
def test_vllm_apps_and_their_build_task_are_pinned_to_gpu_image_workers(rendered, overlay):
    """Serve's build task follows the label selector the app's deployments share
    (ray.serve._private.application_state._get_shared_build_app_label_selector)."""
    from ray.serve._private.application_state import _get_shared_build_app_label_selector
    from ray.serve.schema import ServeApplicationSchema

    objs = rendered[overlay]
    groups = find(objs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    vllm = [a for a in _serve(objs)["applications"] if a["import_path"].startswith("models.engines.vllm_engine")]
    assert vllm
    for app in vllm:
        selector = _get_shared_build_app_label_selector(ServeApplicationSchema(**app))
        assert selector == k8s_render.GPU_NODE_LABEL
        hosts = [g["groupName"] for g in groups if k8s_validate._labels(g).get("orfeas.io/image") == "gpu"]
        assert hosts == ["gpu-workers"]
        assert app["args"]["gpu_label"] == k8s_render.GPU_NODE_LABEL


def test_a_vllm_app_without_the_gpu_label_fails(fresh):
    objs = fresh("gpu")
    svc = find(objs, "RayService")
    cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    for app in cfg["applications"]:
        for d in app.get("deployments") or []:
            d.pop("ray_actor_options", None)
    svc["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)
    assert any("may land on a CPU-image worker" in p for p in k8s_validate.policy_problems(objs))
    groups = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    groups[0]["rayStartParams"]["labels"] = "orfeas.io/image=gpu"
    objs2 = fresh("gpu")
    find(objs2, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"]["labels"] = \
        "orfeas.io/image=gpu"
    assert any("matches the non-GPU group cpu-workers" in p for p in k8s_validate.policy_problems(objs2))


def test_max_model_len_follows_the_model_unless_set():
    plain = ModelSpec(id="m", engine="vllm", source="org/m", num_gpus=1)
    assert configured_max_model_len(plain) is None and "max_model_len" not in engine_kwargs(plain)
    assert engine_kwargs(ModelSpec(id="m", engine="vllm", source="org/m", max_context=8192))["max_model_len"] == 8192
    assert engine_kwargs(ModelSpec(id="m", engine="vllm", source="org/m",
                                   engine_kwargs={"max_model_len": 4096}))["max_model_len"] == 4096


def test_num_gpus_maps_to_tensor_parallelism():
    assert engine_kwargs(ModelSpec(id="m", engine="vllm", source="org/m", num_gpus=4))["tensor_parallel_size"] == 4
    assert "tensor_parallel_size" not in engine_kwargs(ModelSpec(id="m", engine="vllm", source="org/m", num_gpus=1))
    own = ModelSpec(id="m", engine="vllm", source="org/m", num_gpus=4, engine_kwargs={"tensor_parallel_size": 2,
                                                                                    "pipeline_parallel_size": 2})
    assert engine_kwargs(own)["tensor_parallel_size"] == 2


# Modules the gateway's replicas run; only build_vllm_app (on a GPU worker) may reach vLLM.
GATEWAY_SIDE = ["serve/gateway", "serve/router", "serve/http", "models/engines/vllm_engine.py"]
VLLM_MODULES = ("vllm", "ray.serve.llm.openai_api_models", "models.engines.vllm_server", "ray.llm")


def _imports(path: Path) -> list[tuple[str, str]]:
    """(enclosing function, module) of every import in the file, function-local ones too."""
    out = []

    def walk(node, fn):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else fn
            if isinstance(child, ast.Import):
                out.extend((fn, a.name) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module:
                out.extend((fn, f"{child.module}.{a.name}") for a in child.names)
            walk(child, name)

    walk(ast.parse(path.read_text()), "<module>")
    return out


def test_the_gateway_never_imports_vllm():
    """The gateway runs on CPU-image workers: importing ray.serve.llm's OpenAI models there
    raises (they import vLLM). It sends LLMServer plain dicts (OrfeasLLMServer validates them)."""
    bad = []
    for rel in GATEWAY_SIDE:
        for f in sorted((ROOT / rel).rglob("*.py")) if (ROOT / rel).is_dir() else [ROOT / rel]:
            for fn, mod in _imports(f):
                if fn != "build_vllm_app" and any(mod == v or mod.startswith(v + ".") for v in VLLM_MODULES):
                    bad.append(f"{f.relative_to(ROOT)}:{fn} imports {mod}")
    assert bad == []
    # And at run time: the gateway's modules load with vLLM and ray.serve.llm unimportable.
    code = ("import sys; sys.modules['vllm'] = None; sys.modules['ray.serve.llm'] = None\n"
            "import serve.gateway.app, models.engines.vllm_engine\n"
            "print(sorted(m for m in sys.modules if m.startswith(('vllm', 'ray.llm')) and sys.modules[m]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


# Actors that hold durable state (keys, ledger, coordinator + checkpoints, shared state, the
# Qdrant Edge owner, the audit chain where it exists) and the module that makes each.
DURABLE = {"KeyStore", "Ledger", "Coordinator", "SharedState", "_EdgeStoreOwner", "AuditChain", "AuditLog"}


def test_every_durable_state_actor_asks_for_the_volume():
    """config/actors.py places `durable=True` actors on the node advertising orfeas_state (the
    head, which mounts the PV in the RayService); an actor holding state without it could land
    on a worker's emptyDir."""
    seen, bad = set(), []
    for f in sorted(ROOT.rglob("*.py")):
        if {".venv", ".git", "tests"} & set(f.relative_to(ROOT).parts):
            continue
        tree = ast.parse(f.read_text())
        # `remote = ray.remote(concurrency_groups=...)(Coordinator)`: the class a name was made from.
        made_from = {t.id: n.value.args[0].id for n in ast.walk(tree) if isinstance(n, ast.Assign)
                     and isinstance(n.value, ast.Call) and isinstance(n.value.func, ast.Call)
                     and n.value.args and isinstance(n.value.args[0], ast.Name)
                     for t in n.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "detached_actor" and node.args:
                cls = getattr(node.args[0], "id", None)
                cls = made_from.get(cls, cls)
                durable = any(k.arg == "durable" and getattr(k.value, "value", False) is True for k in node.keywords)
                if cls in DURABLE:
                    seen.add(cls)
                    if not durable:
                        bad.append(f"{f.relative_to(ROOT)}:{node.lineno} {cls}")
    assert bad == []
    assert {"KeyStore", "Ledger", "Coordinator", "SharedState", "_EdgeStoreOwner"} <= seen


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_images_carry_every_room_the_serve_apps_import(flavour):
    """serveConfigV2 names scaling.policy (Serve's controller imports it) and the apps import
    agents, analytics and security: an image without one of them fails at deploy."""
    text = (k8s_render.KUBERAY_DIR / "images" / f"Dockerfile.{flavour}").read_text()
    rooms = [d.name for d in ROOT.iterdir() if d.is_dir() and (d / "__init__.py").exists() or d.name == "scaling"]
    missing = [r for r in rooms if r not in ("tests", "benchmarks") and f"COPY --chown=1000:100 {r} ./{r}" not in text]
    assert missing == []
