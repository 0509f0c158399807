"""The broker accepts a job's OIDC token only if it proves a run of the stack's repository.

Every test verifies tokens minted by the fake GitHub issuer, whose discovery document and JWKS
the verifier fetches over real HTTP. Each attack names the refusal it must get; no refusal
may quote the token.
"""

import base64
import json
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from gpu_runners import broker_api
from gpu_runners.broker.oidc import (
    MAX_TOKEN_BYTES,
    MAX_TOKEN_LIFETIME_SECONDS,
    REQUIRED_CLAIMS,
    OidcPolicy,
    OidcVerifier,
    RunClaims,
    TokenForbiddenError,
    TokenRejectedError,
    VerificationUnavailableError,
)
from gpu_runners.contract import DEFAULT_ALLOWED_EVENTS, GITHUB_OIDC_ISSUER
from tests.fakes.oidc_issuer import MOVED_JWKS_PATH, FakeOidcIssuer, new_signing_key

pytest_plugins = ["tests.fakes.fixtures"]

MakeVerifier = Callable[..., OidcVerifier]


@pytest.fixture
def make_verifier(fake_oidc: FakeOidcIssuer) -> MakeVerifier:
    """Builds a verifier for the fake issuer; keyword arguments go to OidcPolicy, except the
    verifier's own (key_refresh_cooldown, key_max_age, clock, max_remembered_tokens)."""
    verifier_options = {"key_refresh_cooldown", "key_max_age", "clock", "max_remembered_tokens"}

    def make(**options: Any) -> OidcVerifier:
        own = {name: options.pop(name) for name in verifier_options & options.keys()}
        policy_fields: dict[str, Any] = {
            "issuer": fake_oidc.issuer,
            "audience": fake_oidc.audience,
            "repository_id": "74",
            "repository_owner_id": "65",
            "allowed_events": frozenset(DEFAULT_ALLOWED_EVENTS),
            **options,
        }
        return OidcVerifier(OidcPolicy(**policy_fields), **own)

    return make


@pytest.fixture
def verifier(make_verifier: MakeVerifier) -> OidcVerifier:
    return make_verifier()


def now() -> int:
    return int(time.time())


def refused(verifier: OidcVerifier, token: str) -> TokenRejectedError:
    """Verifies a token that must be refused; checks the refusal never quotes it."""
    with pytest.raises(TokenRejectedError) as caught:
        verifier.verify(token)
    shown = f"{caught.value.reason} {caught.value}"
    for segment in token.split("."):
        if len(segment) >= 8:
            assert segment not in shown
    assert "\n" not in caught.value.reason
    # No chained library exception carries token material into a logged traceback either.
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or caught.value.__suppress_context__
    return caught.value


def b64url_json(raw: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(raw).encode()).rstrip(b"=").decode()


def payload_of(token: str) -> dict[str, Any]:
    raw = token.split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    return decoded


# --- a genuine token -----------------------------------------------------------------------------


def test_a_genuine_token_yields_its_run_as_integers(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    token = fake_oidc.mint(run_id="32291736541", run_attempt="2")

    claims = verifier.verify(token)

    assert claims == RunClaims(
        repository="acme/models",
        repository_id=74,
        repository_owner_id=65,
        run_id=32291736541,
        run_attempt=2,
        event_name="push",
        ref="refs/heads/main",
        job_workflow_ref="acme/models/.github/workflows/train.yml@refs/heads/main",
        actor="octocat",
        sha="0123456789abcdef0123456789abcdef01234567",
        jti=payload_of(token)["jti"],
        expires_at=payload_of(token)["exp"],
    )
    assert (fake_oidc.discovery_fetches, fake_oidc.jwks_fetches) == (1, 1)


def test_the_token_a_job_fetches_for_the_broker_audience_is_accepted(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    # What the client does in a job step: GET the runner's URL with &audience=<broker's>.
    url = fake_oidc.request_url + "&audience=" + urllib.parse.quote(fake_oidc.audience, safe="")
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {fake_oidc.request_token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        token = json.loads(response.read())["value"]

    assert verifier.verify(token).run_id == 123


def test_keys_are_fetched_once_for_many_tokens(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    for _ in range(5):
        verifier.verify(fake_oidc.mint())

    assert (fake_oidc.discovery_fetches, fake_oidc.jwks_fetches) == (1, 1)


# --- audience and issuer -------------------------------------------------------------------------


def test_a_token_for_another_audience_is_refused(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    error = refused(verifier, fake_oidc.mint(aud="sts.amazonaws.com"))

    assert error.reason == "token audience must be exactly 'gpu-runners-broker', alone"
    assert broker_api.ERROR_STATUS[error.code] == 401


def test_githubs_default_audience_from_the_token_endpoint_is_refused(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    # A job that forgot `audience` gets https://github.com/<owner>, which every service takes.
    request = urllib.request.Request(
        fake_oidc.request_url, headers={"Authorization": f"Bearer {fake_oidc.request_token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        token = json.loads(response.read())["value"]

    assert "audience must be exactly" in refused(verifier, token).reason


@pytest.mark.parametrize(
    "audience",
    [["gpu-runners-broker", "https://iam.googleapis.com/projects/1"], ["gpu-runners-broker"]],
    ids=["second-audience", "audience-list"],
)
def test_an_audience_list_is_refused_even_if_it_names_the_broker(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier, audience: list[str]
) -> None:
    error = refused(verifier, fake_oidc.mint(aud=audience))

    assert error.reason == "token audience must be exactly 'gpu-runners-broker', alone"


def test_a_token_naming_another_issuer_is_refused(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    error = refused(verifier, fake_oidc.mint(iss=GITHUB_OIDC_ISSUER))

    assert error.reason == f"token issuer is not {fake_oidc.issuer}"


# --- time ----------------------------------------------------------------------------------------


def test_an_expired_token_is_refused(fake_oidc: FakeOidcIssuer, verifier: OidcVerifier) -> None:
    exp = now() - 61  # beyond the 60 s leeway
    token = fake_oidc.mint(iat=exp - 300, nbf=exp - 600, exp=exp)

    assert refused(verifier, token).reason == "token has expired (exp)"


def test_expiry_is_checked_with_the_policys_leeway(
    fake_oidc: FakeOidcIssuer, make_verifier: MakeVerifier
) -> None:
    exp = now() - 20

    assert make_verifier(leeway_seconds=60).verify(
        fake_oidc.mint(iat=exp - 300, nbf=exp - 600, exp=exp)
    )
    token = fake_oidc.mint(iat=exp - 300, nbf=exp - 600, exp=exp)
    assert refused(make_verifier(leeway_seconds=0), token).reason == "token has expired (exp)"


def test_a_token_not_valid_yet_is_refused(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    token = fake_oidc.mint(nbf=now() + 120)

    assert refused(verifier, token).reason == "token is not valid yet (nbf)"


def test_a_token_issued_in_the_future_is_refused(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    iat = now() + 120
    token = fake_oidc.mint(iat=iat, nbf=now() - 10, exp=iat + 300)

    assert refused(verifier, token).reason == "token is issued in the future (iat)"


def test_a_long_lived_token_is_refused(fake_oidc: FakeOidcIssuer, verifier: OidcVerifier) -> None:
    token = fake_oidc.mint(exp=now() + MAX_TOKEN_LIFETIME_SECONDS + 1)

    assert refused(verifier, token).reason.startswith("token lifetime (exp - iat) must be 1 to")


def test_a_token_of_exactly_the_longest_lifetime_is_accepted(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    iat = now()

    claims = verifier.verify(fake_oidc.mint(iat=iat, exp=iat + MAX_TOKEN_LIFETIME_SECONDS))

    assert claims.expires_at == iat + MAX_TOKEN_LIFETIME_SECONDS


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
def test_times_must_be_json_integers(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier, claim: str
) -> None:
    # PyJWT itself would take int("...") of a string.
    as_string: dict[str, Any] = {claim: str(payload_of(fake_oidc.mint())[claim])}

    error = refused(verifier, fake_oidc.mint(**as_string))

    assert error.reason == f"token claim {claim} must be an integer (seconds)"


# --- algorithm, key and signature -----------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["none", "HS256"])
def test_forged_algorithms_are_refused_before_any_key_lookup(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier, algorithm: str
) -> None:
    error = refused(verifier, fake_oidc.mint(algorithm=algorithm))

    assert error.reason == f"token algorithm {algorithm!r} is not RS256"
    assert (fake_oidc.discovery_fetches, fake_oidc.jwks_fetches) == (0, 0)


def test_hs256_forgery_is_refused_even_with_the_keys_loaded(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    verifier.refresh_keys()

    error = refused(verifier, fake_oidc.mint(algorithm="HS256"))

    assert error.reason == "token algorithm 'HS256' is not RS256"


def test_a_token_without_a_key_id_is_refused(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    error = refused(verifier, fake_oidc.mint(header={"kid": None}))

    assert error.reason == "token header names no key id (kid)"
    assert fake_oidc.jwks_fetches == 0


def test_an_oversize_token_is_refused_unread(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    token = fake_oidc.mint(padding="x" * MAX_TOKEN_BYTES)

    assert refused(verifier, token).reason == f"token is larger than {MAX_TOKEN_BYTES} bytes"
    assert fake_oidc.jwks_fetches == 0


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "no token given"),
        ("not-a-jwt", "token is not a well-formed JWT"),
        ("a.b.c", "token is not a well-formed JWT"),
        ("é" * 5000, "token is not a well-formed JWT"),
        ("e30.e30.e30", "token algorithm None is not RS256"),  # header {}
    ],
)
def test_junk_is_refused_unread(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier, token: str, reason: str
) -> None:
    assert refused(verifier, token).reason == reason
    assert fake_oidc.discovery_fetches == 0


def test_a_tampered_payload_fails_the_signature(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    header, payload, signature = fake_oidc.mint().split(".")
    claims = payload_of(f"{header}.{payload}.{signature}")
    claims["run_id"] = "999"  # another run's
    tampered = f"{header}.{b64url_json(claims)}.{signature}"

    assert refused(verifier, tampered).reason == "token signature does not match the issuer's key"


def test_a_foreign_key_under_the_issuers_kid_fails_the_signature(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    token = fake_oidc.mint(signing_key=new_signing_key(), header={"kid": fake_oidc.signing_key.kid})

    assert refused(verifier, token).reason == "token signature does not match the issuer's key"


def test_an_unknown_kid_is_refetched_once_then_refused(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    verifier.verify(fake_oidc.mint())

    error = refused(verifier, fake_oidc.mint(signing_key=new_signing_key()))

    assert error.reason == "token is signed with a key the issuer does not publish (kid)"
    assert fake_oidc.jwks_fetches == 2


def test_a_flood_of_unknown_kids_within_the_cooldown_refetches_once(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    verifier.verify(fake_oidc.mint())
    forged = [fake_oidc.mint(signing_key=new_signing_key()) for _ in range(4)]
    outcomes: list[str] = []

    def attack(token: str) -> None:
        for _ in range(10):
            try:
                verifier.verify(token)
            except TokenRejectedError as e:
                outcomes.append(e.reason)

    threads = [threading.Thread(target=attack, args=(token,)) for token in forged]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert outcomes == ["token is signed with a key the issuer does not publish (kid)"] * 40
    assert (fake_oidc.discovery_fetches, fake_oidc.jwks_fetches) == (2, 2)


def test_an_unknown_kid_after_the_cooldown_refetches_again(
    fake_oidc: FakeOidcIssuer, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(key_refresh_cooldown=0.2)
    verifier.verify(fake_oidc.mint())
    refused(verifier, fake_oidc.mint(signing_key=new_signing_key()))
    time.sleep(0.25)

    refused(verifier, fake_oidc.mint(signing_key=new_signing_key()))

    assert fake_oidc.jwks_fetches == 3


def test_a_rotated_key_is_accepted_after_one_refetch(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    verifier.verify(fake_oidc.mint())
    fake_oidc.rotate_key()

    claims = verifier.verify(fake_oidc.mint())

    assert claims.run_id == 123
    assert fake_oidc.jwks_fetches == 2


def test_a_withdrawn_key_is_not_trusted_once_the_key_set_is_old(
    fake_oidc: FakeOidcIssuer, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(key_refresh_cooldown=0, key_max_age=0.2)
    old_key = fake_oidc.signing_key
    verifier.verify(fake_oidc.mint())
    fake_oidc.rotate_key(keep_old=False)
    time.sleep(0.25)

    error = refused(verifier, fake_oidc.mint(signing_key=old_key))

    assert error.reason == "token is signed with a key the issuer does not publish (kid)"
    assert fake_oidc.jwks_fetches == 2


# --- the issuer's documents ----------------------------------------------------------------------


def test_issuer_down_at_startup_fails_closed(
    fake_oidc: FakeOidcIssuer, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(key_refresh_cooldown=0.2)
    fake_oidc.down = True

    with pytest.raises(VerificationUnavailableError) as startup:
        verifier.refresh_keys()
    error = refused(verifier, fake_oidc.mint())

    assert startup.value.reason == (
        "the OIDC issuer's signing keys are unavailable (discovery document answered "
        "HTTP 503); retry later"
    )
    assert isinstance(error, VerificationUnavailableError)
    assert broker_api.ERROR_STATUS[error.code] == 503
    assert not verifier.keys_loaded


def test_keys_load_once_the_issuer_recovers_after_the_cooldown(
    fake_oidc: FakeOidcIssuer, make_verifier: MakeVerifier
) -> None:
    # A cooldown long enough that the second call surely falls within it on a busy machine.
    verifier = make_verifier(key_refresh_cooldown=1.0)
    fake_oidc.down = True
    with pytest.raises(VerificationUnavailableError):
        verifier.refresh_keys()
    fake_oidc.down = False

    # Within the cooldown the issuer is not asked again.
    with pytest.raises(VerificationUnavailableError):
        verifier.refresh_keys()
    assert len(fake_oidc.requests) == 1
    time.sleep(1.05)
    verifier.refresh_keys()

    assert verifier.keys_loaded
    assert verifier.verify(fake_oidc.mint()).run_id == 123


def test_an_unknown_kid_while_the_issuer_fails_is_unavailable_not_forged(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    verifier.verify(fake_oidc.mint())
    fake_oidc.rotate_key()
    fake_oidc.fail_next(500)

    error = refused(verifier, fake_oidc.mint())

    assert isinstance(error, VerificationUnavailableError)
    assert "discovery document answered HTTP 500" in error.reason


def test_a_discovery_document_naming_another_issuer_is_refused(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    fake_oidc.discovery_issuer = GITHUB_OIDC_ISSUER

    error = refused(verifier, fake_oidc.mint())

    assert isinstance(error, VerificationUnavailableError)
    assert f"names issuer '{GITHUB_OIDC_ISSUER}', not {fake_oidc.issuer}" in error.reason
    assert fake_oidc.jwks_fetches == 0


def test_a_plain_http_jwks_uri_elsewhere_is_refused(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    fake_oidc.jwks_uri = "http://jwks.example.com/keys"

    error = refused(verifier, fake_oidc.mint())

    assert isinstance(error, VerificationUnavailableError)
    assert "jwks_uri 'http://jwks.example.com/keys' is not an https URL" in error.reason


def test_a_redirect_from_the_jwks_uri_is_not_followed(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    fake_oidc.jwks_uri = fake_oidc.url + MOVED_JWKS_PATH

    error = refused(verifier, fake_oidc.mint())

    assert isinstance(error, VerificationUnavailableError)
    assert "(JWKS answered HTTP 302)" in error.reason
    assert fake_oidc.jwks_fetches == 0


# --- claims and the stack's policy ---------------------------------------------------------------


def test_another_repository_with_the_same_name_is_forbidden(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    # acme/models deleted and re-created: same name, new id.
    error = refused(verifier, fake_oidc.mint(repository="acme/models", repository_id="75"))

    assert isinstance(error, TokenForbiddenError)
    assert error.reason == "token claim repository_id 75 is not the id of this stack's repository"
    assert broker_api.ERROR_STATUS[error.code] == 403


def test_another_owner_id_is_forbidden(fake_oidc: FakeOidcIssuer, verifier: OidcVerifier) -> None:
    error = refused(verifier, fake_oidc.mint(repository_owner_id="66"))

    assert isinstance(error, TokenForbiddenError)
    assert error.reason == (
        "token claim repository_owner_id 66 is not the id of this stack's repository owner"
    )


def test_the_subject_is_never_what_authorises(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    # A sub claiming the stack's repository does not help a token of another repository...
    other = fake_oidc.mint(sub="repo:acme/models:ref:refs/heads/main", repository_id="75")
    assert isinstance(refused(verifier, other), TokenForbiddenError)
    # ...and a customised sub format does not hurt a token of the stack's repository.
    assert verifier.verify(fake_oidc.mint(sub="repo:acme@65/models@74:env:x")).run_id == 123


@pytest.mark.parametrize("event", ["pull_request_target", "workflow_run", "issue_comment"])
def test_events_outside_the_allow_list_are_forbidden(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier, event: str
) -> None:
    error = refused(verifier, fake_oidc.mint(event_name=event))

    assert isinstance(error, TokenForbiddenError)
    assert error.reason == (
        f"token claim event_name '{event}' is not an event allowed to use GPU runners"
    )


@pytest.mark.parametrize("event", ["pull_request_target", "workflow_run"])
def test_a_policy_allowing_a_forbidden_event_cannot_be_built(
    fake_oidc: FakeOidcIssuer, event: str
) -> None:
    with pytest.raises(ValueError, match=r"OidcPolicy\.allowed_events must not include"):
        OidcPolicy(
            issuer=fake_oidc.issuer,
            audience="gpu-runners-broker",
            repository_id="74",
            repository_owner_id="65",
            allowed_events=frozenset({"push", event}),
        )


@pytest.mark.parametrize("event", ["pull_request_target", "workflow_run"])
def test_forbidden_events_are_refused_even_if_the_allow_list_names_them(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier, event: str
) -> None:
    # A policy altered after its checks ran (construction refuses these events) still cannot
    # let such a run in: the verifier refuses them on its own.
    events = frozenset({"push", event})
    object.__setattr__(verifier.policy, "allowed_events", events)

    error = refused(verifier, fake_oidc.mint(event_name=event))

    assert isinstance(error, TokenForbiddenError)
    assert verifier.verify(fake_oidc.mint(event_name="push")).event_name == "push"


@pytest.mark.parametrize(
    ("ref", "allowed"),
    [
        ("refs/heads/main", True),
        ("refs/tags/v1.2", True),
        ("refs/heads/feature", False),
        ("refs/pull/7/merge", False),
    ],
)
def test_refs_are_checked_against_the_patterns(
    fake_oidc: FakeOidcIssuer, make_verifier: MakeVerifier, ref: str, allowed: bool
) -> None:
    verifier = make_verifier(allowed_refs=("refs/heads/main", "refs/tags/v*"))
    token = fake_oidc.mint(ref=ref)

    if allowed:
        assert verifier.verify(token).ref == ref
    else:
        error = refused(verifier, token)
        assert isinstance(error, TokenForbiddenError)
        assert error.reason == f"token claim ref '{ref}' matches none of the allowed refs"


def test_a_token_without_a_ref_is_forbidden_when_refs_are_restricted(
    fake_oidc: FakeOidcIssuer, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(allowed_refs=("refs/heads/*",))

    error = refused(verifier, fake_oidc.mint(ref=None))

    assert error.reason == "token claim ref '' matches none of the allowed refs"


def test_job_workflow_refs_are_checked_against_the_patterns(
    fake_oidc: FakeOidcIssuer, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(
        allowed_workflow_refs=("acme/models/.github/workflows/train.yml@refs/heads/main",)
    )
    other = "acme/models/.github/workflows/evil.yml@refs/heads/main"

    assert verifier.verify(fake_oidc.mint()).job_workflow_ref.endswith("train.yml@refs/heads/main")
    error = refused(verifier, fake_oidc.mint(job_workflow_ref=other))
    assert isinstance(error, TokenForbiddenError)
    assert error.reason == (
        f"token claim job_workflow_ref '{other}' matches none of the allowed workflows"
    )


@pytest.mark.parametrize("claim", REQUIRED_CLAIMS)
def test_a_token_missing_a_required_claim_is_refused(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier, claim: str
) -> None:
    removed: dict[str, Any] = {claim: None}

    error = refused(verifier, fake_oidc.mint(**removed))

    assert error.reason == f"token lacks the {claim} claim"


@pytest.mark.parametrize("value", ["12a", "-1", "0", "0123", "1e3", " 123", "１２３", 123])
@pytest.mark.parametrize("claim", ["run_id", "run_attempt", "repository_id"])
def test_numeric_claims_must_be_positive_decimal_strings(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier, claim: str, value: object
) -> None:
    malformed: dict[str, Any] = {claim: value}

    error = refused(verifier, fake_oidc.mint(**malformed))

    assert error.reason == f"token claim {claim} must be a positive decimal string"


def test_a_non_string_text_claim_is_refused(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    error = refused(verifier, fake_oidc.mint(event_name=["push"]))

    assert error.reason == "token claim event_name must be a string"


# --- replays -------------------------------------------------------------------------------------


def test_a_token_is_accepted_once(fake_oidc: FakeOidcIssuer, verifier: OidcVerifier) -> None:
    token = fake_oidc.mint()
    verifier.verify(token)

    error = refused(verifier, token)

    assert error.reason == "token was already used (replayed jti); fetch a new one"
    assert verifier.verify(fake_oidc.mint()).run_id == 123  # a fresh token of the same run


def test_a_replayed_jti_in_a_new_token_is_refused(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    verifier.verify(fake_oidc.mint(jti="fixed"))

    error = refused(verifier, fake_oidc.mint(jti="fixed", run_attempt="2"))

    assert error.reason == "token was already used (replayed jti); fetch a new one"


def test_concurrent_uses_of_one_token_accept_exactly_one(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    verifier.refresh_keys()
    token = fake_oidc.mint()
    accepted: list[RunClaims] = []
    refusals: list[str] = []
    start = threading.Barrier(8)

    def use() -> None:
        start.wait()
        try:
            accepted.append(verifier.verify(token))
        except TokenRejectedError as e:
            refusals.append(e.reason)

    threads = [threading.Thread(target=use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(accepted) == 1
    assert refusals == ["token was already used (replayed jti); fetch a new one"] * 7


def test_a_refused_token_is_not_burnt(
    fake_oidc: FakeOidcIssuer, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(allowed_refs=("refs/tags/*",))

    refused(verifier, fake_oidc.mint())

    assert verifier.remembered_tokens == 0


def test_used_tokens_are_forgotten_after_they_expire(
    fake_oidc: FakeOidcIssuer, make_verifier: MakeVerifier
) -> None:
    clock = [time.time()]
    verifier = make_verifier(clock=lambda: clock[0])
    first = [fake_oidc.mint() for _ in range(3)]
    for token in first:
        verifier.verify(token)
    assert verifier.remembered_tokens == 3

    # Past exp (300 s) + leeway (60 s) + margin (5 s) the first three are dropped.
    clock[0] += 300 + 60 + 5 + 1
    verifier.verify(fake_oidc.mint())

    assert verifier.remembered_tokens == 1


def test_used_tokens_are_remembered_through_the_leeway(
    fake_oidc: FakeOidcIssuer, make_verifier: MakeVerifier
) -> None:
    clock = [time.time()]
    verifier = make_verifier(clock=lambda: clock[0])
    token = fake_oidc.mint()
    verifier.verify(token)

    # Just before exp + leeway + margin the decoder could still accept it: still remembered.
    clock[0] = payload_of(token)["exp"] + 60 + 4
    verifier.verify(fake_oidc.mint())

    assert verifier.remembered_tokens == 2


def test_a_full_replay_store_refuses_rather_than_forgets(
    fake_oidc: FakeOidcIssuer, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(max_remembered_tokens=2)
    first = fake_oidc.mint()
    verifier.verify(first)
    verifier.verify(fake_oidc.mint())

    error = refused(verifier, fake_oidc.mint())

    assert isinstance(error, VerificationUnavailableError)
    assert error.reason == (
        "the broker holds too many unexpired tokens to check replays; retry later"
    )
    assert refused(verifier, first).reason.startswith("token was already used")


def test_many_threads_verify_distinct_tokens(
    fake_oidc: FakeOidcIssuer, verifier: OidcVerifier
) -> None:
    tokens = [fake_oidc.mint(run_id=str(run)) for run in range(1, 41)]
    runs: list[int] = []
    lock = threading.Lock()

    def verify(batch: list[str]) -> None:
        for token in batch:
            claims = verifier.verify(token)
            with lock:
                runs.append(claims.run_id)

    threads = [threading.Thread(target=verify, args=(tokens[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(runs) == list(range(1, 41))
    assert verifier.remembered_tokens == 40
    assert fake_oidc.jwks_fetches == 1


def test_no_refusal_quotes_the_token(fake_oidc: FakeOidcIssuer, verifier: OidcVerifier) -> None:
    reused = fake_oidc.mint()
    verifier.verify(reused)
    attacks = [
        fake_oidc.mint(aud="other"),
        fake_oidc.mint(algorithm="HS256"),
        fake_oidc.mint(signing_key=new_signing_key()),
        fake_oidc.mint(repository_id="75"),
        fake_oidc.mint(run_id="x"),
        fake_oidc.mint(exp=now() - 3600, iat=now() - 3900),
        reused,
    ]

    for token in attacks:
        with pytest.raises(TokenRejectedError) as caught:
            verifier.verify(token)
        for text in (caught.value.reason, str(caught.value), repr(caught.value)):
            assert token not in text
            assert token.split(".")[2] not in text  # not even the signature


# --- the policy's own checks ---------------------------------------------------------------------


def policy_fields(**changes: Any) -> dict[str, Any]:
    return {
        "issuer": GITHUB_OIDC_ISSUER,
        "audience": "gpu-runners-broker",
        "repository_id": "74",
        "repository_owner_id": "65",
        "allowed_events": frozenset(DEFAULT_ALLOWED_EVENTS),
        **changes,
    }


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"issuer": "http://token.actions.githubusercontent.com"}, "issuer"),
        ({"issuer": "https://token.actions.githubusercontent.com/"}, "issuer"),
        ({"issuer": "https://token.actions.githubusercontent.com?x=1"}, "issuer"),
        ({"issuer": "token.actions.githubusercontent.com"}, "issuer"),
        ({"audience": ""}, "audience"),
        ({"audience": "https://github.com/acme"}, "audience"),
        (
            {"audience": "https://iam.googleapis.com/projects/1/locations/global/x"},
            "audience",
        ),
        ({"audience": "//iam.googleapis.com/projects/1/locations/global/x"}, "audience"),
        ({"repository_id": "acme/models"}, "repository_id"),
        ({"repository_owner_id": "0"}, "repository_owner_id"),
        ({"allowed_events": frozenset()}, "allowed_events"),
        ({"allowed_refs": ("",)}, "allowed_refs"),
        ({"allowed_workflow_refs": ("",)}, "allowed_workflow_refs"),
        ({"leeway_seconds": 61}, "leeway_seconds"),
        ({"leeway_seconds": -1}, "leeway_seconds"),
    ],
)
def test_an_invalid_policy_names_its_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^OidcPolicy\.{field} must"):
        OidcPolicy(**policy_fields(**changes))


@pytest.mark.parametrize(
    "issuer",
    [
        GITHUB_OIDC_ISSUER,
        f"{GITHUB_OIDC_ISSUER}/acme-enterprise",
        "https://ghes.example.com/_services/token",
        "http://127.0.0.1:8080",
        "http://localhost:8080",
        "http://[::1]:8080",
    ],
)
def test_github_issuers_and_loopback_test_issuers_are_valid(issuer: str) -> None:
    assert OidcPolicy(**policy_fields(issuer=issuer)).issuer == issuer


def test_policy_collections_are_stored_immutable() -> None:
    policy = OidcPolicy(
        **policy_fields(allowed_events=["push"], allowed_refs=["refs/heads/*"])  # lists given
    )

    assert policy.allowed_events == frozenset({"push"})
    assert policy.allowed_refs == ("refs/heads/*",)
