"""Identity on a live gateway (the session's Ray cluster, real HTTP on 127.0.0.1): bearer JWTs
from a real OIDC provider on loopback (tests/oidc_provider.py) beside API keys, the adversarial
token suite answered 401 with its reason, key rotation, browser sign-in (authorization code +
PKCE) into a session cookie, and MFA for admin permissions (amr claims; TOTP on admin keys)."""

import time

import httpx
import pyotp
import pytest

from harness import deployed, free_port, make_key, platform_settings, remote_model
from oidc_provider import OidcProvider, adversarial_tokens, valid_tokens

MODEL = "echo-model"


@pytest.fixture(scope="module")
def idp():
    server = OidcProvider(free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def saml_idp(serve_port, tmp_path_factory):
    from config import Settings
    from saml_idp import SamlIdp
    from security.saml import sp_metadata

    sp = Settings(auth={"saml": {"enabled": True, "base_url": f"http://127.0.0.1:{serve_port}"}})
    server = SamlIdp(free_port(), tmp_path_factory.mktemp("saml-idp"), sp_metadata(sp)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(serve_port, provider, idp, saml_idp, tmp_path_factory):
    settings = platform_settings(
        tmp_path_factory.mktemp("identity-data"), serve_port,
        auth={"enabled": True, "key_cache_s": 0, "jwks_min_refetch_s": 0.2,
              "oidc": [idp.settings(role_map={"user": "user", "ops": "admin"}, team_claim="team")],
              "saml": {"enabled": True, "base_url": f"http://127.0.0.1:{serve_port}",
                       "idp_metadata_file": str(saml_idp.metadata_file), "role_map": {"staff": "user",
                                                                                      "ops": "admin"},
                       "team_attribute": "team"}},
        models=[remote_model(provider, MODEL, "echo")],
    )
    with deployed(settings):
        _, admin = make_key(settings, "admin")
        yield settings, f"http://127.0.0.1:{serve_port}", admin


def bearer(token: str) -> dict:
    return {"authorization": f"Bearer {token}"}


def chat(base: str, headers: dict | None = None, cookies=None, client: httpx.Client | None = None) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}
    return (client or httpx).post(f"{base}/v1/chat/completions", json=body, headers=headers or {}, timeout=30)


def test_every_adversarial_token_gets_401_with_its_reason(gateway, idp):
    _, base, _ = gateway
    assert httpx.get(f"{base}/v1/models", headers=bearer(idp.token()), timeout=30).status_code == 200
    wrong = []
    with httpx.Client(timeout=30) as client:
        for name, token, reason in adversarial_tokens(idp):
            r = client.get(f"{base}/v1/models", headers=bearer(token))
            err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
            if r.status_code != 401 or reason.lower() not in (err.get("message") or "").lower() \
                    or r.headers.get("www-authenticate", "").lower() != "bearer":
                wrong.append((name, r.status_code, err.get("message")))
    assert not wrong, wrong


def test_valid_tokens_and_api_keys_are_accepted_side_by_side(gateway, idp):
    _, base, admin = gateway
    for name, token in valid_tokens(idp):
        r = chat(base, bearer(token))
        assert r.status_code == 200, (name, r.text)
    assert chat(base, bearer(admin)).status_code == 200
    who = httpx.get(f"{base}/v1/auth/whoami", headers=bearer(idp.token(sub="dana", team="search")), timeout=30).json()
    assert (who["id"], who["role"], who["team"], who["via"]) == ("test:dana", "user", "search", "jwt")


def test_a_rotated_key_is_accepted_after_one_refetch(gateway, idp):
    _, base, _ = gateway
    before = idp.jwks_fetches
    time.sleep(0.3)  # past the minimum refetch interval
    new = idp.rotate()
    try:
        r = httpx.get(f"{base}/v1/models", headers=bearer(idp.token(new)), timeout=30)
        assert r.status_code == 200, r.text
        assert idp.jwks_fetches > before
        # The old key left the JWKS, but the replica still trusts its cached copy until the TTL.
        fetched = idp.jwks_fetches
        r = httpx.get(f"{base}/v1/models", headers=bearer(idp.token(new)), timeout=30)
        assert r.status_code == 200 and idp.jwks_fetches == fetched
    finally:
        idp.published = [idp.rsa, idp.ec, idp.ed]


def test_browser_sign_in_with_pkce_opens_a_session(gateway, idp):
    _, base, _ = gateway
    idp.login_claims = {"sub": "erin", "roles": ["user"], "team": "web"}
    with httpx.Client(timeout=30, follow_redirects=True) as browser:
        r = browser.get(f"{base}/v1/auth/login")
        assert r.status_code == 200, r.text
        assert r.json()["id"] == "test:erin" and r.json()["via"] == "session"
        hops = [h.url.path for h in r.history]
        assert hops == ["/v1/auth/login", "/authorize"], hops
        set_cookie = r.headers["set-cookie"]
        assert "HttpOnly" in set_cookie and "SameSite=lax" in set_cookie and "Secure" not in set_cookie
        assert browser.get(f"{base}/v1/auth/whoami").json()["user"] == "erin"
        assert chat(base, client=browser).status_code == 200
        out = browser.post(f"{base}/v1/auth/logout")
        assert out.status_code == 200
        assert browser.get(f"{base}/v1/auth/whoami").status_code == 401
    # A callback without the sign-in cookie, or with a forged state, is refused.
    with httpx.Client(timeout=30) as browser:
        r = browser.get(f"{base}/v1/auth/callback", params={"code": "x", "state": "y"})
        assert r.status_code == 401 and "no sign-in in progress" in r.json()["error"]["message"]
        login = browser.get(f"{base}/v1/auth/login")
        assert login.status_code == 302
        r = browser.get(f"{base}/v1/auth/callback", params={"code": "x", "state": "forged"})
        assert r.status_code == 401 and "state does not match" in r.json()["error"]["message"]


def test_a_tampered_session_cookie_is_refused(gateway):
    _, base, _ = gateway
    r = httpx.get(f"{base}/v1/auth/whoami", cookies={"orfeas_session": "orfs.gAAAAABforged"}, timeout=30)
    assert r.status_code == 401 and "sign in again" in r.json()["error"]["message"]


def test_admin_permissions_need_mfa_evidence_from_the_idp(gateway, idp):
    _, base, _ = gateway
    url = f"{base}/v1/router/status"
    r = httpx.get(url, headers=bearer(idp.token(sub="ops1", roles=["ops"])), timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "mfa_required", r.text
    r = httpx.get(url, headers=bearer(idp.token(sub="ops1", roles=["ops"], amr=["pwd", "otp"])), timeout=30)
    assert r.status_code == 200, r.text
    r = httpx.get(url, headers=bearer(idp.token(sub="u1", roles=["user"], amr=["otp"])), timeout=30)
    assert r.status_code == 403  # MFA does not make a user an admin


def test_admin_key_totp_enrolment_verification_and_recovery(gateway):
    settings, base, _ = gateway
    _, key = make_key(settings, "admin")
    url, auth = f"{base}/v1/router/status", bearer(key)
    assert httpx.get(url, headers=auth, timeout=30).status_code == 200  # not enrolled yet
    enrolment = httpx.post(f"{base}/v1/auth/mfa/enrol", headers=auth, timeout=30).json()
    assert enrolment["otpauth_uri"].startswith("otpauth://totp/") and len(enrolment["recovery_codes"]) == 10
    r = httpx.get(url, headers=auth, timeout=30)
    assert r.status_code == 401 and "x-orfeas-otp" in r.json()["error"]["message"]
    code = pyotp.TOTP(enrolment["secret"]).now()
    assert httpx.get(url, headers={**auth, "x-orfeas-otp": "000000" if code != "000000" else "111111"},
                     timeout=30).status_code == 401
    assert httpx.get(url, headers={**auth, "x-orfeas-otp": code}, timeout=30).status_code == 200
    assert httpx.get(url, headers={**auth, "x-orfeas-otp": code}, timeout=30).status_code == 401  # replayed
    recovery = enrolment["recovery_codes"][0]
    assert httpx.get(url, headers={**auth, "x-orfeas-otp": recovery}, timeout=30).status_code == 200
    assert httpx.get(url, headers={**auth, "x-orfeas-otp": recovery}, timeout=30).status_code == 401  # used up
    # Recovery codes are stored only as hashes.
    stored = (settings.resolved_data_dir() / "auth" / "mfa.json").read_text()
    assert recovery not in stored and enrolment["secret"] not in stored
    # Re-enrolling needs the current factor.
    assert httpx.post(f"{base}/v1/auth/mfa/enrol", headers=auth, timeout=30).status_code == 401


def test_saml_sign_in_opens_a_session_and_carries_mfa(gateway, saml_idp):
    from saml_idp import MFA_CONTEXT, PASSWORD_CONTEXT, post_form

    _, base, _ = gateway
    assert "EntityDescriptor" in httpx.get(f"{base}/v1/auth/saml/metadata", timeout=30).text

    def sign_in(browser: httpx.Client) -> httpx.Response:
        r = browser.get(f"{base}/v1/auth/saml/login")  # -> the IdP -> its auto-submit form
        assert r.status_code == 200 and r.url.path == "/sso/redirect", r.text
        action, fields = post_form(r.text)
        return browser.post(action, data=fields)

    saml_idp.login, saml_idp.authn_context = {"uid": ["grace"], "role": ["staff"], "team": ["web"]}, PASSWORD_CONTEXT
    with httpx.Client(timeout=30, follow_redirects=True) as browser:
        r = sign_in(browser)
        assert r.status_code == 200, r.text
        assert (r.json()["id"], r.json()["role"], r.json()["team"], r.json()["mfa"]) == ("saml:grace", "user", "web",
                                                                                          False)
        assert browser.get(f"{base}/v1/auth/whoami").json()["via"] == "session"
        assert chat(base, client=browser).status_code == 200
        # The same response posted again (a replay) is refused: the sign-in it answered is over.
        again = browser.get(f"{base}/v1/auth/saml/login")
        action, fields = post_form(again.text)
        first = browser.post(action, data=fields)
        assert first.status_code == 200
        replay = browser.post(action, data=fields)
        assert replay.status_code == 401
    # An admin signed in with a password only has no admin permissions; with MFA it has.
    saml_idp.login = {"uid": ["heidi"], "role": ["ops"]}
    with httpx.Client(timeout=30, follow_redirects=True) as browser:
        assert sign_in(browser).json()["role"] == "admin"
        r = browser.get(f"{base}/v1/router/status")
        assert r.status_code == 401 and r.json()["error"]["code"] == "mfa_required"
    saml_idp.authn_context = MFA_CONTEXT
    with httpx.Client(timeout=30, follow_redirects=True) as browser:
        assert sign_in(browser).json()["mfa"] is True
        assert browser.get(f"{base}/v1/router/status").status_code == 200
    # A tampered response is refused.
    saml_idp.authn_context = PASSWORD_CONTEXT
    with httpx.Client(timeout=30, follow_redirects=True) as browser:
        r = browser.get(f"{base}/v1/auth/saml/login")
        action, fields = post_form(r.text)
        import base64

        xml = base64.b64decode(fields["SAMLResponse"]).decode().replace("heidi", "mallory")
        r = browser.post(action, data={**fields, "SAMLResponse": base64.b64encode(xml.encode()).decode()})
        assert r.status_code == 401 and "refused" in r.json()["error"]["message"]
