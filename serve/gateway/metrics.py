"""Moved to serve.http.metrics (the one HTTP layer); kept importable until the gateway is switched."""

from serve.http.metrics import GatewayMetrics, RouterMetrics

__all__ = ["GatewayMetrics", "RouterMetrics"]
