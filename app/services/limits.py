"""Rate limits: per principal, and on failed authentications per source address. No HTTP here.

The counting is the `limits` library's (moving windows: exact, a list of timestamps per key): in
this process's memory by default, or in Redis when PIIVAULT_REDIS_URL is set, so that every
replica shares them. When Redis fails, the vault keeps serving (fail open to per-process
counters, with a warning line and a metric) rather than refusing every request: a rate limit
protects the vault's capacity, and losing the shared counters only makes it per replica for a
while; it never grants data access, which stays with the grant check.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import cast

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.errors import StorageError
from limits.storage import MemoryStorage, RedisStorage
from limits.storage.base import MovingWindowSupport
from limits.strategies import MovingWindowRateLimiter

from app.db.repositories.data_path import EventRow
from app.errors import RateLimited
from app.metrics import AUTH_FAILURES_AGGREGATED, RATE_LIMIT_FALLBACK, RATE_LIMITED
from app.services.audit.events import new_event_id
from app.services.context import utcnow

log = logging.getLogger(__name__)

NAMESPACE = "piivault"
# After a Redis failure, counters stay in this process for this long before Redis is tried again:
# a Redis that is down costs one timeout per process per period, not one per request.
REDIS_RETRY_S = 5.0
# Failed authentications being counted at once (distinct key id, source and reason); beyond it,
# failures are written one by one again rather than held in an ever-growing table.
MAX_PENDING_AGGREGATES = 10_000


class MemoryCounts(MemoryStorage):
    """limits' in-process storage, expiring old entries every second rather than 10 ms after a
    hit. Its expiry runs in a timer thread started anew each time the last one has ended, so at
    10 ms a thread start sat on the request path about every tenth request under load (0.2 ms
    of CPU a detokenize, measured). A hit never depends on the expiry (the moving window
    compares timestamps); the expiry only bounds the memory that old entries hold.

    The hook is limits' private `__schedule_expiry` (limits is pinned in requirements.lock;
    test_limits fails if a new version stops calling it)."""

    expiry_interval_s = 1.0

    def __init__(self) -> None:
        super().__init__()
        # Whether the timer runs is asked at most once per interval (is_alive takes a lock).
        self._next_expiry_check = 0.0

    def _MemoryStorage__schedule_expiry(self) -> None:
        now = time.monotonic()
        if now < self._next_expiry_check:
            return
        self._next_expiry_check = now + self.expiry_interval_s
        if not self.timer.is_alive():
            expire = getattr(self, "_MemoryStorage__expire_events")  # noqa: B009 (a mangled name)
            self.timer = threading.Timer(self.expiry_interval_s, expire)
            self.timer.daemon = True
            self.timer.start()


@lru_cache(maxsize=1024)
def principal_item(rps: int, burst: int) -> RateLimitItem:
    """`burst` requests in any window of burst / rps seconds (rounded up to whole seconds, as the
    library counts): a full burst at once, then `rps` a second on average."""
    return RateLimitItemPerSecond(burst, max(1, math.ceil(burst / rps)), namespace=NAMESPACE)


class Counters:
    """Hits on `limits` items, in Redis when configured, else (or while Redis fails) in memory."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        timeout_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._memory = MovingWindowRateLimiter(MemoryCounts())
        self._shared: MovingWindowRateLimiter | None = None
        if redis_url:
            storage = RedisStorage(
                redis_url,
                wrap_exceptions=True,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                health_check_interval=30,
            )
            self._shared = MovingWindowRateLimiter(storage)
        self._clock = clock
        self._shared_down_until = 0.0

    @property
    def shared(self) -> bool:
        """Whether the counters are shared across replicas (Redis configured)."""
        return self._shared is not None

    def _limiter(self) -> MovingWindowRateLimiter:
        if self._shared is not None and self._clock() >= self._shared_down_until:
            return self._shared
        return self._memory

    def _fell_back(self, err: StorageError) -> None:
        self._shared_down_until = self._clock() + REDIS_RETRY_S
        RATE_LIMIT_FALLBACK.inc()
        log.warning(
            "rate-limit storage (Redis) failed (%s); counting in this process for %.0f s",
            type(err.storage_error).__name__,
            REDIS_RETRY_S,
        )

    def hit(self, item: RateLimitItem, kind: str, identifier: str | uuid.UUID) -> int | None:
        """Count one request; None if allowed, else the seconds to wait (Retry-After)."""
        limiter = self._limiter()
        key = _key(item, kind, identifier)
        try:
            # MovingWindowRateLimiter.hit itself, with the key built once per item and identifier.
            if cast(MovingWindowSupport, limiter.storage).acquire_entry(key, item.amount, item.get_expiry()):
                return None
            return _retry_after(limiter, item, (kind, str(identifier)))
        except StorageError as err:
            self._fell_back(err)
            return self.hit(item, kind, identifier)

    def reset(self) -> None:
        """Forget every count (tests; an operator clearing a block)."""
        for limiter in (self._memory, self._shared):
            if limiter is not None:
                try:
                    limiter.storage.reset()
                except StorageError as err:
                    self._fell_back(err)


@lru_cache(maxsize=4096)
def _key(item: RateLimitItem, kind: str, identifier: str | uuid.UUID) -> str:
    """limits' key for a hit, as MovingWindowRateLimiter.hit builds it on every call."""
    return item.key_for(kind, str(identifier))


def _retry_after(limiter: MovingWindowRateLimiter, item: RateLimitItem, identifiers: tuple[str, ...]) -> int:
    # Only on a refusal: one more read of the window.
    reset_at = limiter.get_window_stats(item, *identifiers).reset_time
    return max(1, math.ceil(reset_at - time.time()))


class PrincipalLimits:
    """Requests per principal: the vault's defaults, or the principal's own setting."""

    def __init__(self, counters: Counters, default_rps: int, default_burst: int) -> None:
        self._counters = counters
        self._default = (default_rps, default_burst)

    def check(self, principal_id: uuid.UUID, rps: int | None = None, burst: int | None = None) -> None:
        """Count one request of the principal; RateLimited if over its limit. Not audited: a
        refusal row per request would be the amplification the limit is there to stop."""
        if rps is None or burst is None:
            rps, burst = self._default
        retry_after = self._counters.hit(principal_item(rps, burst), "principal", principal_id)
        if retry_after is not None:
            RATE_LIMITED.labels("principal").inc()
            raise RateLimited(retry_after, "this principal's request rate is over its limit")


class LookupLimits:
    """Lookups by value per principal: an equality oracle, so held to `rate_per_s` a second (a
    window of one second), counted apart from the principal's general rate."""

    def __init__(self, counters: Counters, rate_per_s: int) -> None:
        self._counters = counters
        self._item = RateLimitItemPerSecond(rate_per_s, 1, namespace=NAMESPACE)

    def check(self, principal_id: uuid.UUID) -> None:
        """Count one lookup; RateLimited if over the rate. Not audited (as PrincipalLimits)."""
        retry_after = self._counters.hit(self._item, "lookup", principal_id)
        if retry_after is not None:
            RATE_LIMITED.labels("lookup").inc()
            raise RateLimited(retry_after, "this principal's lookup rate is over its limit")


@dataclass
class _Pending:
    """Repeats of one failure (key id, source, reason) since its first was written."""

    first_at: float
    latest: EventRow
    count: int = 0


class FailedAuthentications:
    """Failed authentications per source address: counted (shared across replicas with Redis),
    and refused (429) without a lookup once a source is over its limit for the window.

    Audit: the first failure of a key id, source and reason in a window is an event of its own;
    the repeats are counted in this process and written as one event with `repeat_count` when the
    window ends (`flush`, run in the background). So a flood writes a bounded number of rows and
    log lines, and the trail still says how many attempts there were."""

    def __init__(
        self,
        counters: Counters,
        limit: int,
        window_s: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._counters = counters
        self._item = RateLimitItemPerSecond(limit, window_s, namespace=NAMESPACE)
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[tuple[str | None, str | None, str | None], _Pending] = {}
        # Windows that ended between two flushes (a new failure started the next one).
        self._ended: list[_Pending] = []
        # Sources over their limit, and until when (this process's clock).
        self._blocked: dict[str, float] = {}

    def refuse_if_over(self, source: str | None) -> None:
        """RateLimited if this source has failed too often within the window. A dict lookup: the
        shared counters are consulted only when a failure is counted, never on the way in."""
        until = self._blocked.get(source or "-")
        if until is None:
            return
        left = until - self._clock()
        if left > 0:
            RATE_LIMITED.labels("auth_failures").inc()
            raise RateLimited(math.ceil(left), "too many failed authentications from this address")
        self._blocked.pop(source or "-", None)

    def failed(self, event: EventRow) -> bool:
        """Count a failed authentication (its denied Authenticate event); True if the event is to
        be written now, False if it was counted into the pending aggregate."""
        if event.reason != "rate_limited":
            source = event.source_ip or "-"
            retry_after = self._counters.hit(self._item, "auth-failures", source)
            if retry_after is not None:
                # Over the (shared) count: this replica refuses the source until the window says.
                self._block(source, retry_after)
        key = (event.target_id, event.source_ip, event.reason)
        now = self._clock()
        with self._lock:
            pending = self._pending.get(key)
            if pending is not None and now - pending.first_at < self._window_s:
                pending.count += 1
                pending.latest = event
                AUTH_FAILURES_AGGREGATED.inc()
                return False
            if len(self._pending) >= MAX_PENDING_AGGREGATES:
                return True
            if pending is not None and pending.count:
                # Its window ended and no flush has run yet: this one starts the next window.
                self._ended.append(pending)
            self._pending[key] = _Pending(now, event)
            return True

    def _block(self, source: str, retry_after: int) -> None:
        now = self._clock()
        with self._lock:
            if len(self._blocked) >= MAX_PENDING_AGGREGATES:
                # Forget the blocks that have ended; if none has, the table is full of live ones.
                for ended in [key for key, until in self._blocked.items() if until <= now]:
                    del self._blocked[ended]
            self._blocked[source] = now + retry_after

    def flush(self, everything: bool = False) -> list[EventRow]:
        """The aggregate events of the windows that have ended (every pending one if
        `everything`), each standing for its repeats; the caller writes them."""
        now = self._clock()
        with self._lock:
            ended, self._ended = self._ended, []
            for key, pending in list(self._pending.items()):
                if everything or now - pending.first_at >= self._window_s:
                    del self._pending[key]
                    if pending.count:
                        ended.append(pending)
        return [_aggregate(pending) for pending in ended]


def _aggregate(pending: _Pending) -> EventRow:
    """The latest repeat's event (its request id, user agent), as a new event with the count."""
    return replace(
        pending.latest,
        event_id=new_event_id(),
        time=utcnow(),
        repeat_count=pending.count,
        key_version=None,
        event_mac=None,
    )
