"""Test files that share one deployed platform of the four HTTP apps (conftest.py): the gateway's
OpenAI surface, the HTTP layer's live checks, then schemathesis over every app's /openapi.json (last: its generated requests change
state the first file does not look at)."""

EMB = "all-minilm-l6-v2"
CHAT = "tiny-chat"
BROKEN = "broken"  # a model whose weights do not exist: unhealthy from the start
LIMIT = 4096  # limits.max_body_bytes: bodies over it get 413 (documented on every operation)
