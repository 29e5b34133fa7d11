"""Observability: tracing set-up (`tracing`), metric definitions (`metrics`), alert rules and
routing (`alerts`, pure) and anomaly detection (`anomaly`, pure). Imports only `config`."""
