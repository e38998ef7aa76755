"""Liveness, readiness and metrics."""

from __future__ import annotations

import copy
import os
import threading
import time

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from app.api.deps import CallerDep, VaultDep
from app.api.schemas import ErrorResponse, LimitsOut
from app.container import Vault
from app.errors import VaultError

router = APIRouter(tags=["operations"])


class Readiness:
    """The database and KMS check behind /readyz, made at most once every `cache_s` seconds in
    this process; in between, its outcome (ready, or the error) is answered again. One check at a
    time: concurrent probes wait for it rather than each calling KMS."""

    def __init__(self, cache_s: float) -> None:
        self._cache_s = cache_s
        self._lock = threading.Lock()
        self._checked_at: float | None = None
        self._failure: VaultError | None = None

    def check(self, vault: Vault) -> None:
        with self._lock:
            if self._checked_at is None or time.monotonic() - self._checked_at >= self._cache_s:
                try:
                    vault.database.ping()
                    vault.keys.check()
                    self._failure = None
                except VaultError as err:
                    self._failure = err.with_traceback(None)
                self._checked_at = time.monotonic()
            failure = self._failure
        if failure is not None:
            raise copy.copy(failure)  # a copy each time: its traceback is this request's own


@router.get("/healthz", name="Health")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", name="Ready", responses={503: {"description": "a dependency is down"}})
def readyz(vault: VaultDep, request: Request) -> dict[str, str]:
    """The database and the key service answer (checked at most every PIIVAULT_READY_CACHE_S)."""
    readiness: Readiness = request.app.state.readiness
    readiness.check(vault)
    return {"status": "ready", "database": "ok", "key_service": "ok"}


@router.get("/v1/limits", name="Limits", responses={401: {"model": ErrorResponse}})
def limits(vault: VaultDep, caller: CallerDep) -> LimitsOut:
    """The batch and value bounds this vault enforces (any authenticated caller): clients split
    batches at max_batch_items."""
    return LimitsOut(
        max_batch_items=vault.settings.max_batch_items, max_value_bytes=vault.settings.max_value_bytes
    )


@router.get("/metrics", name="Metrics", include_in_schema=False)
def metrics() -> Response:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Several workers: sum what each wrote to the shared directory.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
