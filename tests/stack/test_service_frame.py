"""The shared service frame: health semantics, bounded checks, metrics labels (in-process app)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from fastapi import APIRouter
from fastapi.testclient import TestClient
from stack.harness import free_ports

from pmoves_e2b.config import load_settings
from pmoves_e2b.service import DependencyCheck, make_service_app


def _app(tmp_path: Path, checks: list[DependencyCheck]):  # type: ignore[no-untyped-def]
    router = APIRouter()

    @router.get("/items/{item_id}")
    async def item(item_id: str) -> dict[str, str]:
        return {"id": item_id}

    # NATS points at a closed port: the frame must not wait for it.
    settings = load_settings(e2b_data_dir=tmp_path, e2b_nats_port=free_ports(1)[0], e2b_nats_password="test-secret")
    return make_service_app("surf", settings, health_checks=checks, routers=[router])


async def _ok() -> bool:
    return True


async def _down() -> bool:
    return False


async def _hangs() -> bool:
    await asyncio.sleep(30)
    return True


def test_soft_dependency_down_is_degraded_but_200(tmp_path: Path) -> None:
    with TestClient(_app(tmp_path, [DependencyCheck("db", _ok, hard=True)])) as client:
        for path in ("/api/health", "/healthz"):
            response = client.get(path)
            assert response.status_code == 200
            body = response.json()
            assert body["status"] == "degraded" and body["service"] == "e2b-surf"
            assert body["dependencies"] == {"nats": "disconnected", "db": "ok"}


def test_hard_dependency_down_or_hanging_is_503_within_a_second(tmp_path: Path) -> None:
    checks = [DependencyCheck("db", _down, hard=True), DependencyCheck("backend", _hangs, hard=True)]
    with TestClient(_app(tmp_path, checks)) as client:
        started = time.monotonic()
        response = client.get("/api/health")
        assert time.monotonic() - started < 1.0
        assert response.status_code == 503
        assert response.json()["status"] == "unhealthy"
        assert response.json()["dependencies"] == {
            "nats": "disconnected",
            "db": "unavailable",
            "backend": "unavailable",
        }


def test_metrics_label_requests_by_route_template(tmp_path: Path) -> None:
    with TestClient(_app(tmp_path, [])) as client:
        client.get("/items/one")
        client.get("/items/two")
        client.get("/no/such/path")
        metrics = client.get("/metrics").text
    assert 'http_requests_total{method="GET",path="/items/{item_id}",status="200"}' in metrics
    assert 'path="<unmatched>",status="404"' in metrics
    assert "/items/one" not in metrics
