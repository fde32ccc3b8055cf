"""Rate limits (hub.api.ratelimit) over real HTTP, on both counter storages.

Every limit test runs twice: counters in process memory (no REDIS_URL) and in the Redis
at 127.0.0.1:6379 db 15 under a key prefix unique to the run. Redis runs in CI, so a
Redis that is down fails these tests rather than skipping them.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
import redis
import uvicorn
from conftest import _free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from hub.api.app import create_app
from hub.api.ratelimit import Limiter, add_rate_limits
from hub.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/15"
FHIR_JSON = "application/fhir+json"


class Server:
    """uvicorn on a free port in a thread, serving the given ASGI app."""

    def __init__(self, app: Any) -> None:
        self.port = _free_port()
        self.origin = f"http://127.0.0.1:{self.port}"
        # As `hub serve` runs it: the hub, not uvicorn, decides whose X-Forwarded-For counts.
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", proxy_headers=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> httpx.Client:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.client = httpx.Client(base_url=self.origin, timeout=30)
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(params=["memory", "redis"])
def storage(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """Settings that select one counter storage; Redis keys are removed afterwards."""
    if request.param == "memory":
        yield {"redis_url": None}
        return
    prefix = f"hub-test-{uuid.uuid4().hex[:12]}"
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    client.ping()  # Redis down: fail here, loudly, not skip
    try:
        yield {"redis_url": REDIS_URL, "rate_limit_key_prefix": prefix}
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


def hub(database_url: str, **overrides: Any) -> Server:
    settings = Settings(
        database_url=database_url,
        auth_required=False,
        **{"rate_limit_per_ip": "1000/hour", "rate_limit_per_token": "1000/hour", **overrides},
    )
    return Server(create_app(settings))


def assert_throttled_outcome(response: httpx.Response, limit: int) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"].startswith(FHIR_JSON)
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert [issue["code"] for issue in outcome["issue"]] == ["throttled"]
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["ratelimit-limit"] == str(limit)
    assert response.headers["ratelimit-remaining"] == "0"
    assert int(response.headers["ratelimit-reset"]) >= 1


# "/hour" limits throughout: a test never runs long enough for a window to slide noticeably.


def test_per_ip_limit_answers_429_with_operation_outcome(database_url: str, storage: dict[str, Any]) -> None:
    with hub(database_url, rate_limit_per_ip="5/hour", **storage) as http:
        remaining = []
        for _ in range(5):
            response = http.get("/fhir/metadata")
            assert response.status_code == 200, response.text
            assert response.headers["ratelimit-limit"] == "5"
            remaining.append(int(response.headers["ratelimit-remaining"]))
        assert remaining == [4, 3, 2, 1, 0]
        assert_throttled_outcome(http.get("/fhir/metadata"), 5)
        # Every path counts, not only FHIR ones, and keeps answering 429.
        assert_throttled_outcome(http.get("/fhir/Patient"), 5)
        assert http.get("/anything-else").status_code == 429
        # Health probes are exempt.
        assert http.get("/healthz").status_code == 200

    if storage["redis_url"]:
        # The counters really are in Redis, under this run's prefix.
        client = redis.Redis.from_url(REDIS_URL)
        assert list(client.scan_iter(match=f"{storage['rate_limit_key_prefix']}*"))
        client.close()


def test_per_token_limits_are_separate_per_token(database_url: str, storage: dict[str, Any]) -> None:
    with hub(database_url, rate_limit_per_token="3/hour", **storage) as http:
        alice = {"Authorization": "Bearer token-of-alice"}
        bob = {"Authorization": "bearer token-of-bob"}  # the scheme is case-insensitive
        for _ in range(3):
            assert http.get("/fhir/metadata", headers=alice).status_code != 429
        assert_throttled_outcome(http.get("/fhir/metadata", headers=alice), 3)
        # Another token, and no token at all, still have their own allowances.
        for _ in range(3):
            assert http.get("/fhir/metadata", headers=bob).status_code != 429
        assert http.get("/fhir/metadata").status_code == 200
        assert http.get("/fhir/metadata", headers=bob).status_code == 429


def test_requests_refused_by_auth_still_spend_the_ip_allowance(database_url: str) -> None:
    settings = Settings(database_url=database_url, auth_required=True, rate_limit_per_ip="3/hour")
    with Server(create_app(settings)) as http:
        for _ in range(3):
            assert http.get("/fhir/Patient").status_code != 429
        assert_throttled_outcome(http.get("/fhir/Patient"), 3)


def test_login_limit_per_ip_and_per_user_name(database_url: str, storage: dict[str, Any]) -> None:
    # Trusting the local peer as a proxy lets one test client speak for many IPs.
    with hub(database_url, rate_limit_login="3/hour", trusted_proxies=["127.0.0.1"], **storage) as http:

        def login(username: str, ip: str) -> httpx.Response:
            return http.post(
                "/auth/token",
                data={"grant_type": "password", "username": username, "password": "guess"},
                headers={"X-Forwarded-For": ip},
            )

        # One user name tried from many addresses: the fourth guess is refused.
        for n in range(3):
            assert login("Lan.Nguyen", f"203.0.113.{n}").status_code != 429
        refused = login("lan.nguyen ", "203.0.113.99")  # case and spaces do not make a new name
        assert refused.status_code == 429
        assert refused.headers["content-type"].startswith("application/json")
        assert refused.json()["error"] == "temporarily_unavailable"
        assert refused.headers["cache-control"] == "no-store"
        assert int(refused.headers["retry-after"]) >= 1

        # One address trying many user names: the fourth name is refused.
        for n in range(3):
            assert login(f"user{n}", "198.51.100.7").status_code != 429
        assert login("user-new", "198.51.100.7").status_code == 429

        # A client_id sent as HTTP Basic is a user name too.
        for n in range(3):
            basic = http.post(
                "/auth/token",
                data={"grant_type": "client_credentials"},
                auth=("his-connector", "wrong"),
                headers={"X-Forwarded-For": f"192.0.2.{n}"},
            )
            assert basic.status_code != 429
        assert login("his-connector", "192.0.2.200").status_code == 429

        # The login limit is for logins only: other requests from that address pass.
        ordinary = http.get("/fhir/metadata", headers={"X-Forwarded-For": "198.51.100.7"})
        assert ordinary.status_code == 200


def test_forwarded_for_is_believed_only_from_trusted_proxies(database_url: str) -> None:
    spoofed = [{"X-Forwarded-For": f"192.0.2.{n}"} for n in range(3)]
    with hub(database_url, rate_limit_per_ip="2/hour") as http:
        assert [http.get("/fhir/metadata", headers=h).status_code for h in spoofed] == [200, 200, 429]
    with hub(database_url, rate_limit_per_ip="2/hour", trusted_proxies=["127.0.0.0/8"]) as http:
        assert [http.get("/fhir/metadata", headers=h).status_code for h in spoofed] == [200, 200, 200]
        assert http.get("/fhir/metadata", headers=spoofed[0]).status_code == 200
        assert http.get("/fhir/metadata", headers=spoofed[0]).status_code == 429


def test_redis_down_fails_open(database_url: str) -> None:
    nobody_listens = f"redis://127.0.0.1:{_free_port()}/0"
    with hub(database_url, rate_limit_per_ip="2/hour", redis_url=nobody_listens) as http:
        statuses = [http.get("/fhir/metadata").status_code for _ in range(5)]
    assert statuses == [200] * 5


def test_storage_follows_redis_url() -> None:
    assert Limiter(Settings(redis_url=None)).backend == "memory"
    assert Limiter(Settings(redis_url=REDIS_URL)).backend == "redis"
    with pytest.raises(ValueError):
        Limiter(Settings(redis_url=None, rate_limit_per_ip="lots"))


def test_login_body_reaches_the_application_intact() -> None:
    """The middleware reads the login form to find the user name; the app must still get it."""

    async def token(request: Request) -> JSONResponse:
        return JSONResponse(dict(parse_qsl((await request.body()).decode())))

    app = Starlette(routes=[Route("/auth/token", token, methods=["POST"])])
    add_rate_limits(app, Settings(redis_url=None, rate_limit_login="5/hour"))
    form = {"grant_type": "password", "username": "an", "password": "x" * 40_000}  # past the peek cap
    with Server(app) as http:
        response = http.post("/auth/token", data=form)
        assert response.status_code == 200
        assert response.json() == form
        assert response.headers["ratelimit-limit"] == "5"


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        ("198.51.100.4", "203.0.113.9", [], "198.51.100.4"),
        ("10.0.0.2", "203.0.113.9", ["10.0.0.0/8"], "203.0.113.9"),
        # The client may write anything left of what our proxies appended.
        ("10.0.0.2", "1.2.3.4, 203.0.113.9, 10.0.0.3", ["10.0.0.0/8"], "203.0.113.9"),
        ("10.0.0.2", "not-an-ip", ["10.0.0.0/8"], "10.0.0.2"),
        # IPv6 clients are limited per /64, the usual size of one subscriber's allocation.
        ("2001:db8:1:2:aaaa::1", "", [], "2001:db8:1:2::/64"),
    ],
)
def test_client_ip(peer: str, forwarded: str, trusted: list[str], expected: str) -> None:
    limiter = Limiter(Settings(redis_url=None, trusted_proxies=trusted))
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    assert limiter.client_ip({"client": (peer, 1234), "headers": headers}) == expected
