"""Moved to serve.http.errors (the one HTTP layer); kept importable until the gateway is switched."""

from serve.http.errors import error_response, install_error_handlers, invalid_request

__all__ = ["error_response", "install_error_handlers", "invalid_request"]
