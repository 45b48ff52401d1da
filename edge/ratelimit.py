"""Token-bucket rate limits per API key and per client IP.

A bucket holds at most ``burst`` tokens and refills at ``rate_per_s``; a request costs ``cost``
tokens (1 by default; heavier endpoints may charge more, as Binance's request weights do).

Which bucket pays:
- an authenticated request pays its API key's bucket (only after the signature verified, so nobody
  can drain a victim's bucket by sending garbage under the victim's key);
- anything else (public market data, unknown keys, failed auth) pays the client IP's bucket, so
  brute force and key-guessing are throttled per source. :meth:`EdgeRateLimiter.ip_blocked` lets the
  app refuse an IP whose bucket is already empty before spending CPU on a signature.

Limits are per edge process (in memory, O(1) per request, no I/O on the hot path). With N replicas
behind a balancer a client gets up to N times the limit unless the balancer routes by key; see
docs/security.md.

``ratelimit_drops_total`` is labelled only by ``scope`` (key | ip): a per-key or per-IP label would
create one time series per client and let an attacker blow up the metrics store. Offenders are
found from the edge's structured logs instead.

The same bucket also serves the per-symbol order throttle (``edge.throttle``, scope ``symbol``),
which counts its refusals in its own per-symbol metric (symbols are a short, operator-made list).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from prometheus_client import Counter

from edge.errors import SpotexError
from spotex.config import EdgeSection

__all__ = ["EdgeRateLimiter", "RateDecision", "TokenBucketLimiter"]

Scope = Literal["key", "ip", "symbol"]

RATELIMIT_DROPS = Counter("ratelimit_drops", "Requests refused by a rate limit", ["scope"])


@dataclass(frozen=True, slots=True)
class RateDecision:
    """The outcome of one charge, with what the HTTP headers need (integer seconds)."""

    allowed: bool
    scope: Scope
    limit: int  # bucket capacity (burst)
    remaining: int  # whole tokens left after this request
    reset_s: int  # seconds until the bucket is full again
    retry_after_s: int | None  # on denial: seconds until this request would be allowed

    def headers(self) -> dict[str, str]:
        """``RateLimit-Limit``, ``RateLimit-Remaining``, ``RateLimit-Reset`` and, when denied,
        ``Retry-After``."""
        h = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
        }
        if not self.allowed and self.retry_after_s is not None:
            h["Retry-After"] = str(self.retry_after_s)
        return h

    def raise_if_denied(self) -> None:
        """Raise RATE_LIMITED (429) with the headers when the request was refused."""
        if not self.allowed:
            raise SpotexError("RATE_LIMITED", detail=f"{self.scope} rate limit exceeded; retry after "
                              f"{self.retry_after_s} s", headers=self.headers())


class TokenBucketLimiter:
    """Buckets keyed by an arbitrary string, created full on first use.

    Memory is bounded by ``max_buckets``: when it is exceeded the least recently used buckets are
    dropped. A dropped bucket comes back full, which only ever favours that client, so the bound
    must comfortably exceed the number of clients active within one refill period.
    """

    def __init__(self, rate_per_s: float, burst: int, *, scope: Scope, max_buckets: int = 100_000,
                 clock: Callable[[], float] = time.monotonic, count_drops: bool = True) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate = float(rate_per_s)
        self.burst = int(burst)
        self.scope: Scope = scope
        self.count_drops = count_drops
        self.max_buckets = max_buckets
        self._clock = clock
        # key -> (tokens, last refill time); insertion order = least recently used first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, key: str, now: float) -> float:
        b = self._buckets.get(key)
        if b is None:
            return float(self.burst)
        tokens, last = b
        return min(float(self.burst), tokens + max(0.0, now - last) * self.rate)

    def _decision(self, allowed: bool, tokens: float, cost: int) -> RateDecision:
        missing_full = self.burst - tokens
        reset = math.ceil(missing_full / self.rate) if missing_full > 1e-9 else 0
        retry = None
        if not allowed:
            retry = max(1, math.ceil((cost - tokens) / self.rate)) if cost <= self.burst else None
        return RateDecision(allowed, self.scope, self.burst, max(0, math.floor(tokens + 1e-9)), reset, retry)

    def take(self, key: str, cost: int = 1) -> RateDecision:
        """Charge ``cost`` tokens to ``key``'s bucket if it has them."""
        if cost < 1:
            raise ValueError("cost must be >= 1")
        now = self._clock()
        tokens = self._tokens(key, now)
        allowed = tokens + 1e-9 >= cost
        if allowed:
            tokens -= cost
        elif self.count_drops:
            RATELIMIT_DROPS.labels(self.scope).inc()
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)
        return self._decision(allowed, tokens, cost)

    def retune(self, rate_per_s: float, burst: int) -> None:
        """Change the rate and capacity in place. Buckets keep what they hold (capped at the new
        capacity), so tightening takes effect at once and a change never hands out a fresh burst."""
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        now = self._clock()
        for key in list(self._buckets):
            self._buckets[key] = (min(float(burst), self._tokens(key, now)), now)
        self.rate = float(rate_per_s)
        self.burst = int(burst)

    def peek(self, key: str, cost: int = 1) -> RateDecision:
        """What :meth:`take` would decide, without charging or counting a drop."""
        tokens = self._tokens(key, self._clock())
        return self._decision(tokens + 1e-9 >= cost, tokens, cost)


class EdgeRateLimiter:
    """The edge's two limiters: per API key (authenticated) and per IP (everything else)."""

    def __init__(self, *, key_rate_per_s: float, key_burst: int, ip_rate_per_s: float, ip_burst: int,
                 max_buckets: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_key = TokenBucketLimiter(key_rate_per_s, key_burst, scope="key", max_buckets=max_buckets, clock=clock)
        self.per_ip = TokenBucketLimiter(ip_rate_per_s, ip_burst, scope="ip", max_buckets=max_buckets, clock=clock)

    @classmethod
    def from_config(cls, edge: EdgeSection, *, clock: Callable[[], float] = time.monotonic) -> EdgeRateLimiter:
        # The config has no separate IP burst: allow two seconds' worth, at least 1.
        return cls(key_rate_per_s=edge.rate_limit_per_s, key_burst=edge.rate_limit_burst,
                   ip_rate_per_s=edge.ip_rate_limit_per_s, ip_burst=max(1, 2 * edge.ip_rate_limit_per_s), clock=clock)

    def check(self, *, ip: str, api_key: str | None = None, cost: int = 1) -> RateDecision:
        """Charge the verified ``api_key``'s bucket, or the ``ip``'s when there is no verified key."""
        if api_key is not None:
            return self.per_key.take(api_key, cost)
        return self.per_ip.take(ip, cost)

    def ip_blocked(self, ip: str) -> RateDecision | None:
        """A denial (without charging) when ``ip``'s bucket is already empty, else None. Call it
        before verifying a signature so a flood of bad requests from one IP costs no crypto."""
        d = self.per_ip.peek(ip)
        if d.allowed:
            return None
        RATELIMIT_DROPS.labels("ip").inc()
        return d
