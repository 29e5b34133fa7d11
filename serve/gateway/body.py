"""Moved to serve.http.body (the one HTTP layer); kept importable until the gateway is switched."""

from serve.http.body import read_json

__all__ = ["read_json"]
