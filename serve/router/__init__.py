"""The LLM router: featurise a request, select a model, fall back, break circuits, balance load,
price usage, split experiments and orchestrate many models. Pure decision functions live in
features, selection, health, fallback, balance, experiments and orchestrator; `runtime` holds the
per-replica state that the gateway uses them with."""
