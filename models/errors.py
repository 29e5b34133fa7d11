"""Typed API errors. Engines and the gateway raise them; one handler turns them into
OpenAI-style JSON error objects with the right HTTP status."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model's files could not be loaded; the message names the model, the file and what to do."""


class APIError(Exception):
    status: int = 500
    type: str = "api_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    # Errors cross process boundaries (Serve replicas, actors): keep every field on the way.
    def __reduce__(self):
        return (self.__class__, (self.message, self.param, self.code))

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(APIError):
    status, type = 400, "invalid_request_error"


class AuthenticationFailed(APIError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class PermissionDenied(APIError):
    status, type, code = 403, "permission_error", "model_not_allowed"


class AdminRequired(PermissionDenied):
    code = "admin_required"


class NotFound(APIError):
    status, type = 404, "not_found_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class PayloadTooLarge(APIError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class ModelUnavailable(APIError):
    """The model exists but cannot serve now (failed to load, still loading, no healthy backend)."""

    status, type, code = 503, "service_unavailable", "model_unavailable"


class UpstreamError(APIError):
    """A remote provider answered with an error or something unreadable."""

    status, type, code = 502, "upstream_error", "bad_gateway"


class UpstreamTimeout(APIError):
    status, type, code = 504, "timeout_error", "upstream_timeout"


class NoCapableModel(APIError):
    """No catalog model meets the request's hard constraints; the message names the unmet ones."""

    status, type, code = 400, "invalid_request_error", "no_capable_model"


class NoHealthyModel(ModelUnavailable):
    """Models that could serve the request exist, but none is healthy (circuit open, failing probes)."""

    code = "no_healthy_model"


class ModelOverloaded(ModelUnavailable):
    """A deployment's bounded queue is full (Serve's `max_queued_requests`): capacity, not failure.
    Answered at once with `Retry-After`; it never counts against the backend's circuit breaker."""

    code = "model_overloaded"
    retry_after_s = 1


class ServiceUnavailable(APIError):
    """A platform actor the request needs (the workflow coordinator, a state actor) was lost and
    is being restarted: 503 with Retry-After, never a 500 (the HTTP layer maps Ray's actor errors)."""

    status, type, code = 503, "service_unavailable", "service_unavailable"
    retry_after_s = 2


class ReplicaLost(ModelUnavailable):
    """The replica serving a request died before its first token; another replica may take it."""

    code = "replica_lost"
    retry_after_s = 1


class BudgetExceeded(APIError):
    """The API key's spending budget for the period is used up."""

    status, type, code = 429, "insufficient_quota", "budget_exceeded"
