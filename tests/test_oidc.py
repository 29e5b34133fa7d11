"""JWT/OIDC verification (security/oidc.py) against a real OIDC provider on loopback
(tests/oidc_provider.py): the adversarial token suite, valid tokens of every key type, key
rotation, the JWKS cache (TTL, single-flight refetch, minimum interval, failed fetches), and the
claim mapping onto a Principal. No Ray: the Authenticator's token path needs none."""

import asyncio
import time

import pytest

from config import Settings
from harness import free_port
from models.errors import AuthenticationFailed
from oidc_provider import OidcProvider, adversarial_tokens, valid_tokens
from security.auth import Authenticator
from security.oidc import TokenVerifier, identity_of


SERVER = OidcProvider(free_port())  # made at import: the case lists parametrize the tests


@pytest.fixture(scope="module")
def idp():
    server = SERVER.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cases(idp):
    return adversarial_tokens(idp)


def settings_for(idp, tmp_path, **issuer) -> Settings:
    return Settings(data_dir=tmp_path, auth={"oidc": [idp.settings(**issuer)], "jwks_min_refetch_s": 0.2})


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def auth(idp, tmp_path):
    idp.published = [idp.rsa, idp.ec, idp.ed]
    idp.fail_jwks = False
    return Authenticator(settings_for(idp, tmp_path, role_map={"user": "user", "ops": "admin"},
                                      team_claim="team", models_claim="models"))


def bearer(token: str) -> str:
    return f"Bearer {token}"


def test_the_suite_has_forty_cases(cases):
    assert len(cases) >= 40
    assert len({name for name, _, _ in cases}) == len(cases)


@pytest.mark.parametrize("index", range(len(adversarial_tokens(SERVER))))
def test_adversarial_token_is_refused_with_its_reason(cases, auth, index):
    name, token, reason = cases[index]
    with pytest.raises(AuthenticationFailed) as err:
        run(auth.authenticate(bearer(token)))
    assert err.value.status == 401
    assert reason.lower() in err.value.message.lower(), (name, err.value.message)


@pytest.mark.parametrize("index", range(len(valid_tokens(SERVER))))
def test_valid_tokens_of_every_key_type_are_accepted(idp, auth, index):
    name, token = valid_tokens(idp)[index]
    principal = run(auth.authenticate(bearer(token)))
    assert (principal.key_id, principal.user, principal.role, principal.via) == ("test:alice", "alice", "user", "jwt")


def test_claims_map_onto_the_principal(idp, auth):
    token = idp.token(sub="bob", roles=["ops", "user"], team="search", models="m1 m2", amr=["pwd", "otp"])
    p = run(auth.authenticate(bearer(token)))
    assert (p.key_id, p.role, p.team, p.models, p.mfa) == ("test:bob", "admin", "search", ("m1", "m2"), True)
    assert p.may_use("m1") and not p.may_use("m3")
    plain = run(auth.authenticate(bearer(idp.token(sub="carol", roles=["nobody"]))))
    assert (plain.role, plain.mfa, plain.models) == ("user", False, ())  # default role; models claim absent


def test_no_default_role_refuses_unmapped_tokens(idp, tmp_path):
    auth = Authenticator(settings_for(idp, tmp_path, role_map={"ops": "admin"}, default_role=""))
    with pytest.raises(AuthenticationFailed, match="no ORFEAS role"):
        run(auth.authenticate(bearer(idp.token(roles=["guest"]))))


def test_api_keys_still_take_the_key_path(idp, auth):
    # A key-shaped credential never reaches the JWT verifier (the key store answers it; here the
    # authenticator has no cluster, so reaching the store would raise something else).
    assert auth.tokens.configured
    with pytest.raises(AuthenticationFailed, match="no OIDC issuer"):
        run(Authenticator(Settings()).authenticate(bearer(idp.token())))


def test_rotation_refetches_once_and_accepts_the_new_key(idp, tmp_path):
    verifier = TokenVerifier(settings_for(idp, tmp_path))
    cache = verifier.caches[idp.issuer]
    run(verifier.verify(idp.token()))
    assert cache.fetches == 1
    run(verifier.verify(idp.token(idp.ec)))  # cached: no fetch
    assert cache.fetches == 1
    time.sleep(0.25)
    new = idp.rotate()
    try:
        claims = run(verifier.verify(idp.token(new))).claims
        assert claims["sub"] == "alice" and cache.fetches == 2
        # Within the minimum interval an unknown kid does not refetch again.
        with pytest.raises(AuthenticationFailed, match="unknown signing key"):
            run(verifier.verify(idp.token(type(new)("ghost", "RS256", new.private))))
        assert cache.fetches == 2
    finally:
        idp.published = [idp.rsa, idp.ec, idp.ed]


def test_concurrent_unknown_kids_share_one_fetch(idp, tmp_path):
    verifier = TokenVerifier(settings_for(idp, tmp_path))
    cache = verifier.caches[idp.issuer]
    before = idp.jwks_fetches

    async def many():
        new = idp.rotate()
        tokens = [idp.token(new) for _ in range(20)]
        return await asyncio.gather(*(verifier.verify(t) for t in tokens))

    try:
        results = run(many())
    finally:
        idp.published = [idp.rsa, idp.ec, idp.ed]
    assert len(results) == 20 and cache.fetches == 1 and idp.jwks_fetches - before == 1


def test_a_failed_fetch_keeps_serving_cached_keys(idp, tmp_path):
    s = Settings(data_dir=tmp_path, auth={"oidc": [idp.settings()], "jwks_cache_s": 0.1, "jwks_min_refetch_s": 0})
    verifier = TokenVerifier(s)
    run(verifier.verify(idp.token()))
    idp.fail_jwks = True
    try:
        time.sleep(0.15)  # the cache is stale: the next request refetches, fails, keeps the keys
        assert run(verifier.verify(idp.token()))
        assert verifier.caches[idp.issuer].fetches == 2
        cold = TokenVerifier(s)  # nothing cached: a clear refusal, not a crash
        with pytest.raises(AuthenticationFailed, match="could not be fetched"):
            run(cold.verify(idp.token()))
    finally:
        idp.fail_jwks = False


def test_discovery_must_name_the_configured_issuer(idp, tmp_path):
    s = Settings(data_dir=tmp_path, auth={"oidc": [idp.settings(issuer="http://elsewhere.example",
                                                                 discovery_url=idp.issuer + "/.well-known/openid-configuration")]})
    with pytest.raises(AuthenticationFailed, match="could not be fetched"):
        run(TokenVerifier(s).verify(idp.token(iss="http://elsewhere.example")))


def test_settings_refuse_symmetric_algorithms():
    from config.settings import ConfigError, OidcIssuerSettings  # noqa: F401
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="HS256"):
        OidcIssuerSettings(issuer="http://x", audience="a", algorithms=["RS256", "HS256"])
    with pytest.raises(ValidationError, match="none"):
        OidcIssuerSettings(issuer="http://x", audience="a", algorithms=["none"])


def test_identity_reads_acr_as_mfa_evidence(idp, tmp_path):
    verifier = TokenVerifier(settings_for(idp, tmp_path, mfa_acr=["urn:mfa"]))
    assert identity_of(run(verifier.verify(idp.token(acr="urn:mfa")))).mfa
    assert not identity_of(run(verifier.verify(idp.token(acr="urn:pwd")))).mfa


def test_orfeas_login_signs_in_through_a_loopback_redirect(idp, tmp_path, monkeypatch):
    import threading
    import webbrowser

    import httpx
    import yaml
    from typer.testing import CliRunner

    from cluster.cli import app as cli
    from cluster.identity_cli import stored_token

    config = tmp_path / "orfeas.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path), "auth": {"oidc": [idp.settings()]}}))
    monkeypatch.setenv("ORFEAS_TOKEN_FILE", str(tmp_path / "token.json"))
    idp.login_claims = {"sub": "frank", "roles": ["user"]}
    visited = []

    def browser(url: str) -> bool:  # the user's browser: follows the IdP's redirect to the CLI
        def go():
            visited.append(httpx.get(url, follow_redirects=True, timeout=10).status_code)
        threading.Thread(target=go, daemon=True).start()
        return True

    monkeypatch.setattr(webbrowser, "open", browser)
    result = CliRunner().invoke(cli, ["login", "--config", str(config), "--timeout", "20"])
    assert result.exit_code == 0, result.output
    assert "signed in as frank" in result.output and visited == [200]
    assert (tmp_path / "token.json").stat().st_mode & 0o777 == 0o600
    token = stored_token()
    principal = run(Authenticator(settings_for(idp, tmp_path)).authenticate(bearer(token)))
    assert principal.key_id == "test:frank"
    assert CliRunner().invoke(cli, ["logout"]).exit_code == 0 and stored_token() is None


# ------------------------------------------------------------ the verified-token cache


def cache_settings(idp, tmp_path, **auth) -> Settings:
    return Settings(data_dir=tmp_path, auth={"oidc": [idp.settings()], "jwks_min_refetch_s": 0.2,
                                             "key_cache_s": 60, **auth})


def test_a_repeated_token_is_served_from_the_cache(idp, tmp_path):
    idp.published = [idp.rsa, idp.ec, idp.ed]
    verifier = TokenVerifier(cache_settings(idp, tmp_path))
    token = idp.token()
    first, second = run(verifier.verify(token)), run(verifier.verify(token))
    assert second is first and verifier.verified.hits == 1 and len(verifier.verified) == 1
    off = TokenVerifier(cache_settings(idp, tmp_path, jwt_cache_entries=0))
    run(off.verify(token)), run(off.verify(token))
    assert off.verified.hits == 0 and len(off.verified) == 0


def test_a_warm_cache_lets_no_adversarial_token_through(idp, tmp_path):
    idp.published = [idp.rsa, idp.ec, idp.ed]
    cases = adversarial_tokens(idp)  # made now: earlier tests rotated the provider's RSA key
    auth = Authenticator(settings_for(idp, tmp_path, role_map={"user": "user", "ops": "admin"},
                                      team_claim="team", models_claim="models"))
    good = idp.token()
    run(auth.authenticate(bearer(good)))
    # Twice: a token whose signature holds but whose claims map to nothing is kept by the verifier
    # and must be refused the same way from the cache.
    for _ in range(2):
        for name, token, reason in cases:
            with pytest.raises(AuthenticationFailed) as err:
                run(auth.authenticate(bearer(token)))
            assert err.value.status == 401 and reason.lower() in err.value.message.lower(), (name, err.value.message)
    # (Cases with an unknown kid refetched the JWKS, which dropped the good token's entry.)
    hits = auth.tokens.verified.hits
    run(auth.authenticate(bearer(good))), run(auth.authenticate(bearer(good)))
    assert auth.tokens.verified.hits > hits


def test_a_cached_token_is_refused_once_it_expires(idp, tmp_path):
    idp.published = [idp.rsa, idp.ec, idp.ed]
    verifier = TokenVerifier(cache_settings(idp, tmp_path, jwt_leeway_s=0))
    exp = time.time() + 2.0
    token = idp.token(exp=exp)
    run(verifier.verify(token)), run(verifier.verify(token))
    assert verifier.verified.hits == 1
    time.sleep(max(0.0, exp - time.time()) + 0.05)
    with pytest.raises(AuthenticationFailed, match="expired"):
        run(verifier.verify(token))
    assert len(verifier.verified) == 0


def test_a_cached_token_is_refused_once_its_key_is_rotated_out(idp, tmp_path):
    """Seen through another token's refetch (an unknown kid), and through the JWKS TTL."""
    idp.published = [idp.rsa, idp.ec, idp.ed]
    verifier = TokenVerifier(cache_settings(idp, tmp_path))
    old = idp.token()
    run(verifier.verify(old)), run(verifier.verify(old))
    assert verifier.verified.hits == 1
    time.sleep(0.25)  # past jwks_min_refetch_s
    new = idp.rotate()  # the old key leaves the JWKS
    try:
        run(verifier.verify(idp.token(new)))  # an unknown kid: the refetch brings the new key set
        with pytest.raises(AuthenticationFailed, match="unknown signing key"):
            run(verifier.verify(old))
        stale = TokenVerifier(cache_settings(idp, tmp_path, jwks_cache_s=1.0))
        kept = idp.token(new)
        run(stale.verify(kept)), run(stale.verify(kept))
        assert stale.verified.hits == 1
        idp.rotate()
        time.sleep(1.05)  # the JWKS goes stale: the cached token is checked against the fresh keys
        with pytest.raises(AuthenticationFailed, match="unknown signing key"):
            run(stale.verify(kept))
    finally:
        idp.published = [idp.rsa, idp.ec, idp.ed]


def test_a_cached_token_of_an_issuer_no_longer_trusted_is_refused(idp, tmp_path):
    idp.published = [idp.rsa, idp.ec, idp.ed]
    verifier = TokenVerifier(cache_settings(idp, tmp_path))
    token = idp.token()
    run(verifier.verify(token))
    verifier.issuers.pop(idp.issuer)  # what a reconfiguration in place would do
    with pytest.raises(AuthenticationFailed, match="not trusted"):
        run(verifier.verify(token))
