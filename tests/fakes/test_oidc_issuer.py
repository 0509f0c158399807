"""The fake OIDC issuer serves discovery, JWKS and job tokens the way GitHub does.

Checked with plain urllib and PyJWT, not with the broker's verifier, so these tests prove the
fake itself.
"""

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import jwt
import pytest

from tests.fakes.oidc_issuer import TOKEN_LIFETIME_SECONDS, FakeOidcIssuer, new_signing_key

pytest_plugins = ["tests.fakes.fixtures"]


def get(url: str, *, bearer: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer is not None else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


def segment(token: str, index: int) -> dict[str, Any]:
    raw = token.split(".")[index]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    return decoded


def verify_with_jwks(issuer: FakeOidcIssuer, token: str, audience: str) -> dict[str, Any]:
    status, discovery = get(issuer.url + "/.well-known/openid-configuration")
    assert status == 200
    _, jwks = get(discovery["jwks_uri"])
    key = jwt.PyJWKSet.from_dict(jwks)[jwt.get_unverified_header(token)["kid"]]
    claims: dict[str, Any] = jwt.decode(
        token, key, algorithms=["RS256"], audience=audience, issuer=issuer.issuer
    )
    return claims


def test_discovery_names_the_issuer_and_its_jwks(fake_oidc: FakeOidcIssuer) -> None:
    status, discovery = get(fake_oidc.url + "/.well-known/openid-configuration")

    assert status == 200
    assert discovery["issuer"] == fake_oidc.issuer
    assert discovery["jwks_uri"] == fake_oidc.url + "/.well-known/jwks"
    assert discovery["id_token_signing_alg_values_supported"] == ["RS256"]
    assert fake_oidc.discovery_fetches == 1


def test_minted_token_verifies_with_the_served_jwks_and_has_string_claims(
    fake_oidc: FakeOidcIssuer,
) -> None:
    token = fake_oidc.mint()

    claims = verify_with_jwks(fake_oidc, token, fake_oidc.audience)

    assert fake_oidc.jwks_fetches == 1
    assert claims["repository"] == "acme/models"
    # GitHub sends ids and counters as JSON strings.
    for name, value in {
        "repository_id": "74",
        "repository_owner_id": "65",
        "run_id": "123",
        "run_attempt": "1",
    }.items():
        assert claims[name] == value
    assert claims["exp"] - claims["iat"] == TOKEN_LIFETIME_SECONDS
    assert claims["nbf"] <= claims["iat"]
    assert segment(token, 0) == {"typ": "JWT", "alg": "RS256", "kid": fake_oidc.signing_key.kid}


def test_mint_overrides_and_removes_claims_and_headers(fake_oidc: FakeOidcIssuer) -> None:
    token = fake_oidc.mint(run_id="999", jti=None, header={"kid": None})

    claims = segment(token, 1)
    assert claims["run_id"] == "999"
    assert "jti" not in claims
    assert "kid" not in segment(token, 0)


def test_forgeries_carry_the_algorithm_they_claim(fake_oidc: FakeOidcIssuer) -> None:
    unsigned = fake_oidc.mint(algorithm="none")
    hmac_forgery = fake_oidc.mint(algorithm="HS256")

    assert segment(unsigned, 0)["alg"] == "none"
    assert unsigned.endswith(".")
    assert segment(hmac_forgery, 0)["alg"] == "HS256"
    # The forgery really is keyed with the public key: PyJWT checks it when told to.
    secret = fake_oidc.signing_key.public_pem
    signing_input, _, signature = hmac_forgery.rpartition(".")
    expected = jwt.algorithms.HMACAlgorithm(jwt.algorithms.HMACAlgorithm.SHA256).sign(
        signing_input.encode(), secret
    )
    assert base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)) == expected


def test_a_foreign_key_signs_under_its_own_kid(fake_oidc: FakeOidcIssuer) -> None:
    foreign = new_signing_key("not-published")

    token = fake_oidc.mint(signing_key=foreign)

    assert segment(token, 0)["kid"] == "not-published"
    assert "not-published" not in fake_oidc.published_kids


def test_rotate_key_publishes_the_new_key_and_signs_with_it(fake_oidc: FakeOidcIssuer) -> None:
    old = fake_oidc.signing_key.kid

    new = fake_oidc.rotate_key()
    token = fake_oidc.mint()

    assert fake_oidc.published_kids == [new, old]
    assert segment(token, 0)["kid"] == new
    assert verify_with_jwks(fake_oidc, token, fake_oidc.audience)["run_id"] == "123"
    fake_oidc.rotate_key(keep_old=False)
    assert len(fake_oidc.published_kids) == 1


def test_faults_and_outage_answer_errors_without_counting_fetches(
    fake_oidc: FakeOidcIssuer,
) -> None:
    fake_oidc.fail_next(500)
    assert get(fake_oidc.url + "/.well-known/jwks")[0] == 500
    fake_oidc.down = True
    assert get(fake_oidc.url + "/.well-known/openid-configuration")[0] == 503
    fake_oidc.down = False
    assert get(fake_oidc.url + "/.well-known/jwks")[0] == 200
    assert (fake_oidc.discovery_fetches, fake_oidc.jwks_fetches) == (0, 1)


def test_token_endpoint_mints_for_the_asked_audience(fake_oidc: FakeOidcIssuer) -> None:
    url = fake_oidc.request_url + "&audience=" + urllib.parse.quote("gpu-runners-broker", safe="")

    status, body = get(url, bearer=fake_oidc.request_token)

    assert status == 200
    assert verify_with_jwks(fake_oidc, body["value"], "gpu-runners-broker")["run_id"] == "123"
    assert fake_oidc.token_audiences == ["gpu-runners-broker"]


def test_token_endpoint_without_audience_gives_githubs_default(
    fake_oidc: FakeOidcIssuer,
) -> None:
    status, body = get(fake_oidc.request_url, bearer=fake_oidc.request_token)

    assert status == 200
    assert segment(body["value"], 1)["aud"] == "https://github.com/acme"
    assert fake_oidc.token_audiences == [None]


@pytest.mark.parametrize("bearer", [None, "wrong"])
def test_token_endpoint_refuses_a_wrong_bearer(
    fake_oidc: FakeOidcIssuer, bearer: str | None
) -> None:
    status, _ = get(fake_oidc.request_url + "&audience=x", bearer=bearer)

    assert status == 401
    assert fake_oidc.token_audiences == []


def test_token_endpoint_needs_the_runners_query_string(fake_oidc: FakeOidcIssuer) -> None:
    # A client that built "?audience=" instead of appending "&audience=" loses api-version.
    status, _ = get(fake_oidc.url + "/_actions/token?audience=x", bearer=fake_oidc.request_token)

    assert status == 400
