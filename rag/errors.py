"""Typed RAG errors. They subclass the gateway's API errors, so the one error handler maps them
to OpenAI-style JSON with the right status (400, 403, 404); the CLI prints their message."""

from __future__ import annotations

from models.errors import APIError, InvalidRequest, ModelUnavailable, NotFound, PermissionDenied


class RagInvalidRequest(InvalidRequest):
    """Empty query, top_k out of range, an unknown mode or filter: 400, nothing done."""


class PromptInjectionDetected(RagInvalidRequest):
    """A question that reads as a prompt injection (rag.quality.input_injection = block): 400,
    nothing retrieved; the message names the rules that matched."""

    code = "prompt_injection"


class CollectionNotFound(NotFound):
    code = "collection_not_found"


class StoreUnavailable(ModelUnavailable):
    """The vector store's owner actor is lost (it is being restarted): 503 with Retry-After."""

    code = "store_unavailable"
    retry_after_s = 2


class CollectionUnreadable(APIError):
    """Stored chunks this platform refuses to read: plaintext written before encryption at rest
    was on, or ciphertext no key here opens. A server-side state, not the caller's: 500 with a
    message that says what to do, never a bare "internal error"."""

    code = "collection_unreadable"


class SourceNotAllowed(PermissionDenied):
    """An ingest source outside the configured allowed roots (API-triggered ingest): 403."""

    code = "source_not_allowed"


class SourceUnreadable(InvalidRequest):
    """An ingest source that does not exist or cannot be listed: 400."""

    code = "source_unreadable"


class EmbedderMismatch(InvalidRequest):
    """A collection written by one embedder variant, queried or written with another: 400. Vectors
    of two variants are close but not the same space; mixing them would degrade silently."""

    code = "embedder_mismatch"


class ParseError(Exception):
    """One file could not be parsed; the ingest job reports it and goes on."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason

    def __reduce__(self):
        return (self.__class__, (self.source, self.reason))
