"""``POST /desktop/create`` on e2b-mcp-server, as PMOVES' Agent Zero wrapper calls it.

Body ``{duration, memory_mb, resolution}`` (PMOVES' defaults 3600, 2048, "1920x1080"; also
``cpu_limit``). The answer carries ``data.desktop_id``, from which PMOVES builds
``E2B_DESKTOP_URL + "/desktop/" + desktop_id``; ``data.viewer_url`` is that URL with a
signed, short-lived access link. Errors are ``{"error", "detail"}`` with 4xx/5xx.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from pmoves_e2b.desktop.desktops import DesktopError, DesktopOps


class DesktopCreateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")  # PMOVES may add fields; ours are validated
    duration: int = Field(3600, ge=1, description="Seconds until the desktop is removed")
    memory_mb: int = Field(2048, ge=64)
    resolution: str = Field("1920x1080", pattern=r"^[1-9][0-9]{1,4}x[1-9][0-9]{1,4}$")
    cpu_limit: float | None = Field(None, gt=0)


def build_router(ops: DesktopOps, viewer_url: Callable[[str], str], public_base: str) -> APIRouter:
    router = APIRouter(tags=["desktops"])

    @router.post("/desktop/create", status_code=201, response_model=None)
    async def create(body: DesktopCreateBody) -> dict[str, Any] | JSONResponse:
        try:
            desktop = await ops.create(
                resolution=body.resolution,
                duration_s=body.duration,
                memory_mb=body.memory_mb,
                cpu_count=body.cpu_limit,
                created_by="e2b-mcp-server",
            )
        except DesktopError as exc:
            return JSONResponse({"error": exc.code, "detail": exc.message}, status_code=exc.status)
        data = {
            **desktop.to_dict(),
            "status": "running",
            "duration": body.duration,
            "novnc_url": f"{public_base.rstrip('/')}/desktop/{desktop.desktop_id}",
            "viewer_url": viewer_url(desktop.desktop_id),
        }
        return {"data": data, "desktop_id": desktop.desktop_id}

    return router
