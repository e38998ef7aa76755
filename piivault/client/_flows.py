"""Each call's logic once, for both clients: a generator yields the HTTP calls (and pauses) it
needs, and VaultClient or AsyncVaultClient carries them out, retries included.

A Call is sent again, unchanged, while it fails retryably: its Idempotency-Key (one per logical
call) is the same on every attempt, so a tokenize retried after a lost answer stores once.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union
from urllib.parse import quote

import httpx

from piivault.client.errors import ConnectionFailed, NotFound, VaultError, error_from
from piivault.client.models import Erasure, Limits, Match, Revealed, Tokenized, TokenizeItem

T = TypeVar("T")

DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
# A server that does not say (GET /v1/limits unknown): the vault's defaults.
DEFAULT_LIMITS = Limits(max_batch_items=1000, max_value_bytes=4096)
# Failures after which the request may or may not have reached the vault: retried, which is safe
# because every call that writes carries an Idempotency-Key.
RETRIED_TRANSPORT_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


@dataclass(frozen=True, slots=True)
class Call:
    method: str
    path: str
    json: Any = field(default=None, repr=False)
    params: Mapping[str, str] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Pause:
    seconds: float


Step = Union[Call, Pause]  # noqa: UP007 (a runtime alias)
Flow = Generator[Step, Any, T]


def idempotency_key() -> dict[str, str]:
    """A fresh key for one logical call (kept across that call's retries)."""
    return {"Idempotency-Key": str(uuid.uuid4())}


def _item(item: TokenizeItem | Mapping[str, str]) -> TokenizeItem:
    if isinstance(item, TokenizeItem):
        return item
    return TokenizeItem(item["customer_id"], item["data_type"], item["value"])


def _chunks(indexes: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for start in range(0, len(indexes), size):
        yield indexes[start : start + size]


def _reason(reason: str | None) -> dict[str, str]:
    return {"X-Access-Reason": reason} if reason else {}


@dataclass
class RetryPolicy:
    """How often and how long to wait: exponential backoff with jitter, or what Retry-After says."""

    max_retries: int = 3
    backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    max_retry_after_s: float = 60.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        if retry_after:
            try:
                return min(max(float(retry_after), 0.0), self.max_retry_after_s)
            except ValueError:
                pass  # an HTTP date, or nonsense: back off as if it were absent
        ceiling = min(self.max_backoff_s, self.backoff_s * 2.0**attempt)
        return ceiling * (0.5 + random.random() / 2)  # noqa: S311 (jitter, not a secret)


class Core:
    """The state and logic the two clients share (settings, the server's limits)."""

    def __init__(self, base_url: str, api_key: str, retry: RetryPolicy) -> None:
        self.base_url = base_url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {api_key}"}
        self.retry = retry
        self.limits_cache: Limits | None = None

    def __repr__(self) -> str:
        return f"Core(base_url={self.base_url!r})"

    # Sending: used by the drivers ------------------------------------------------------------

    def request_args(self, call: Call) -> dict[str, Any]:
        return {
            "method": call.method,
            "url": self.base_url + call.path,
            "json": call.json,
            "params": call.params,
            "headers": {**self._auth, **call.headers},
        }

    @staticmethod
    def outcome(response: httpx.Response) -> Any:
        """The body of a success, or the error to raise or retry."""
        if response.status_code < 300:
            return response.json() if response.content else None
        try:
            body = response.json().get("error")
        except ValueError:
            body = None
        return error_from(
            body,
            response.status_code,
            response.headers.get("X-Request-ID"),
            retry_after="Retry-After" in response.headers,
        )

    @staticmethod
    def connection_failed(err: Exception) -> VaultError:
        return ConnectionFailed(f"no answer from the vault ({type(err).__name__})")

    # The calls -------------------------------------------------------------------------------

    def limits(self) -> Flow[Limits]:
        if self.limits_cache is None:
            try:
                body = yield Call("GET", "/v1/limits")
            except NotFound:
                self.limits_cache = DEFAULT_LIMITS
            else:
                self.limits_cache = Limits(int(body["max_batch_items"]), int(body["max_value_bytes"]))
        return self.limits_cache

    def tokenize(
        self, customer_id: str, data_type: str, value: str, deduplicate: bool = False
    ) -> Flow[Tokenized]:
        payload: dict[str, Any] = TokenizeItem(customer_id, data_type, value).as_json()
        if deduplicate:
            payload["deduplicate"] = True
        body = yield Call("POST", "/v1/tokens", payload, headers=idempotency_key())
        return Tokenized.from_json(body)

    def tokenize_batch(
        self, items: Sequence[TokenizeItem | Mapping[str, str]]
    ) -> Flow[list[Tokenized | VaultError]]:
        wanted = [_item(item) for item in items]

        def send(chunk: Sequence[int]) -> Call:
            # A new key per batch sent: items resent are another batch, not a retry of this one.
            payload = {"items": [wanted[index].as_json() for index in chunk]}
            return Call("POST", "/v1/tokens/batch", payload, headers=idempotency_key())

        return (yield from self._batches(len(wanted), send, Tokenized.from_json))

    def detokenize(
        self, token: str, *, reason: str | None = None, reveal: str | None = None
    ) -> Flow[Revealed]:
        params = {"reveal": reveal} if reveal else None
        body = yield Call(
            "GET", f"/v1/tokens/{quote(token, safe='')}", params=params, headers=_reason(reason)
        )
        return Revealed.from_json(body)

    def detokenize_batch(
        self, tokens: Sequence[str], *, reason: str | None = None, reveal: str | None = None
    ) -> Flow[list[Revealed | VaultError]]:
        def send(chunk: Sequence[int]) -> Call:
            payload: dict[str, Any] = {"tokens": [tokens[index] for index in chunk]}
            if reveal:
                payload["reveal"] = reveal
            return Call("POST", "/v1/tokens/detokenize", payload, headers=_reason(reason))

        return (yield from self._batches(len(tokens), send, Revealed.from_json))

    def lookup(self, data_type: str, value: str, customer_id: str | None = None) -> Flow[list[Match]]:
        payload = {"data_type": data_type, "value": value}
        if customer_id is not None:
            payload["customer_id"] = customer_id
        body = yield Call("POST", "/v1/tokens/lookup", payload)
        return [Match.from_json(match) for match in body["matches"]]

    def erase(self, token: str, *, reason: str | None = None) -> Flow[None]:
        yield Call("DELETE", f"/v1/tokens/{quote(token, safe='')}", headers=_reason(reason))

    def erase_customer(
        self, customer_id: str, *, reason: str, data_types: Sequence[str] | None = None
    ) -> Flow[Erasure]:
        payload: dict[str, Any] = {"reason": reason}
        if data_types is not None:
            payload["data_types"] = list(data_types)
        body = yield Call("POST", f"/v1/customers/{quote(customer_id, safe='')}/erase", payload)
        return Erasure(int(body["erased"]), tuple(body.get("tokens", ())))

    def _batches(self, count: int, send: Any, parse: Any) -> Flow[list[Any]]:
        """Send items in batches of the server's maximum; items that failed retryably are sent
        again, as a new batch, after a pause, up to max_retries rounds. Results in input order."""
        limits = yield from self.limits()
        results: list[Any] = [None] * count
        pending = list(range(count))
        for round_ in range(self.retry.max_retries + 1):
            again: list[int] = []
            for chunk in _chunks(pending, limits.max_batch_items):
                body = yield send(chunk)
                for index, result in zip(chunk, body["results"], strict=True):
                    if "error" in result:
                        error = error_from(result["error"], None)
                        results[index] = error
                        again += [index] if error.retryable else []
                    else:
                        results[index] = parse(result)
            if not again or round_ == self.retry.max_retries:
                break
            yield Pause(self.retry.delay(round_))
            pending = again
        return results
