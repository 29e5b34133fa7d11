"""A small real OpenID Connect provider on loopback, standing in for an internet IdP.

It serves a discovery document, a JWKS (RSA, EC P-256 and Ed25519 keys; `rotate()` swaps the RSA
signing key for a new one), and the authorization-code flow with PKCE (S256): `/authorize`
signs the user in at once as `login_claims` (no login page: the test is the browser) and
redirects with a code; `/token` trades the code (and the PKCE verifier) for an ID token and an
access token. `fail_jwks` makes the JWKS endpoint answer 500; `jwks_fetches` counts its hits.
`token(...)` mints a token with any claims and header; `forge(...)` builds one by hand (HMAC,
no signature, raw segments) for the adversarial cases PyJWT would refuse to make.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from typing import Any
from urllib.parse import parse_qs, urlencode

import jwt
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse


def b64(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64(json.dumps(value, separators=(",", ":")))


class SigningKey:
    def __init__(self, kid: str, alg: str, private):
        self.kid, self.alg, self.private = kid, alg, private

    @property
    def public(self):
        return self.private.public_key()

    def jwk(self) -> dict:
        data = json.loads(jwt.algorithms.get_default_algorithms()[self.alg].to_jwk(self.public))
        return {**data, "kid": self.kid, "use": "sig", "alg": self.alg}

    def public_pem(self) -> bytes:
        return self.public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def public_der(self) -> bytes:
        return self.public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def rsa_key(kid: str, alg: str = "RS256") -> SigningKey:
    return SigningKey(kid, alg, rsa.generate_private_key(public_exponent=65537, key_size=2048))


class OidcProvider:
    def __init__(self, port: int, audience: str = "orfeas", client_id: str = "orfeas-cli"):
        self.port = port
        self.audience, self.client_id = audience, client_id
        self.rsa = rsa_key("rsa-1")
        self.ec = SigningKey("ec-1", "ES256", ec.generate_private_key(ec.SECP256R1()))
        self.ed = SigningKey("ed-1", "EdDSA", ed25519.Ed25519PrivateKey.generate())
        self.published: list[SigningKey] = [self.rsa, self.ec, self.ed]
        self.rogue = rsa_key("rsa-1")  # an attacker's keys (never published)
        self.rogue_other = rsa_key("rogue-1")
        self.fail_jwks = False
        self.jwks_fetches = 0
        self.login_claims: dict[str, Any] = {"sub": "alice", "roles": ["user"]}
        self.codes: dict[str, dict] = {}
        self.app = self._build()
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def settings(self, **overrides) -> dict:
        """An `auth.oidc` entry for this provider."""
        return {"name": "test", "issuer": self.issuer, "audience": [self.audience, self.client_id],
                "client_id": self.client_id, "algorithms": ["RS256", "PS256", "ES256", "EdDSA"], **overrides}

    def start(self) -> "OidcProvider":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the OIDC provider did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)

    def rotate(self, keep_old: bool = False) -> SigningKey:
        """A new RSA signing key under a new kid; the old one leaves the JWKS unless kept."""
        old = self.rsa
        self.rsa = rsa_key(f"rsa-{secrets.token_hex(3)}")
        self.published = [self.rsa, self.ec, self.ed] + ([old] if keep_old else [])
        return self.rsa

    # ------------------------------------------------------------ minting

    def claims(self, **overrides) -> dict:
        now = int(time.time())
        base = {"iss": self.issuer, "aud": self.audience, "sub": "alice", "iat": now, "exp": now + 300,
                "roles": ["user"]}
        base.update(overrides)
        return {k: v for k, v in base.items() if v is not ...}  # `...` drops a claim

    def token(self, key: SigningKey | None = None, headers: dict | None = None, **claims) -> str:
        key = key or self.rsa
        return self.sign({"alg": key.alg, "typ": "JWT", "kid": key.kid, **(headers or {})}, self.claims(**claims), key)

    @staticmethod
    def sign(header: dict, payload: Any, key: SigningKey, alg: str | None = None) -> str:
        """Signed by hand (any header, any payload types), with `alg` (default the key's)."""
        signing_input = f"{b64json(header)}.{b64json(payload)}".encode()
        algorithm = jwt.algorithms.get_default_algorithms()[alg or key.alg]
        return f"{signing_input.decode()}.{b64(algorithm.sign(signing_input, key.private))}"

    @staticmethod
    def forge(header: dict, payload: dict, secret: bytes | None = None, signature: str = "") -> str:
        """A token built by hand: HMAC-signed with `secret` (HS256/384/512 per header alg) or
        with the raw `signature` segment."""
        signing_input = f"{b64json(header)}.{b64json(payload)}"
        if secret is not None:
            digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[header["alg"]]
            signature = b64(hmac.new(secret, signing_input.encode(), digest).digest())
        return f"{signing_input}.{signature}"

    # ------------------------------------------------------------ the server

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/.well-known/openid-configuration")
        async def discovery() -> dict:
            return {"issuer": self.issuer, "jwks_uri": f"{self.issuer}/jwks",
                    "authorization_endpoint": f"{self.issuer}/authorize", "token_endpoint": f"{self.issuer}/token",
                    "response_types_supported": ["code"], "code_challenge_methods_supported": ["S256"],
                    "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
                    "subject_types_supported": ["public"]}

        @app.get("/jwks")
        async def jwks():
            self.jwks_fetches += 1
            if self.fail_jwks:
                return JSONResponse({"error": "down"}, status_code=500)
            return {"keys": [k.jwk() for k in self.published]}

        @app.get("/authorize")
        async def authorize(request: Request):
            q = request.query_params
            if q.get("response_type") != "code" or q.get("client_id") != self.client_id:
                raise HTTPException(400, "unsupported response_type or unknown client_id")
            if q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
                raise HTTPException(400, "PKCE (S256) is required")
            code = secrets.token_urlsafe(16)
            self.codes[code] = {"challenge": q["code_challenge"], "redirect_uri": q["redirect_uri"],
                                "nonce": q.get("nonce"), "claims": dict(self.login_claims), "at": time.time()}
            sep = "&" if "?" in q["redirect_uri"] else "?"
            return RedirectResponse(f"{q['redirect_uri']}{sep}{urlencode({'code': code, 'state': q.get('state', '')})}",
                                    status_code=302)

        @app.post("/token")
        async def token(request: Request):
            form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
            grant_type, code, redirect_uri = form.get("grant_type"), form.get("code", ""), form.get("redirect_uri")
            client_id, code_verifier = form.get("client_id"), form.get("code_verifier", "")
            grant = self.codes.pop(code, None)
            if grant_type != "authorization_code" or grant is None or client_id != self.client_id:
                return JSONResponse({"error": "invalid_grant"}, status_code=400)
            if grant["redirect_uri"] != redirect_uri:
                return JSONResponse({"error": "invalid_grant", "error_description": "redirect_uri"}, status_code=400)
            challenge = b64(hashlib.sha256(code_verifier.encode()).digest())
            if not hmac.compare_digest(challenge, grant["challenge"]):
                return JSONResponse({"error": "invalid_grant", "error_description": "PKCE"}, status_code=400)
            claims = grant["claims"]
            id_token = self.token(aud=self.client_id, nonce=grant["nonce"], **claims)
            access = self.token(aud=self.audience, **claims)
            return {"access_token": access, "id_token": id_token, "token_type": "Bearer", "expires_in": 300}

        return app


# ------------------------------------------------------------ the adversarial token suite


def adversarial_tokens(p: OidcProvider) -> list[tuple[str, str, str]]:
    """(case, token, the reason the answer must name) for tokens a verifier of `p`'s tokens must
    refuse; shared by the verifier's unit tests and the live-gateway tests."""
    now = int(time.time())
    good = p.claims()
    rs = {"alg": "RS256", "typ": "JWT", "kid": p.rsa.kid}
    rogue = SigningKey(p.rsa.kid, "RS256", p.rogue.private)  # an attacker's key under the real kid
    rogue_other = p.rogue_other
    pem, der = p.rsa.public_pem(), p.rsa.public_der()
    jwk_json = json.dumps(p.rsa.jwk()).encode()
    valid = p.token()
    h, body, sig = valid.split(".")
    cases = []
    for alg in ("none", "None", "NONE", "nOnE"):
        cases.append((f"alg {alg}, empty signature", p.forge({"alg": alg, "typ": "JWT"}, good), "unsigned"))
        cases.append((f"alg {alg}, junk signature", p.forge({"alg": alg, "kid": p.rsa.kid}, good, signature="eA"),
                      "alg 'none'"))
    for name, secret in (("PEM", pem), ("PEM without newline", pem.strip()), ("JWK JSON", jwk_json), ("DER", der),
                         ("DER base64", base64.b64encode(der))):
        cases.append((f"HS256 with the RSA public key as {name}",
                      p.forge({"alg": "HS256", "typ": "JWT", "kid": p.rsa.kid}, good, secret), "HS256"))
    cases += [
        ("HS384 with the public key PEM", p.forge({"alg": "HS384", "kid": p.rsa.kid}, good, pem), "HS384"),
        ("HS512 with the public key PEM", p.forge({"alg": "HS512", "kid": p.rsa.kid}, good, pem), "HS512"),
        ("HS256 without kid", p.forge({"alg": "HS256"}, good, pem), "HS256"),
        ("untrusted issuer", p.token(iss="https://evil.example"), "issuer"),
        ("issuer with trailing slash", p.token(iss=p.issuer + "/"), "issuer"),
        ("no iss", p.token(iss=...), "iss"),
        ("wrong audience", p.token(aud="someone-else"), "audience"),
        ("audience list without ours", p.token(aud=["a", "b"]), "audience"),
        ("no aud", p.token(aud=...), "aud"),
        ("expired", p.token(exp=now - 3600, iat=now - 7200), "expired"),
        ("nbf in the future", p.token(nbf=now + 3600), "not valid yet"),
        ("iat in the future", p.token(iat=now + 3600), "not valid yet"),
        ("no exp", p.token(exp=...), "exp"),
        ("exp a string", p.forge(rs, {**good, "exp": "tomorrow"}, signature=sig), "signature"),
        ("exp a string, signed", p.sign(rs, {**good, "exp": "tomorrow"}, p.rsa), "exp"),
        ("sub a number", p.token(sub=12345), "sub"),
        ("roles a number", p.token(roles=7), "roles"),
        ("nbf a string", p.sign(rs, {**good, "nbf": "soon"}, p.rsa),
         "nbf"),
        ("kid path traversal", p.token(headers={"kid": "../../etc/passwd"}), "kid"),
        ("kid SQL injection", p.token(headers={"kid": "x' OR '1'='1"}), "kid"),
        ("kid huge", p.token(headers={"kid": "k" * 4000}), "kid"),
        ("kid a number", p.token(headers={"kid": 1}), "kid"),
        ("kid a list", p.token(headers={"kid": [p.rsa.kid]}), "kid"),
        ("jku to an attacker JWKS", p.token(rogue_other, headers={"jku": "http://127.0.0.1:9/jwks"}), "jku"),
        ("jku with the real key", p.token(headers={"jku": p.issuer + "/jwks"}), "jku"),
        ("x5u elsewhere", p.token(rogue_other, headers={"x5u": "http://127.0.0.1:9/cert.pem"}), "x5u"),
        ("jwk header with the attacker's key", p.token(rogue_other, headers={"jwk": rogue_other.jwk()}), "jwk"),
        ("x5c header", p.token(rogue_other, headers={"x5c": ["MIIB"]}), "x5c"),
        ("unknown kid", p.token(rogue_other), "unknown signing key"),
        ("attacker key under the real kid", p.token(rogue), "signature"),
        ("unknown crit", p.token(headers={"crit": ["exp"]}), "crit"),
        ("crit with an extension", p.token(headers={"crit": ["urn:example:ext"], "urn:example:ext": 1}), "crit"),
        ("PS256 on a key published for RS256", p.sign({**rs, "alg": "PS256"}, good, p.rsa, "PS256"),
         "PS256"),
        ("ES256 header on the RSA kid", p.forge({"alg": "ES256", "kid": p.rsa.kid}, good, signature=sig), "ES256"),
        ("RS256 header on the EC kid", p.forge({"alg": "RS256", "kid": p.ec.kid}, good, signature=sig), "RS256"),
        ("alg not allowed (RS512)", p.sign({**rs, "alg": "RS512"}, good, p.rsa, "RS512"), "RS512"),
        ("payload changed after signing", f"{h}.{b64json({**good, 'roles': ['admin']})}.{sig}", "signature"),
        ("signature stripped", f"{h}.{body}.", "base64url"),
        ("oversized", p.token(pad="x" * 40_000), "over the limit"),
        ("two segments", f"{h}.{body}", "3 dot-separated"),
        ("four segments", f"{h}.{body}.{sig}.{sig}", "3 dot-separated"),
        ("one dot only header", f"{h}..{sig}", "base64url"),
        ("bad base64 header", f"!!!.{body}.{sig}", "base64url"),
        ("header not JSON", f"{b64('hello')}.{body}.{sig}", "not JSON"),
        ("header a JSON list", f"{b64json(['RS256'])}.{body}.{sig}", "JSON object"),
        ("payload not JSON", f"{h}.{b64('{not json')}.{sig}", "not JSON"),
        ("payload a JSON string", f"{h}.{b64json('alice')}.{sig}", "JSON object"),
        ("header without alg", p.forge({"kid": p.rsa.kid}, good, signature=sig), "alg"),
        ("typ not a JWT", p.token(headers={"typ": "JWE"}), "typ"),
    ]
    return cases


def valid_tokens(p: OidcProvider) -> list[tuple[str, str]]:
    now = int(time.time())
    return [
        ("RS256", p.token()),
        ("ES256", p.token(p.ec)),
        ("EdDSA", p.token(p.ed)),
        ("audience in a list", p.token(aud=["other", p.audience])),
        ("expired within the leeway", p.token(exp=now - 5)),
        ("nbf within the leeway", p.token(nbf=now + 5)),
    ]
