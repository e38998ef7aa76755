"""Liveness, readiness and metrics."""

from __future__ import annotations

import os

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from app.api.deps import VaultDep

router = APIRouter(tags=["operations"])


@router.get("/healthz", name="Health")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", name="Ready", responses={503: {"description": "a dependency is down"}})
def readyz(vault: VaultDep) -> dict[str, str]:
    """The database and the key service answer."""
    vault.database.ping()
    vault.keys.check()
    return {"status": "ready", "database": "ok", "key_service": "ok"}


@router.get("/metrics", name="Metrics", include_in_schema=False)
def metrics() -> Response:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Several workers: sum what each wrote to the shared directory.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
