"""Token buckets per API key and per IP, driven by a fake clock; then the same limits reached over real
HTTP against a real edge: 429 problem+json with RateLimit headers and Retry-After, unknown keys
limited per IP, and the drops counter."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

import httpx
import pytest
from prometheus_client import REGISTRY

from edge.errors import SpotexError, to_problem
from edge.ratelimit import EdgeRateLimiter, TokenBucketLimiter
from spotex.config import EdgeSection
from tests.edge.stackenv import IP_RATE, KEY_BURST, Env


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def drops(scope: str) -> float:
    return REGISTRY.get_sample_value("ratelimit_drops_total", {"scope": scope}) or 0.0


def test_burst_then_refill_with_headers() -> None:
    clk = Clock()
    lim = TokenBucketLimiter(10, 5, scope="key", clock=clk)
    before = drops("key")
    got = [lim.take("k") for _ in range(5)]
    assert all(d.allowed for d in got)
    assert [d.remaining for d in got] == [4, 3, 2, 1, 0]
    assert got[0].headers() == {"RateLimit-Limit": "5", "RateLimit-Remaining": "4", "RateLimit-Reset": "1"}
    denied = lim.take("k")
    assert not denied.allowed and denied.remaining == 0 and denied.retry_after_s == 1
    assert denied.headers()["Retry-After"] == "1" and denied.headers()["RateLimit-Reset"] == "1"
    assert drops("key") == before + 1
    clk.t += 0.1  # one token back
    assert lim.take("k").allowed
    assert not lim.take("k").allowed
    clk.t += 10  # never more than burst
    d = lim.take("k")
    assert d.allowed and d.remaining == 4


def test_retry_after_and_reset_for_slow_rates_and_costs() -> None:
    clk = Clock()
    lim = TokenBucketLimiter(0.5, 2, scope="ip", clock=clk)  # one token per 2 s
    assert lim.take("ip1", cost=2).allowed
    d = lim.take("ip1")
    assert not d.allowed and d.retry_after_s == 2 and d.reset_s == 4
    clk.t += 1.0
    d = lim.take("ip1", cost=2)
    assert not d.allowed and d.retry_after_s == 3  # needs 1.5 more tokens at 0.5/s
    assert lim.take("ip1", cost=3).retry_after_s is None  # can never fit: no Retry-After promise
    with pytest.raises(ValueError):
        lim.take("ip1", cost=0)
    with pytest.raises(ValueError):
        TokenBucketLimiter(0, 1, scope="ip")


def test_keys_are_independent_and_memory_is_bounded() -> None:
    clk = Clock()
    lim = TokenBucketLimiter(1, 1, scope="key", max_buckets=3, clock=clk)
    assert lim.take("a").allowed and not lim.take("a").allowed
    assert lim.take("b").allowed  # a's exhaustion does not touch b
    for k in ("c", "d", "e"):
        lim.take(k)
    assert len(lim) == 3


def test_peek_does_not_charge() -> None:
    lim = TokenBucketLimiter(1, 2, scope="key", clock=Clock())
    assert lim.peek("k").allowed and lim.peek("k").remaining == 2
    lim.take("k")
    lim.take("k")
    assert not lim.peek("k").allowed
    assert lim.peek("k").remaining == 0


def test_edge_limiter_charges_key_or_ip() -> None:
    clk = Clock()
    lim = EdgeRateLimiter(key_rate_per_s=100, key_burst=3, ip_rate_per_s=1, ip_burst=2, clock=clk)
    before_ip, before_key = drops("ip"), drops("key")
    # Verified key: its own bucket, whatever the IP.
    for _ in range(3):
        assert lim.check(ip="10.0.0.1", api_key="K1").allowed
    d = lim.check(ip="10.0.0.1", api_key="K1")
    assert not d.allowed and d.scope == "key"
    # Unauthenticated or failed auth from that IP: the IP bucket, untouched by K1's use.
    assert lim.ip_blocked("10.0.0.1") is None
    assert lim.check(ip="10.0.0.1").allowed
    assert lim.check(ip="10.0.0.1").allowed
    d = lim.check(ip="10.0.0.1")
    assert not d.allowed and d.scope == "ip"
    blocked = lim.ip_blocked("10.0.0.1")
    assert blocked is not None and blocked.retry_after_s == 1
    assert lim.ip_blocked("10.0.0.2") is None
    assert drops("ip") == before_ip + 2 and drops("key") == before_key + 1
    # A verified key from the blocked IP still has its own budget.
    clk.t += 0.05
    assert lim.check(ip="10.0.0.1", api_key="K1").allowed


def test_denial_becomes_a_429_problem_with_headers() -> None:
    lim = TokenBucketLimiter(2, 1, scope="key", clock=Clock())
    lim.take("k").raise_if_denied()
    with pytest.raises(SpotexError) as ei:
        lim.take("k").raise_if_denied()
    exc = ei.value
    assert exc.status == 429 and exc.code == "RATE_LIMITED"
    assert exc.headers == {"RateLimit-Limit": "1", "RateLimit-Remaining": "0", "RateLimit-Reset": "1",
                           "Retry-After": "1"}
    prob = to_problem(exc, "/v1/orders", order_call=True)
    assert prob["status"] == 429 and prob["executionStatus"] == "NOT_EXECUTED"


def test_from_config() -> None:
    lim = EdgeRateLimiter.from_config(EdgeSection(rate_limit_per_s=5, rate_limit_burst=7, ip_rate_limit_per_s=3),
                                      clock=Clock())
    assert lim.per_key.burst == 7 and lim.per_key.rate == 5
    assert lim.per_ip.burst == 6 and lim.per_ip.rate == 3


# --- over real HTTP against a real edge (`spotex up`, tests/edge/stackenv.py: key 20/s burst 40, IP 20/s burst 40) --


def _edge_drops(env: Env, scope: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(env.edge + "/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "ratelimit_drops_total" and s.labels.get("scope") == scope:
                return float(s.value)
    return 0.0


def _until_429(send: Callable[[], httpx.Response], tries: int = 2_000) -> tuple[list[httpx.Response], httpx.Response]:
    """Send until the first 429 (a bucket of 40 refilling at 20/s empties within tries on any machine
    that answers faster than 20 req/s); returns the answers before it and the 429."""
    ok: list[httpx.Response] = []
    for _ in range(tries):
        r = send()
        if r.status_code == 429:
            return ok, r
        ok.append(r)
    raise AssertionError(f"no 429 after {tries} requests: last {ok[-1].status_code} {ok[-1].headers}")


def _assert_429(r: httpx.Response, limit: int) -> None:
    assert r.status_code == 429, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "RATE_LIMITED"
    assert r.headers["ratelimit-limit"] == str(limit)
    assert r.headers["ratelimit-remaining"] == "0"
    assert int(r.headers["retry-after"]) >= 1 and int(r.headers["ratelimit-reset"]) >= 1


@pytest.mark.slow
def test_per_key_limit_over_http(edge_env: Env) -> None:
    k, other = edge_env.key(4201, "read"), edge_env.key(4201, "read")
    before = _edge_drops(edge_env, "key")
    with edge_env.client_from("127.0.0.2") as c:
        ok, denied = _until_429(lambda: edge_env.req(k, "GET", "/v1/account/balances", client=c))
        assert len(ok) >= KEY_BURST - 1 and all(r.status_code == 200 for r in ok)
        # Successful answers carry the key's bucket: limit = burst, remaining counting down.
        assert ok[0].headers["ratelimit-limit"] == str(KEY_BURST)
        assert int(ok[0].headers["ratelimit-remaining"]) > int(ok[-1].headers["ratelimit-remaining"])
        _assert_429(denied, KEY_BURST)
        assert "key rate limit" in denied.json()["detail"]
        more = [edge_env.req(k, "GET", "/v1/account/balances", client=c) for _ in range(5)]
        n429 = 1 + sum(r.status_code == 429 for r in more)
        # Another key of the same account, from the same IP, has its own bucket.
        assert edge_env.req(other, "GET", "/v1/account/balances", client=c).status_code == 200
        # Each refused request is one drop (no double count between the app and the limiter).
        assert _edge_drops(edge_env, "key") == before + n429
        time.sleep(int(denied.headers["retry-after"]))
        assert edge_env.req(k, "GET", "/v1/account/balances", client=c).status_code == 200


@pytest.mark.slow
def test_per_ip_limit_on_public_routes_over_http(edge_env: Env) -> None:
    before = _edge_drops(edge_env, "ip")
    with edge_env.client_from("127.0.0.3") as c:
        ok, denied = _until_429(lambda: c.get(edge_env.edge + "/v1/markets"))
        assert all(r.status_code == 200 for r in ok) and ok[0].headers["ratelimit-limit"] == str(2 * IP_RATE)
        _assert_429(denied, 2 * IP_RATE)
        # The Binance facade shares the IP's bucket and answers Binance's way.
        b = c.get(edge_env.edge + "/api/v3/ping")
        n429 = 1
        if b.status_code == 429:
            n429 += 1
            assert b.json()["code"] == -1003 and int(b.headers["retry-after"]) >= 1
        assert _edge_drops(edge_env, "ip") == before + n429
    # Other sources are unaffected.
    with edge_env.client_from("127.0.0.5") as c:
        assert c.get(edge_env.edge + "/v1/markets").status_code == 200


@pytest.mark.slow
def test_unknown_keys_are_limited_per_ip_over_http(edge_env: Env) -> None:
    fake = {"api_key": "unknownkey" + secrets.token_hex(8), "secret": secrets.token_hex(32)}
    valid = edge_env.key(4202, "read")
    with edge_env.client_from("127.0.0.4") as c:
        ok, denied = _until_429(lambda: edge_env.req(fake, "GET", "/v1/account/balances", client=c))
        assert ok and all(r.status_code == 401 and r.json()["code"] == "AUTH_UNKNOWN_KEY" for r in ok)
        _assert_429(denied, 2 * IP_RATE)
        assert "ip rate limit" in denied.json()["detail"]
        # While the IP's bucket is empty, everything from it is refused before any signature work,
        # a valid key included (docs/security.md section 4). A valid key is charged to its own bucket,
        # not the IP's, so it is served again as soon as the IP's bucket holds a token; the guessing
        # (one unknown key before each try) keeps that bucket at empty, and a valid key sent then is
        # refused with the IP's 429. Every answer is either served or that 429.
        answers = []
        for _ in range(50):
            edge_env.req(fake, "GET", "/v1/account/balances", client=c)
            r = edge_env.req(valid, "GET", "/v1/account/balances", client=c)
            answers.append(r)
            if r.status_code == 429:
                break
        refused = [r for r in answers if r.status_code != 200]
        assert refused, [r.status_code for r in answers]
        assert all(r.status_code == 429 and r.json()["code"] == "RATE_LIMITED" and "ip rate limit" in r.json()["detail"]
                   for r in refused), [r.text for r in refused]
    # The same valid key from another address is served: the guessing did not touch its bucket.
    with edge_env.client_from("127.0.0.6") as c:
        assert edge_env.req(valid, "GET", "/v1/account/balances", client=c).status_code == 200
