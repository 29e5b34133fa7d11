"""The one HTTP layer every ORFEAS Serve app uses: `http_app` builds the FastAPI app with the
error handlers and the request-id, metrics, body-limit and error middlewares; `authenticated`
and `admin` are the auth dependencies; `label_model` names a request's model for the metrics;
`unwrap` gets the typed error out of a Ray wrapper."""

from serve.http.app import (
    ERROR_RESPONSES,
    HttpState,
    build_app,
    catalog_label,
    http_app,
    http_state,
    label_model,
)
from serve.http.auth import Admin, Authenticated, admin, authenticated, permitted
from serve.http.surface import API_VERSION, deprecate
from serve.http.body import BodyLimitMiddleware, read_json
from serve.http.errors import (
    BodyTooLarge,
    ErrorMiddleware,
    api_error,
    error_response,
    install_error_handlers,
    invalid_request,
    unwrap,
)
from serve.http.metrics import MetricsMiddleware, RequestMetrics, request_metrics
from serve.http.request_id import RequestIdFilter, RequestIdMiddleware, current_request_id

__all__ = [
    "ERROR_RESPONSES", "Admin", "Authenticated", "BodyLimitMiddleware", "BodyTooLarge", "ErrorMiddleware",
    "HttpState", "MetricsMiddleware", "RequestIdFilter", "RequestIdMiddleware", "RequestMetrics",
    "admin", "api_error", "authenticated", "build_app", "catalog_label", "current_request_id",
    "error_response", "http_app", "http_state", "install_error_handlers", "invalid_request", "label_model",
    "read_json", "request_metrics", "unwrap", "permitted", "deprecate", "API_VERSION",
]
