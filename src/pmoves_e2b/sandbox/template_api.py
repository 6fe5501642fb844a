"""E2B's template read API over the built templates: aliases and the list.

The stock SDK's ``Template.exists(name)`` asks ``GET /templates/aliases/{alias}``; here every
complete built template is its own alias (its name). Building templates through the API
(POST /v3/templates and the build routes) is not served yet: those paths answer E2B's 404.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from pmoves_e2b.envd import ENVD_VERSION
from pmoves_e2b.sandbox.errors import ApiError
from pmoves_e2b.sandbox.templates.store import list_templates, read_record

_ALIAS = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def _iso(value: str | None) -> str:
    if value:
        return value
    return datetime.now(UTC).isoformat(timespec="seconds")


def build_template_router(
    authenticate: Any, templates_dir: Path, memory_mb: int, cpu_count: float, disk_mb: int
) -> APIRouter:
    """``authenticate(request)`` is the control plane's API-key check (raises 401)."""

    def require_api_key(request: Request) -> None:
        request.state.api_key_id = authenticate(request)

    router = APIRouter(dependencies=[Depends(require_api_key)])

    def _shape(name: str) -> dict[str, Any]:
        record = read_record(templates_dir, name)
        built = _iso(record.get("built_at"))
        cpu = float(record.get("cpu_count") or cpu_count)
        return {
            "templateID": name,
            "buildID": str(record["layers"][0]) if record.get("layers") else name,
            "cpuCount": int(cpu) if cpu == int(cpu) else cpu,
            "memoryMB": int(record.get("memory_mb") or memory_mb),
            "diskSizeMB": disk_mb,
            "public": True,
            "aliases": [name],
            "names": [name],
            "createdAt": built,
            "updatedAt": built,
            "createdBy": None,
            "lastSpawnedAt": None,
            "spawnCount": 0,
            "buildCount": 1,
            "envdVersion": ENVD_VERSION,
            "buildStatus": "ready",
        }

    async def alias(alias: str) -> JSONResponse:
        if not _ALIAS.match(alias):
            raise ApiError(
                400, f"invalid template alias {alias!r}: use lowercase letters, digits, '.', '_' and '-' (max 63)"
            )
        names = {t.name for t in await asyncio.to_thread(list_templates, templates_dir)}
        if alias not in names:
            raise ApiError(404, f"template alias '{alias}' not found")
        return JSONResponse({"templateID": alias, "public": True})

    async def listed() -> JSONResponse:
        images = await asyncio.to_thread(list_templates, templates_dir)
        return JSONResponse([_shape(t.name) for t in images])

    router.add_api_route("/templates/aliases/{alias}", alias, methods=["GET"], summary="Does a template alias exist")
    router.add_api_route("/templates", listed, methods=["GET"], summary="List built templates")
    return router
