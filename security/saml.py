"""SAML 2.0 sign-in with pysaml2 as the service provider (needs the `xmlsec1` binary).

`begin` makes an AuthnRequest for the HTTP-Redirect binding; `finish` reads the IdP's
HTTP-POST response at the ACS, which pysaml2 checks (the IdP's signature from its metadata, the
audience, the time window, and `InResponseTo` against the request we sent: unsolicited responses
are refused), and maps the assertion's attributes onto an `Identity` (security/oidc.py).
"""

from __future__ import annotations

import shutil
from typing import Any

from config import Settings
from config.settings import SamlSettings
from models.errors import AuthenticationFailed, InvalidRequest
from security.oidc import Identity, pick_role


class SamlRejected(AuthenticationFailed):
    code = "invalid_saml_response"


def _urls(s: SamlSettings) -> tuple[str, str]:
    base = s.base_url.rstrip("/")
    if not base:
        raise InvalidRequest("auth.saml.base_url is not set (the gateway's public URL)")
    return s.sp_entity_id or f"{base}/v1/auth/saml/metadata", f"{base}/v1/auth/saml/acs"


def sp_config(settings: Settings):
    from saml2 import BINDING_HTTP_POST
    from saml2.config import SPConfig

    s = settings.auth.saml
    entity_id, acs = _urls(s)
    metadata: dict[str, Any] = {}
    if s.idp_metadata_file:
        metadata["local"] = [s.idp_metadata_file]
    elif s.idp_metadata_url:
        metadata["remote"] = [{"url": s.idp_metadata_url}]
    conf = {
        "entityid": entity_id,
        "service": {"sp": {
            "endpoints": {"assertion_consumer_service": [(acs, BINDING_HTTP_POST)]},
            "allow_unsolicited": False, "authn_requests_signed": False,
            "want_assertions_signed": True, "want_response_signed": False,
        }},
        "xmlsec_binary": shutil.which("xmlsec1") or "/usr/bin/xmlsec1",
        "allow_unknown_attributes": True,
    }
    if metadata:
        conf["metadata"] = metadata
    config = SPConfig()
    config.load(conf)
    return config


def sp_metadata(settings: Settings) -> str:
    from saml2.metadata import entity_descriptor

    return str(entity_descriptor(sp_config(settings)))


def client(settings: Settings):
    from saml2.client import Saml2Client

    if not settings.auth.saml.enabled:
        raise InvalidRequest("SAML sign-in is off (auth.saml.enabled)")
    return Saml2Client(config=sp_config(settings))


def begin(settings: Settings, relay_state: str = "") -> tuple[str, str]:
    """(the IdP URL to redirect to, the request id the response must answer)."""
    from saml2 import BINDING_HTTP_REDIRECT

    sp = client(settings)
    request_id, info = sp.prepare_for_authenticate(relay_state=relay_state, binding=BINDING_HTTP_REDIRECT)
    location = dict(info["headers"])["Location"]
    return location, request_id


def finish(settings: Settings, saml_response: str, request_id: str) -> Identity:
    """The identity in a signed SAML response to our request `request_id`."""
    from saml2 import BINDING_HTTP_POST

    s = settings.auth.saml
    if not saml_response:
        raise SamlRejected("no SAMLResponse in the form")
    try:
        response = client(settings).parse_authn_request_response(saml_response, BINDING_HTTP_POST,
                                                                 outstanding={request_id: "/"})
    except Exception as e:  # pysaml2 raises many types; all mean "refused"
        raise SamlRejected(f"SAML response refused: {type(e).__name__}: {str(e)[:200]}") from None
    if response is None:
        raise SamlRejected("SAML response refused (not an answer to this sign-in)")
    ava = response.get_identity()
    name_id = str(response.name_id.text) if response.name_id is not None else ""
    user = (ava.get(s.user_attribute) or [name_id])[0] if s.user_attribute else name_id
    if not user:
        raise SamlRejected(f"the assertion names no user (attribute {s.user_attribute!r} or NameID)")
    values = [str(v) for v in ava.get(s.role_attribute, [])]
    role = pick_role(values, s.role_map, ["admin", "developer", "user", "auditor", "viewer"], s.default_role)
    if not role:
        raise SamlRejected("the assertion's attributes map to no ORFEAS role")
    team = (ava.get(s.team_attribute) or [""])[0] if s.team_attribute else ""
    contexts = {str(c.authn_context.authn_context_class_ref.text) for c in response.assertion.authn_statement
                if c.authn_context is not None and c.authn_context.authn_context_class_ref is not None}
    mfa = bool(contexts & set(s.mfa_authn_contexts))
    return Identity(f"saml:{user}", str(user), role, str(team), None, mfa, None)
