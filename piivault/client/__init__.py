"""A Python client for pii-vault, over httpx: `VaultClient` and `AsyncVaultClient`.

    from piivault.client import VaultClient

    with VaultClient("http://127.0.0.1:8000", api_key=key) as vault:
        token = vault.tokenize(customer_id="12345", data_type="DriverLicense", value="D1234").token
        print(vault.detokenize(token, reason="loan 991").value)

- Every failure is a VaultError subclass, one per error code (`GrantRequired`, `NotFound`, ...),
  carrying `code`, `status`, `retryable`, `field` and `request_id`.
- 503 and 429 answers, a key still in flight (409) and connections that fail or time out are
  retried with backoff, waiting what `Retry-After` says. Each tokenize (single or batch) sends an
  `Idempotency-Key` made for that call and the same on its retries, so a retry after a lost
  answer never stores twice.
- Batches are split at the server's maximum (`GET /v1/limits`); items that failed retryably are
  sent again as a new batch under a new key. Batch calls return one result per item, in order:
  the item's result, or its VaultError (not raised).
- Timeouts by default (10 s, 5 s to connect). Close the client, or use it as a context manager.

`lookup`, `erase` and `erase_customer` are thin: they call `POST /v1/tokens/lookup`,
`DELETE /v1/tokens/{token}` and `POST /v1/customers/{id}/erase`, which a vault without those
features answers with NotFound or MethodNotAllowed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx

from piivault.client import errors
from piivault.client._flows import (
    DEFAULT_TIMEOUT,
    RETRIED_TRANSPORT_ERRORS,
    Call,
    Core,
    Flow,
    Pause,
    RetryPolicy,
)
from piivault.client.errors import *  # noqa: F403 (every error class, by name)
from piivault.client.errors import VaultError
from piivault.client.models import Erasure, Limits, Match, Revealed, Tokenized, TokenizeItem

__all__ = [
    "AsyncVaultClient",
    "Erasure",
    "Limits",
    "Match",
    "RetryPolicy",
    "Revealed",
    "TokenizeItem",
    "Tokenized",
    "VaultClient",
]
__all__ += errors.__all__

T = TypeVar("T")
_USER_AGENT = "piivault-client/1"


def _settings(
    max_retries: int, backoff_s: float, max_backoff_s: float, retry: RetryPolicy | None
) -> RetryPolicy:
    return retry or RetryPolicy(max_retries=max_retries, backoff_s=backoff_s, max_backoff_s=max_backoff_s)


class VaultClient:
    """The vault, synchronously. `http_client`: an httpx.Client of your own (proxies, TLS, a test
    transport); it is then yours to close."""

    _sleep: Callable[[float], None] = staticmethod(time.sleep)

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        max_retries: int = 3,
        backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
        retry: RetryPolicy | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        self._core = Core(base_url, api_key, _settings(max_retries, backoff_s, max_backoff_s, retry))
        self._owned = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout, headers={"User-Agent": _USER_AGENT})

    def __repr__(self) -> str:
        return f"VaultClient({self._core.base_url!r})"

    def __enter__(self) -> VaultClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:
            self._http.close()

    def _send(self, call: Call) -> Any:
        retry = self._core.retry
        for attempt in range(retry.max_retries + 1):
            retry_after: str | None = None
            try:
                response = self._http.request(**self._core.request_args(call))
            except RETRIED_TRANSPORT_ERRORS as err:
                outcome: Any = self._core.connection_failed(err)
            else:
                outcome = self._core.outcome(response)
                retry_after = response.headers.get("Retry-After")
            if not isinstance(outcome, VaultError):
                return outcome
            if not outcome.retryable or attempt == retry.max_retries:
                raise outcome
            self._sleep(retry.delay(attempt, retry_after))
        raise AssertionError("unreachable")  # pragma: no cover

    def _run(self, flow: Flow[T]) -> T:
        try:
            step = next(flow)
            while True:
                if isinstance(step, Pause):
                    self._sleep(step.seconds)
                    step = flow.send(None)
                    continue
                try:
                    result = self._send(step)
                except VaultError as err:
                    step = flow.throw(err)
                else:
                    step = flow.send(result)
        except StopIteration as done:
            value: T = done.value
            return value
        finally:
            flow.close()

    def limits(self) -> Limits:
        return self._run(self._core.limits())

    def tokenize(
        self, *, customer_id: str, data_type: str, value: str, deduplicate: bool = False
    ) -> Tokenized:
        """With deduplicate=True (needs a Lookup grant too), the customer's existing record of
        this value comes back (`.deduplicated`) and nothing is stored."""
        return self._run(self._core.tokenize(customer_id, data_type, value, deduplicate))

    def tokenize_batch(
        self, items: Sequence[TokenizeItem | Mapping[str, str]]
    ) -> list[Tokenized | VaultError]:
        return self._run(self._core.tokenize_batch(items))

    def detokenize(self, token: str, *, reason: str | None = None, reveal: str | None = None) -> Revealed:
        return self._run(self._core.detokenize(token, reason=reason, reveal=reveal))

    def detokenize_batch(
        self, tokens: Sequence[str], *, reason: str | None = None, reveal: str | None = None
    ) -> list[Revealed | VaultError]:
        return self._run(self._core.detokenize_batch(tokens, reason=reason, reveal=reveal))

    def lookup(self, *, data_type: str, value: str, customer_id: str | None = None) -> list[Match]:
        return self._run(self._core.lookup(data_type, value, customer_id))

    def erase(self, token: str, *, reason: str | None = None) -> None:
        self._run(self._core.erase(token, reason=reason))

    def erase_customer(
        self, customer_id: str, *, reason: str, data_types: Sequence[str] | None = None
    ) -> Erasure:
        return self._run(self._core.erase_customer(customer_id, reason=reason, data_types=data_types))


class AsyncVaultClient:
    """The vault, for asyncio: the same calls as VaultClient, awaited."""

    _sleep: Callable[[float], Any] = staticmethod(asyncio.sleep)

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        max_retries: int = 3,
        backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
        retry: RetryPolicy | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self._core = Core(base_url, api_key, _settings(max_retries, backoff_s, max_backoff_s, retry))
        self._owned = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout, headers={"User-Agent": _USER_AGENT})

    def __repr__(self) -> str:
        return f"AsyncVaultClient({self._core.base_url!r})"

    async def __aenter__(self) -> AsyncVaultClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owned:
            await self._http.aclose()

    async def _send(self, call: Call) -> Any:
        retry = self._core.retry
        for attempt in range(retry.max_retries + 1):
            retry_after: str | None = None
            try:
                response = await self._http.request(**self._core.request_args(call))
            except RETRIED_TRANSPORT_ERRORS as err:
                outcome: Any = self._core.connection_failed(err)
            else:
                outcome = self._core.outcome(response)
                retry_after = response.headers.get("Retry-After")
            if not isinstance(outcome, VaultError):
                return outcome
            if not outcome.retryable or attempt == retry.max_retries:
                raise outcome
            await self._sleep(retry.delay(attempt, retry_after))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _run(self, flow: Flow[T]) -> T:
        try:
            step = next(flow)
            while True:
                if isinstance(step, Pause):
                    await self._sleep(step.seconds)
                    step = flow.send(None)
                    continue
                try:
                    result = await self._send(step)
                except VaultError as err:
                    step = flow.throw(err)
                else:
                    step = flow.send(result)
        except StopIteration as done:
            value: T = done.value
            return value
        finally:
            flow.close()

    async def limits(self) -> Limits:
        return await self._run(self._core.limits())

    async def tokenize(
        self, *, customer_id: str, data_type: str, value: str, deduplicate: bool = False
    ) -> Tokenized:
        return await self._run(self._core.tokenize(customer_id, data_type, value, deduplicate))

    async def tokenize_batch(
        self, items: Sequence[TokenizeItem | Mapping[str, str]]
    ) -> list[Tokenized | VaultError]:
        return await self._run(self._core.tokenize_batch(items))

    async def detokenize(
        self, token: str, *, reason: str | None = None, reveal: str | None = None
    ) -> Revealed:
        return await self._run(self._core.detokenize(token, reason=reason, reveal=reveal))

    async def detokenize_batch(
        self, tokens: Sequence[str], *, reason: str | None = None, reveal: str | None = None
    ) -> list[Revealed | VaultError]:
        return await self._run(self._core.detokenize_batch(tokens, reason=reason, reveal=reveal))

    async def lookup(self, *, data_type: str, value: str, customer_id: str | None = None) -> list[Match]:
        return await self._run(self._core.lookup(data_type, value, customer_id))

    async def erase(self, token: str, *, reason: str | None = None) -> None:
        await self._run(self._core.erase(token, reason=reason))

    async def erase_customer(
        self, customer_id: str, *, reason: str, data_types: Sequence[str] | None = None
    ) -> Erasure:
        return await self._run(self._core.erase_customer(customer_id, reason=reason, data_types=data_types))
