"""HS256 tokens in the platform's shape, minted by the bench itself.

Same claims as endpoint_core.principals.mint_token, but without importing the
service under test: a half-edited service must not break the baselines' runs.
"""

from __future__ import annotations

import time

import jwt

from bench.plan import ORGANIZATION

# Longer than any run: endpoint-broker closes a connection when its token expires.
TOKEN_TTL_SECONDS = 6 * 3600


def mint(secret: str, user_id: str, organization_id: str = ORGANIZATION,
         roles: tuple[str, ...] = ("ROLE_USER",)) -> str:
    now = int(time.time())
    claims = {
        "sub": user_id,
        "userId": user_id,
        "organization_id": organization_id,
        "authorities": list(roles),
        "iat": now,
        "exp": now + TOKEN_TTL_SECONDS,
    }
    return jwt.encode(claims, secret, algorithm="HS256")
