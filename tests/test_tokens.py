"""The JWT verifier: one test for each way a token can be accepted or fail (unit tests of the core)."""

from __future__ import annotations

import base64
import hmac
import json
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from endpoint_core import principals
from endpoint_core.errors import NotAuthenticated
from endpoint_core.principals import ClaimNames, JwtVerifier, mint_token

SECRET = "unit-secret-0123456789-0123456789-0123456789"


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"userId": "alice", "organization_id": "acme", "authorities": ["ROLE_USER"],
                            "exp": int(time.time()) + 600}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def hs256(**overrides: Any) -> str:
    return jwt.encode(claims(**overrides), SECRET, algorithm="HS256")


@pytest.fixture
def verifier() -> JwtVerifier:
    return JwtVerifier(secret=SECRET, leeway_seconds=5)


def refused(verifier: JwtVerifier, token: str) -> str:
    with pytest.raises(NotAuthenticated) as caught:
        verifier.verify(token)
    assert caught.value.field == "Authorization"
    return caught.value.detail


def test_a_valid_user_token(verifier: JwtVerifier) -> None:
    principal = verifier.verify(hs256())
    assert (principal.user_id, principal.organization_id, principal.is_service) == ("alice", "acme", False)


def test_the_platforms_published_sample_shape_is_understood() -> None:
    # The sample payload has userId and sub; userId wins.
    verifier = JwtVerifier(secret=SECRET)
    principal = verifier.verify(hs256(sub="service", client_id="client", jti="x"))
    assert principal.user_id == "alice"


def test_sub_is_the_user_when_user_id_is_absent(verifier: JwtVerifier) -> None:
    assert verifier.verify(hs256(userId=None, sub="bob")).user_id == "bob"


def test_without_any_user_claim(verifier: JwtVerifier) -> None:
    assert "userId" in refused(verifier, hs256(userId=None))


@pytest.mark.parametrize("roles", [["SERVICE"], ["ROLE_SERVICE"], "ROLE_USER ROLE_SERVICE",
                                   [{"authority": "ROLE_SERVICE"}]])
def test_service_roles(verifier: JwtVerifier, roles: object) -> None:
    assert verifier.verify(hs256(authorities=roles)).is_service


def test_a_service_needs_no_organisation(verifier: JwtVerifier) -> None:
    principal = verifier.verify(hs256(authorities=["SERVICE"], organization_id=None))
    assert principal.is_service and principal.organization_id is None


def test_a_user_without_organisation_is_refused(verifier: JwtVerifier) -> None:
    assert "organization_id" in refused(verifier, hs256(organization_id=None))


@pytest.mark.parametrize("organization", [42, 0, True, ["acme"], {"id": "acme"}, ""])
def test_an_organisation_must_be_a_non_empty_string(verifier: JwtVerifier, organization: object) -> None:
    # 5 and "5" would otherwise be the same organisation.
    assert "organization_id" in refused(verifier, hs256(organization_id=organization))


@pytest.mark.parametrize("user", [0, [], "", None, 7, {"id": "x"}])
def test_a_present_but_unusable_user_claim_never_falls_back_to_sub(verifier: JwtVerifier, user: object) -> None:
    payload = claims(sub="bob")
    payload["userId"] = user
    detail = refused(verifier, jwt.encode(payload, SECRET, algorithm="HS256"))
    assert "'userId'" in detail


@pytest.mark.parametrize("bad", [
    "+", "#", "a/b", "a+b", "a#b", "eve\nINFO forged line", "nul\x00", "esc\x1b[31m", "del\x7f", "c1\x85",
    "rtl\u202eoverride", "zero\u200bwidth", "line\u2028separator", "x" * 257,
])
@pytest.mark.parametrize("claim", ["userId", "organization_id"])
def test_ids_that_go_into_topics_and_logs_are_refused(verifier: JwtVerifier, claim: str, bad: str) -> None:
    detail = refused(verifier, hs256(**{claim: bad}))
    assert repr(claim) in detail and "must" in detail


def test_ordinary_unicode_ids_are_accepted(verifier: JwtVerifier) -> None:
    principal = verifier.verify(hs256(userId="José Müller 日本", organization_id="org:acme.eu-1"))
    assert (principal.user_id, principal.organization_id) == ("José Müller 日本", "org:acme.eu-1")


def test_a_future_iat_is_reported_as_iat(verifier: JwtVerifier) -> None:
    detail = refused(verifier, hs256(iat=int(time.time()) + 600))
    assert "iat" in detail and "nbf" not in detail


@pytest.mark.parametrize("secret", ["x", "0123456789abcdef0123456789abcde"])
def test_hs256_secrets_shorter_than_32_bytes_are_refused(secret: str) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        JwtVerifier(secret=secret)
    JwtVerifier(secret=secret + "0" * (32 - len(secret)))  # exactly 32 bytes is enough


def test_expired(verifier: JwtVerifier) -> None:
    assert "expired" in refused(verifier, hs256(exp=int(time.time()) - 60))


def test_expiry_within_leeway_is_accepted(verifier: JwtVerifier) -> None:
    verifier.verify(hs256(exp=int(time.time()) - 2))


def test_not_yet_valid(verifier: JwtVerifier) -> None:
    detail = refused(verifier, hs256(nbf=int(time.time()) + 60))
    assert "nbf" in detail and "iat" not in detail


def test_exp_is_required(verifier: JwtVerifier) -> None:
    assert "exp" in refused(verifier, hs256(exp=None))


def test_bad_signature(verifier: JwtVerifier) -> None:
    forged = jwt.encode(claims(), "another-secret-0123456789-0123456789-0123", algorithm="HS256")
    assert "signature" in refused(verifier, forged)


def test_tampered_payload(verifier: JwtVerifier) -> None:
    header, _, signature = hs256().split(".")
    other_payload = hs256(userId="root").split(".")[1]
    refused(verifier, f"{header}.{other_payload}.{signature}")


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "Bearer x.y.z", "e30.e30"])
def test_malformed(verifier: JwtVerifier, garbage: str) -> None:
    refused(verifier, garbage)


def test_alg_none_is_never_accepted(verifier: JwtVerifier) -> None:
    unsigned = jwt.encode(claims(), None, algorithm="none")
    assert "'none'" in refused(verifier, unsigned)


def test_none_cannot_be_configured() -> None:
    with pytest.raises(ValueError, match="none"):
        JwtVerifier(secret=SECRET, algorithms=["none"])


def test_algorithm_outside_the_list(verifier: JwtVerifier) -> None:
    other = jwt.encode(claims(), SECRET + SECRET, algorithm="HS512")
    assert "HS512" in refused(verifier, other)


def test_issuer_and_audience_when_configured() -> None:
    verifier = JwtVerifier(secret=SECRET, issuer="https://id.example", audience="endpoint-broker")
    verifier.verify(hs256(iss="https://id.example", aud="endpoint-broker"))
    assert "issuer" in refused(verifier, hs256(iss="https://evil.example", aud="endpoint-broker"))
    assert "audience" in refused(verifier, hs256(iss="https://id.example", aud="someone-else"))
    assert "iss" in refused(verifier, hs256(aud="endpoint-broker"))


def test_audience_is_ignored_when_not_configured(verifier: JwtVerifier) -> None:
    verifier.verify(hs256(aud="anything"))


def test_custom_claim_names() -> None:
    names = ClaimNames(user="uid", organization="tenant", roles="roles", service_roles=frozenset({"backend"}))
    verifier = JwtVerifier(secret=SECRET, claims=names)
    token = jwt.encode({"uid": "carol", "tenant": "t1", "roles": ["backend"], "exp": int(time.time()) + 60},
                       SECRET, algorithm="HS256")
    principal = verifier.verify(token)
    assert (principal.user_id, principal.organization_id, principal.is_service) == ("carol", "t1", True)


def _key_pair(make: Callable[[], Any]) -> tuple[Any, bytes]:
    private = make()
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


@pytest.mark.parametrize(("algorithm", "make"), [
    ("RS256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    ("ES256", lambda: ec.generate_private_key(ec.SECP256R1())),
])
def test_public_key_algorithms(algorithm: str, make: Callable[[], Any]) -> None:
    private, public_pem = _key_pair(make)
    verifier = JwtVerifier(public_key_pem=public_pem)
    assert verifier.algorithms == (algorithm,)
    assert verifier.verify(jwt.encode(claims(), private, algorithm=algorithm)).user_id == "alice"
    # The classic confusion attack: an HS256 token "signed" with the public key text.
    confused = jwt.api_jws.PyJWS()
    confused._algorithms["HS256"].prepare_key = lambda key: key  # skip PyJWT's own guard
    forged = confused.encode(jwt.utils.force_bytes('{"userId":"x"}'), public_pem, algorithm="HS256")
    refused(verifier, forged)
    other_private, _ = _key_pair(make)
    assert "signature" in refused(verifier, jwt.encode(claims(), other_private, algorithm=algorithm))


def test_a_configured_algorithm_needs_a_key() -> None:
    with pytest.raises(ValueError, match="RS256"):
        JwtVerifier(secret=SECRET, algorithms=["RS256"])
    with pytest.raises(ValueError, match="secret or a public key"):
        JwtVerifier()


def test_verified_tokens_are_cached_but_never_past_exp_nor_for_long(monkeypatch: pytest.MonkeyPatch) -> None:
    cache_clock = [time.time()]  # the cache's clock, moved by hand; PyJWT keeps checking on the real one
    monkeypatch.setattr(principals, "time", SimpleNamespace(time=lambda: cache_clock[0]))
    verifier = JwtVerifier(secret=SECRET, leeway_seconds=0)
    short, long = hs256(exp=int(cache_clock[0]) + 2), hs256(exp=int(cache_clock[0]) + 3600)
    cached_short, cached_long = verifier.verify(short), verifier.verify(long)
    assert verifier.verify(short) is cached_short and verifier.verify(long) is cached_long
    cache_clock[0] = cached_short.expires_at  # `exp` reached: verified again (and refused, see test_expired)
    assert verifier.verify(short) is not cached_short
    assert verifier.verify(long) is cached_long
    cache_clock[0] += 60  # a minute at most, even for a long-lived token
    assert verifier.verify(long) is not cached_long


def test_minted_tokens_verify() -> None:
    token = mint_token(SECRET, user_id="dave", organization_id="o", roles=["SERVICE"], ttl_seconds=60)
    principal = JwtVerifier(secret=SECRET).verify(token)
    assert (principal.user_id, principal.organization_id, principal.is_service) == ("dave", "o", True)


def test_the_secret_is_checked_once_not_once_per_token(verifier: JwtVerifier,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # A `kid` header takes PyJWT's path (a plain HS256 header is checked without PyJWT, below).
    tokens = {user: jwt.encode(claims(userId=user), SECRET, algorithm="HS256", headers={"kid": "k1"})
              for user in ("u1", "u2", "u3")}  # encoding checks the key too
    checks: list[object] = []
    library_check = jwt.algorithms.HMACAlgorithm.prepare_key
    monkeypatch.setattr(jwt.algorithms.HMACAlgorithm, "prepare_key",
                        lambda self, key: (checks.append(key), library_check(self, key))[1])

    for user, token in tokens.items():
        assert verifier.verify(token).user_id == user

    assert len(checks) == 1
    monkeypatch.undo()
    with pytest.raises(NotAuthenticated):  # the memoised key still verifies signatures
        verifier.verify(jwt.encode(claims(), "another-secret-that-is-long-enough-32b", algorithm="HS256"))


def test_a_token_verified_without_remembering_is_not_cached(verifier: JwtVerifier) -> None:
    token = hs256()

    assert verifier.verify(token, remember=False).user_id == "alice"
    assert token not in verifier._cache  # an MQTT CONNECT's token: kept only by its connection

    verifier.verify(token)
    assert token in verifier._cache


def test_the_token_cache_holds_at_most_its_size_and_lets_the_oldest_go_first() -> None:
    verifier = JwtVerifier(secret=SECRET, cache_size=3)
    tokens = [hs256(userId=f"u{i}") for i in range(5)]
    for each in tokens:
        verifier.verify(each)

    assert len(verifier._cache) == 3
    assert [each in verifier._cache for each in tokens] == [False, False, True, True, True]


# ----------------------------------------------------- HS256 without PyJWT

def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forged(header: bytes, payload: bytes, secret: str = SECRET) -> str:
    """A token signed with HS256 over exactly these bytes, whatever they say."""
    signed = f"{b64url(header)}.{b64url(payload)}"
    return f"{signed}.{b64url(hmac.digest(secret.encode(), signed.encode(), 'sha256'))}"


def plain(**overrides: Any) -> str:
    return forged(b'{"alg":"HS256","typ":"JWT"}', json.dumps(claims(**overrides)).encode())


def edge_tokens() -> dict[str, str]:
    """Every way the fast path could disagree with PyJWT: time claims at and around their bounds
    and of every JSON type, optional claims of the wrong type, other headers, broken segments.
    Made when a test runs, so that "within the leeway" still is."""
    now = int(time.time())
    return {
        "valid": plain(),
        "float exp": plain(exp=now + 600.5),
        "expired": plain(exp=now - 600),
        "expired within the leeway": plain(exp=now - 2),
        "expired just past the leeway": plain(exp=now - 6),
        "exp as a string": plain(exp=str(now + 600)),
        "exp as a bool": plain(exp=True),
        "exp huge": plain(exp=10**30),
        "exp negative huge": plain(exp=-(10**30)),
        "exp missing": forged(b'{"alg":"HS256"}', b'{"userId":"alice","organization_id":"acme"}'),
        "exp null": forged(b'{"alg":"HS256"}', b'{"userId":"alice","exp":null}'),
        "exp NaN": forged(b'{"alg":"HS256"}', b'{"userId":"alice","exp":NaN}'),
        "nbf future": plain(nbf=now + 600),
        "nbf within the leeway": plain(nbf=now + 2),
        "nbf as a string": plain(nbf="soon"),
        "iat future": plain(iat=now + 600),
        "iat as a string": plain(iat="abc"),
        "iat as a numeric string": plain(iat=str(now)),
        "sub not a string": plain(sub=123),
        "jti not a string": plain(jti=5),
        "aud with no audience configured": plain(aud="someone"),
        "header with kid": forged(b'{"alg":"HS256","kid":"k1"}', json.dumps(claims()).encode()),
        "header with crit": forged(b'{"alg":"HS256","crit":["b64"],"b64":false}', json.dumps(claims()).encode()),
        "typ not a string": forged(b'{"alg":"HS256","typ":1}', json.dumps(claims()).encode()),
        "alg none": b64url(b'{"alg":"none"}') + "." + b64url(json.dumps(claims()).encode()) + ".",
        "alg HS384": jwt.encode(claims(), SECRET * 2, algorithm="HS384"),  # a key long enough for HS384
        "header not JSON": forged(b"{alg", json.dumps(claims()).encode()),
        "header an array": forged(b'["HS256"]', json.dumps(claims()).encode()),
        "payload not JSON": forged(b'{"alg":"HS256"}', b"{exp"),
        "payload an array": forged(b'{"alg":"HS256"}', b"[1,2]"),
        "wrong key": plain().rsplit(".", 1)[0] + "." + b64url(b"x" * 32),
        "another secret": forged(b'{"alg":"HS256"}', json.dumps(claims()).encode(), secret="z" * 40),
        "two segments": ".".join(plain().split(".")[:2]),
        "four segments": plain() + ".x",
        "not ASCII": plain()[:-2] + "\u00e9\u00e9",
        "characters outside base64": plain()[:-1] + "$" + plain()[-1],
        "no userId": forged(b'{"alg":"HS256"}', json.dumps({"exp": now + 600}).encode()),
    }


def outcome(verifier: JwtVerifier, token: str) -> tuple[Any, ...]:
    try:
        principal = verifier.verify(token, remember=False)
    except NotAuthenticated as refusal:
        return ("refused", refusal.reason, refusal.detail)
    return ("accepted", principal)


@pytest.mark.parametrize("name", list(edge_tokens()))
def test_the_hs256_fast_path_decides_as_pyjwt_does(name: str) -> None:
    fast, pyjwt_only = JwtVerifier(secret=SECRET, leeway_seconds=5), JwtVerifier(secret=SECRET, leeway_seconds=5)
    pyjwt_only._fast_hs256_key = None
    token = edge_tokens()[name]
    assert outcome(fast, token) == outcome(pyjwt_only, token)


def test_a_plain_hs256_token_is_verified_without_pyjwt(verifier: JwtVerifier,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pyjwt(*_: object, **__: object) -> None:
        raise AssertionError("PyJWT was asked")

    monkeypatch.setattr(verifier._decoder, "decode", no_pyjwt)
    assert verifier.verify(hs256()).user_id == "alice"  # PyJWT's own encoding, header and all
    assert verifier.verify(edge_tokens()["float exp"]).user_id == "alice"


def test_with_an_issuer_or_audience_every_token_goes_to_pyjwt() -> None:
    for verifier in (JwtVerifier(secret=SECRET, issuer="me"), JwtVerifier(secret=SECRET, audience="us")):
        assert verifier._fast_hs256_key is None
        assert outcome(verifier, plain())[0] == "refused"  # no iss / aud claim
