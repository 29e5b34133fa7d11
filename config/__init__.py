"""Configuration shared by every room: one pydantic model, loaded from orfeas.yaml and ORFEAS_* variables."""

from config.settings import (
    AgentSpec,
    AgentsSettings,
    AuthSettings,
    ConfigError,
    GatewaySettings,
    LimitSettings,
    ModelSpec,
    RagSettings,
    RouterSettings,
    RaySettings,
    ServeSettings,
    Settings,
    TracingSettings,
    config_path,
    load_settings,
    settings_from_dict,
)

__all__ = [
    "AgentSpec",
    "AgentsSettings",
    "AuthSettings",
    "ConfigError",
    "GatewaySettings",
    "LimitSettings",
    "ModelSpec",
    "RagSettings",
    "RouterSettings",
    "RaySettings",
    "ServeSettings",
    "Settings",
    "TracingSettings",
    "config_path",
    "load_settings",
    "settings_from_dict",
]
