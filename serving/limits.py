"""Per-key rate limit and per-stage in-flight bound.

Both are a few lines over the event loop's single thread (no locks needed), so
a library (e.g. slowapi, which wraps limits + Redis) would add a dependency and
a store for what a dict of token buckets does here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from serving.errors import Overloaded, RateLimited


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Token bucket per API key id (or client address): ``rate`` requests/s sustained, ``burst`` at once.

    At most ``max_keys`` buckets are kept: past that, buckets that have refilled
    (the same as a new one) go first, then the oldest, so callers who invent
    keys (client addresses) cannot grow it without bound.
    """

    def __init__(self, rate: float, burst: int, *, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}

    def check(self, key_id: str, cost: float = 1.0, *, charge: bool = True) -> None:
        """Take ``cost`` tokens or raise :class:`RateLimited`; ``charge=False`` only checks they are there."""
        now = time.monotonic()
        bucket = self._buckets.get(key_id)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._prune(now)
            bucket = self._buckets[key_id] = _Bucket(tokens=float(self.burst), stamp=now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        if bucket.tokens < cost:
            wait = math.ceil((cost - bucket.tokens) / self.rate) if self.rate > 0 else 60
            raise RateLimited(
                f"rate limit of {self.rate:g} requests/s for key '{key_id}' exceeded; retry in {wait} s",
                retry_after_s=max(1, wait),
            )
        if charge:
            bucket.tokens -= cost

    def _prune(self, now: float) -> None:
        for key in [
            k for k, b in self._buckets.items() if b.tokens + (now - b.stamp) * self.rate >= self.burst
        ]:
            del self._buckets[key]
        while len(self._buckets) >= self.max_keys:
            del self._buckets[next(iter(self._buckets))]


class InflightGate:
    """Refuses work beyond ``limit`` concurrent inferences per stage instead of queueing without bound."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.current: dict[str, int] = {}

    @contextmanager
    def enter(self, stage: str, weight: int = 1, *, share: float = 1.0) -> Iterator[None]:
        """One more inference of ``stage`` in flight, or :class:`Overloaded`.

        ``share``: enter only while the stage is below that fraction of its limit. Mirrored work
        (a shadow, the canary's production mirror) uses half, so it never takes the slots a real
        request would have had near the limit.
        """
        now = self.current.get(stage, 0)
        if now + weight > self.limit * share:
            raise Overloaded(
                f"stage '{stage}' has {now} requests in flight (limit {self.limit}); retry later",
                retry_after_s=self.retry_after_s,
            )
        self.current[stage] = now + weight
        try:
            yield
        finally:
            self.current[stage] -= weight
