"""Who is calling: JWT bearer tokens turned into principals.

One verifier serves the HTTP bridge and the MQTT CONNECT path, so a token is
accepted or refused the same way on both sides. `TokenVerifier` is the small
interface both adapters depend on; `JwtVerifier` is the implementation.
"""

from __future__ import annotations

import binascii
import hmac
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import HMACAlgorithm
from jwt.utils import base64url_decode

from endpoint_core.errors import NotAuthenticated
from endpoint_core.ids import identity_problem

_HMAC_HASHES = {"HS256": HMACAlgorithm.SHA256, "HS384": HMACAlgorithm.SHA384, "HS512": HMACAlgorithm.SHA512}
HMAC_ALGORITHMS = frozenset(_HMAC_HASHES)


class _CheckedHmac(HMACAlgorithm):
    """PyJWT's HMAC, with its checks of a key run once per key instead of once per token.

    prepare_key tries the secret as PEM, SSH, DER and JSON on every decode: a third of
    PyJWT's time per token, and a CONNECT with a token not seen before pays it all. Only
    configured secrets reach it, so the memo stays as small as the configuration.
    """

    def __init__(self, hash_alg: Any) -> None:
        super().__init__(hash_alg)
        self._prepared: dict[str | bytes, bytes] = {}

    def prepare_key(self, key: str | bytes) -> bytes:
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = self._prepared[key] = super().prepare_key(key)
        return prepared


def _decoder() -> jwt.PyJWT:
    decoder = jwt.PyJWT()
    jws = decoder._jws  # PyJWT has no public way to give a PyJWT its algorithms
    for name, hash_alg in _HMAC_HASHES.items():
        jws.unregister_algorithm(name)
        jws.register_algorithm(name, _CheckedHmac(hash_alg))
    return decoder


RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGORITHMS = frozenset({"ES256", "ES384", "ES512"})
# RFC 7518 section 3.2: an HS256 key must be at least as long as the hash, 256 bits.
MIN_HMAC_SECRET_BYTES = 32

# Why a token was refused, by PyJWT's exception, in words for the problem body.
# And the reason, from NotAuthenticated's closed set.
_FAILURES: tuple[tuple[type[jwt.InvalidTokenError], str, str], ...] = (
    (jwt.ExpiredSignatureError, "token has expired", "expired"),
    (jwt.InvalidSignatureError, "token signature is invalid", "bad_signature"),
    (jwt.InvalidIssuerError, "token issuer is not accepted", "invalid_claim"),
    (jwt.InvalidAudienceError, "token audience is not accepted", "invalid_claim"),
    (jwt.DecodeError, "", "malformed"),
)

# Verified tokens are remembered for at most this long (and never past `exp`),
# so a burst of requests with one token pays for one signature check.
_CACHE_SECONDS = 60.0


# Distinct HS256 header segments remembered as plain; every client library writes one or two.
MAX_PLAIN_HEADERS = 16


def _plain_int(value: object) -> int | None:
    """int(value), as PyJWT reads a time claim, for a plain JSON number; None for anything else
    (a bool, a string, a huge value), which PyJWT then judges."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e15:
        return int(value)
    return None


class TokenCache:
    """Verified tokens: at most `maxsize`, each until its own deadline.

    A dict in insertion order; when full, the oldest entry goes first. Every REST request
    looks a token up here, so a lookup is one dict read and one comparison (cachetools'
    TLRUCache cost ten times that, a tenth of a sendEvent's Python time).
    """

    __slots__ = ("_entries", "_maxsize")

    def __init__(self, maxsize: int) -> None:
        self._entries: dict[str, tuple[Principal, float]] = {}
        self._maxsize = maxsize

    def get(self, token: str) -> Principal | None:
        entry = self._entries.get(token)
        if entry is None:
            return None
        if time.time() < entry[1]:
            return entry[0]
        del self._entries[token]
        return None

    def put(self, token: str, principal: Principal) -> None:
        entries = self._entries
        entries.pop(token, None)
        while len(entries) >= self._maxsize:
            del entries[next(iter(entries))]
        entries[token] = (principal, min(principal.expires_at, time.time() + _CACHE_SECONDS))

    def __contains__(self, token: object) -> bool:
        return isinstance(token, str) and self.get(token) is not None

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    user_id: str
    organization_id: str | None
    is_service: bool
    expires_at: float  # the token's `exp`, in Unix seconds

    @property
    def scope(self) -> str:
        """Who the caller is, as one string: per user in an organisation, or per SERVICE client."""
        return f"service:{self.user_id}" if self.is_service else f"user:{self.organization_id}/{self.user_id}"


class TokenVerifier(Protocol):
    def verify(self, token: str, *, remember: bool = True) -> Principal:
        """Return the token's principal, or raise NotAuthenticated saying why.

        `remember=False`: the caller will not present this token again soon (an MQTT CONNECT
        holds its connection for the token's life), so caching it would only cost memory.
        """
        ...


@dataclass(frozen=True, slots=True)
class ClaimNames:
    """Where a token keeps each fact. Defaults follow the platform's tokens."""

    user: str = "userId"
    user_fallback: str = "sub"
    organization: str = "organization_id"
    roles: str = "authorities"
    service_roles: frozenset[str] = field(default_factory=lambda: frozenset({"SERVICE", "ROLE_SERVICE"}))


def load_public_key(pem: bytes) -> tuple[Any, frozenset[str]]:
    """Load a PEM public key and the algorithm family it can verify."""
    key = load_pem_public_key(pem)
    if isinstance(key, rsa.RSAPublicKey):
        return key, RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key, EC_ALGORITHMS
    raise ValueError("the public key must be an RSA or EC key")


class JwtVerifier:
    """Verifies signed JWTs against configured keys and algorithms.

    `alg: none` can never be configured. `exp` is required and checked, `nbf`
    is checked when present, both with `leeway_seconds`.
    """

    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key_pem: bytes | None = None,
        algorithms: Sequence[str] | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_seconds: float = 30.0,
        claims: ClaimNames | None = None,
        cache_size: int = 10_000,
    ) -> None:
        keys: dict[str, Any] = {}
        if secret and len(secret.encode()) < MIN_HMAC_SECRET_BYTES:
            raise ValueError(
                f"the HS256 secret must be at least {MIN_HMAC_SECRET_BYTES} bytes long (RFC 7518, section 3.2)"
            )
        if secret:
            keys.update(dict.fromkeys(HMAC_ALGORITHMS, secret))
        if public_key_pem:
            key, family = load_public_key(public_key_pem)
            keys.update(dict.fromkeys(family, key))
        if not keys:
            raise ValueError("a JWT secret or a public key is required")
        if algorithms is None:
            # Default to the one common algorithm of each configured key type.
            algorithms = [a for a in ("HS256", "RS256", "ES256") if a in keys]
        unknown = [a for a in algorithms if a not in keys]
        if unknown:
            raise ValueError(f"no configured key can verify algorithm(s) {', '.join(unknown)}")
        if not algorithms:
            raise ValueError("at least one JWT algorithm must be accepted")
        self._keys = {a: keys[a] for a in algorithms}
        self._decoder = _decoder()
        # The common case, checked without PyJWT (_plain_hs256_claims): HS256 with no issuer or
        # audience to match. Anything it cannot prove valid goes to PyJWT, which decides.
        self._fast_hs256_key: bytes | None = (
            self._keys["HS256"].encode() if "HS256" in self._keys and issuer is None and audience is None else None
        )
        self._plain_headers: set[str] = set()
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_seconds
        self._claims = claims or ClaimNames()
        self._cache = TokenCache(cache_size)

    @property
    def algorithms(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def verify(self, token: str, *, remember: bool = True) -> Principal:
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        principal = self._verify_uncached(token)
        if remember:
            self._cache.put(token, principal)
        return principal

    def _verify_uncached(self, token: str) -> Principal:
        claims = self._plain_hs256_claims(token) if self._fast_hs256_key is not None else None
        return self._principal_from(self._pyjwt_claims(token) if claims is None else claims)

    def _plain_hs256_claims(self, token: str) -> dict[str, Any] | None:
        """The claims of a valid HS256 token with a plain header, or None for PyJWT to decide.

        PyJWT's decode is about 70 us of Python a token, a fifth of an MQTT CONNECT. This
        accepts only what PyJWT would accept, checked the same way (the same base64 decoding,
        HMAC and comparisons), and returns None for anything else, valid or not: other headers
        (kid, crit, b64...), malformed segments, a bad signature, a claim out of range or of a
        type PyJWT would convert. So every refusal, and its text, is still PyJWT's.
        """
        key = self._fast_hs256_key
        assert key is not None
        parts = token.split(".")
        if len(parts) != 3 or not self._is_plain_hs256_header(parts[0]):
            return None
        try:
            signature = base64url_decode(parts[2])
            payload = base64url_decode(parts[1])
        except (ValueError, binascii.Error):
            return None
        signed = f"{parts[0]}.{parts[1]}".encode()
        if not hmac.compare_digest(signature, hmac.digest(key, signed, "sha256")):
            return None
        try:
            claims = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(claims, dict):
            return None
        now, leeway = time.time(), self._leeway
        exp = _plain_int(claims.get("exp"))
        if exp is None or exp <= now - leeway:
            return None
        for claim in ("nbf", "iat"):
            if claim in claims and ((at := _plain_int(claims[claim])) is None or at > now + leeway):
                return None
        for claim in ("sub", "jti"):
            if claim in claims and not isinstance(claims[claim], str):
                return None
        return claims

    def _is_plain_hs256_header(self, segment: str) -> bool:
        """{"alg": "HS256"} and at most a string "typ": remembered, since nearly every token has the same."""
        if segment in self._plain_headers:
            return True
        try:
            header = orjson.loads(base64url_decode(segment))
        except (ValueError, binascii.Error, orjson.JSONDecodeError):
            return False
        plain = (isinstance(header, dict) and header.get("alg") == "HS256" and set(header) <= {"alg", "typ"}
                 and isinstance(header.get("typ", ""), str))
        if plain and len(self._plain_headers) < MAX_PLAIN_HEADERS:
            self._plain_headers.add(segment)
        return plain

    def _pyjwt_claims(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise NotAuthenticated(f"malformed token: {exc}", "Authorization", "malformed") from None
        algorithm = header.get("alg")
        key = self._keys.get(algorithm) if isinstance(algorithm, str) else None
        if key is None:
            raise NotAuthenticated(f"token algorithm {algorithm!r} is not accepted", "Authorization", "algorithm")
        assert isinstance(algorithm, str)
        try:
            claims = self._decoder.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options={"require": ["exp"], "verify_aud": self._audience is not None},
            )
        except jwt.MissingRequiredClaimError as exc:
            raise NotAuthenticated(f"token lacks the {exc.claim!r} claim", "Authorization", "missing_claim") from None
        except jwt.ImmatureSignatureError as exc:
            # PyJWT raises this for a future `nbf` and for a future `iat`; say which.
            claim = "iat" if "(iat)" in str(exc) else "nbf"
            raise NotAuthenticated(f"token is not valid yet ({claim} is in the future)", "Authorization",
                                   "not_yet_valid") from None
        except jwt.InvalidTokenError as exc:
            text, reason = next(((text, reason) for kind, text, reason in _FAILURES if isinstance(exc, kind)),
                                ("", "invalid_claim"))
            raise NotAuthenticated(text or f"invalid token: {exc}", "Authorization", reason) from None
        return claims

    def _principal_from(self, claims: Mapping[str, Any]) -> Principal:
        names = self._claims
        # The fallback claim is used only when the user claim is absent: a user claim
        # that is present but empty or not a string is a broken token, not a hint to
        # look elsewhere (it would silently make `sub` the user).
        user_claim = names.user if names.user in claims else names.user_fallback
        if user_claim not in claims:
            raise NotAuthenticated(
                f"token has no {names.user!r} or {names.user_fallback!r} claim", "Authorization", "missing_claim"
            )
        user = claims[user_claim]
        problem = identity_problem(user)
        if problem is not None:
            raise NotAuthenticated(f"token claim {user_claim!r} {problem}", "Authorization")
        organization = claims.get(names.organization)
        if organization is not None:
            # Strings only: accepting 5 as "5" would make two spellings one organisation.
            problem = identity_problem(organization)
            if problem is not None:
                raise NotAuthenticated(f"token claim {names.organization!r} {problem}", "Authorization")
        is_service = bool(names.service_roles & set(_roles_of(claims.get(names.roles))))
        if organization is None and not is_service:
            # Organisation scoping is the isolation boundary; a user without one
            # would land in a shared "no organisation" scope, so refuse it.
            raise NotAuthenticated(f"token has no {names.organization!r} claim", "Authorization", "missing_claim")
        expires_at = claims["exp"]
        if not isinstance(expires_at, int | float):
            raise NotAuthenticated("token claim 'exp' must be a number", "Authorization")
        return Principal(user, organization, is_service, float(expires_at))


def _roles_of(value: object) -> list[str]:
    """Roles as a list: Spring style lists, a space separated string, or {"authority": ...} items."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        roles = []
        for item in value:
            if isinstance(item, str):
                roles.append(item)
            elif isinstance(item, dict) and isinstance(item.get("authority"), str):
                roles.append(item["authority"])
        return roles
    return []


def mint_token(
    secret: str,
    *,
    user_id: str,
    organization_id: str | None,
    roles: Sequence[str] = ("ROLE_USER",),
    ttl_seconds: float = 3600.0,
    claims: ClaimNames | None = None,
    issuer: str | None = None,
    audience: str | None = None,
    now: float | None = None,
) -> str:
    """An HS256 token in the platform's shape, for development and tests."""
    names = claims or ClaimNames()
    issued = time.time() if now is None else now
    payload: dict[str, Any] = {
        "sub": user_id,
        names.user: user_id,
        names.roles: list(roles),
        "iat": int(issued),
        "exp": int(issued + ttl_seconds),
    }
    if organization_id is not None:
        payload[names.organization] = organization_id
    if issuer is not None:
        payload["iss"] = issuer
    if audience is not None:
        payload["aud"] = audience
    return jwt.encode(payload, secret, algorithm="HS256")
