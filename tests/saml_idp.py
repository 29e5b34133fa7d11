"""A real SAML 2.0 identity provider (pysaml2's `Server`) on loopback for the SSO tests: a
self-signed signing certificate, metadata at /metadata, single sign-on at /sso/redirect
(HTTP-Redirect binding in, a signed assertion out as the HTTP-POST auto-submit form). It signs
the user in at once as `login` (uid, role, team; `authn_context` says how)."""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from html import unescape
from pathlib import Path

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

PASSWORD_CONTEXT = "urn:oasis:names:tc:SAML:2.0:ac:classes:PasswordProtectedTransport"
MFA_CONTEXT = "https://refeds.org/profile/mfa"


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    key_file, cert_file = directory / f"{name}.key", directory / f"{name}.crt"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file


def post_form(html: str) -> tuple[str, dict[str, str]]:
    """(action, fields) of the auto-submit form the IdP answers with (what a browser would post)."""
    action = unescape(re.search(r'action="([^"]+)"', html).group(1))
    fields = {unescape(n): unescape(v) for n, v in re.findall(r'name="([^"]+)" value="([^"]*)"', html)}
    return action, fields


class SamlIdp:
    def __init__(self, port: int, directory: Path, sp_metadata: str):
        self.port, self.dir = port, Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key_file, self.cert_file = self_signed(self.dir, "idp")
        (self.dir / "sp.xml").write_text(sp_metadata)
        self.login = {"uid": ["grace"], "role": ["staff"], "team": ["web"]}
        self.authn_context = PASSWORD_CONTEXT
        self.server = self._idp()
        self.metadata_file = self.dir / "idp.xml"
        from saml2.metadata import entity_descriptor

        self.metadata_file.write_text(str(entity_descriptor(self.server.config)))
        self.app = self._build()
        self._uv = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self._thread = threading.Thread(target=self._uv.run, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _idp(self):
        from saml2 import BINDING_HTTP_REDIRECT
        from saml2.config import IdPConfig
        from saml2.server import Server
        import shutil

        conf = IdPConfig()
        conf.load({
            "entityid": f"{self.base}/metadata",
            "service": {"idp": {"endpoints": {"single_sign_on_service": [(f"{self.base}/sso/redirect",
                                                                          BINDING_HTTP_REDIRECT)]},
                                "name_id_format": ["urn:oasis:names:tc:SAML:2.0:nameid-format:persistent"],
                                "sign_assertion": True, "sign_response": False}},
            "key_file": str(self.key_file), "cert_file": str(self.cert_file),
            "metadata": {"local": [str(self.dir / "sp.xml")]},
            "xmlsec_binary": shutil.which("xmlsec1"),
        })
        return Server(config=conf)

    def start(self) -> "SamlIdp":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._uv.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the SAML IdP did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._uv.should_exit = True
        self._thread.join(timeout=5)

    def _build(self) -> FastAPI:
        from saml2 import BINDING_HTTP_POST, BINDING_HTTP_REDIRECT
        from saml2.saml import NAMEID_FORMAT_PERSISTENT, NameID

        app = FastAPI()

        @app.get("/metadata")
        async def metadata() -> Response:
            return Response(self.metadata_file.read_text(), media_type="application/samlmetadata+xml")

        @app.get("/sso/redirect")
        async def sso(request: Request) -> HTMLResponse:
            q = request.query_params
            req = self.server.parse_authn_request(q["SAMLRequest"], BINDING_HTTP_REDIRECT)
            msg = req.message
            binding, destination = self.server.pick_binding("assertion_consumer_service", bindings=[BINDING_HTTP_POST],
                                                            entity_id=msg.issuer.text, request=msg)
            resp = self.server.create_authn_response(
                dict(self.login), in_response_to=msg.id, destination=destination, sp_entity_id=msg.issuer.text,
                name_id=NameID(format=NAMEID_FORMAT_PERSISTENT, text=self.login["uid"][0]),
                authn={"class_ref": self.authn_context, "authn_auth": self.base}, sign_assertion=True)
            http = self.server.apply_binding(binding, str(resp), destination, q.get("RelayState", ""), response=True)
            return HTMLResponse(http["data"])

        return app
