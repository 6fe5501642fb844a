"""e2b-mcp-server: MCP bridge and the REST routes PMOVES agents call.

Only the shared frame (health, metrics, NATS announce) so far; the service's routers are
added to `routers()` as they land.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from pmoves_e2b.config import Settings, get_settings
from pmoves_e2b.service import make_service_app


def routers() -> list[APIRouter]:
    return []


def create_app(settings: Settings | None = None) -> FastAPI:
    return make_service_app("mcp", settings or get_settings(), routers=routers())
