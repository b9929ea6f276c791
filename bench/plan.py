"""Who the benchmark's endpoints are: users, endpoint ids and topics, the same in every process.

The parent and every generator worker compute the plan from `n` (and the
layout flag) alone, so no list of 10k ids ever crosses a pipe. User `u` owns
`1 + u % 3` endpoints, so each sendEvent targets one user with 1 to 3 endpoints
(2 on average); with `one_per_user` (the issue-13 profile) every user owns one
endpoint, so every endpoint has its own token.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

ORGANIZATION = "bench-org"
# The HTTP load calls sendEvent with this user's token: same organisation, a normal user.
SENDER = "bench-sender"


class TopicStyle(StrEnum):
    # endpoint-broker and the lean stack: each endpoint subscribes to its own topic.
    ENDPOINT = "endpoint"
    # The DIY stacks: every endpoint of user U subscribes to `user/U`; one publish, the broker fans out.
    USER = "user"


@dataclass(frozen=True, slots=True)
class Endpoint:
    index: int
    user_id: str
    endpoint_id: str


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    endpoints: int


def endpoints_per_user(user_number: int, one_per_user: bool = False) -> int:
    return 1 if one_per_user else 1 + user_number % 3


def plan(n: int, one_per_user: bool = False) -> tuple[list[User], list[Endpoint]]:
    """The first `n` endpoints and their users (the last user may be cut short)."""
    users: list[User] = []
    endpoints: list[Endpoint] = []
    user_number = 0
    while len(endpoints) < n:
        user_id = f"user-{user_number:06d}"
        count = min(endpoints_per_user(user_number, one_per_user), n - len(endpoints))
        for _ in range(count):
            index = len(endpoints)
            endpoints.append(Endpoint(index, user_id, f"ep-{index:06d}"))
        users.append(User(user_id, count))
        user_number += 1
    return users, endpoints


def topic(style: TopicStyle, endpoint: Endpoint) -> str:
    if style is TopicStyle.ENDPOINT:
        return f"users/endpoints/{endpoint.endpoint_id}"
    return user_topic(endpoint.user_id)


def user_topic(user_id: str) -> str:
    return f"user/{user_id}"
