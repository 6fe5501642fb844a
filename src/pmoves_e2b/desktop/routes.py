"""The REST API of e2b-desktop for agents and programs (``Authorization: Bearer <E2B_DESKTOP_AUTH_TOKEN>``).

``POST /desktops``, ``GET /desktops``, ``GET /desktops/{id}``, ``GET /desktops/{id}/screenshot``
(PNG), ``POST /desktops/{id}/actions``, ``DELETE /desktops/{id}``. Errors are
``{"error": code, "detail": text}``; a desktop that has ended is 404.
"""

from __future__ import annotations

from typing import Any, cast

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from pmoves_e2b.desktop.actions import Action, ActionBatch
from pmoves_e2b.desktop.desktops import Desktop, DesktopError, DesktopOps


class CreateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    resolution: str | None = Field(None, description="WIDTHxHEIGHT (default E2B_DESKTOP_RESOLUTION)")
    duration: int | None = Field(
        None, ge=1, description="Lifetime in seconds (default and cap E2B_DESKTOP_MAX_DURATION)"
    )
    memory_mb: int | None = Field(None, ge=64, description="Memory the desktop needs (refused if more than it gets)")
    cpu: float | None = Field(None, gt=0, description="CPUs the desktop needs (refused if more than it gets)")


def error_body(code: str, detail: str) -> dict[str, str]:
    return {"error": code, "detail": detail}


async def desktop_error(_: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, DesktopError):
        raise exc
    return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status)


async def validation_error(_: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):
        raise exc
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return JSONResponse(error_body("invalid_request", f"{where}: {message}" if where else message), status_code=422)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DesktopError, desktop_error)
    app.add_exception_handler(RequestValidationError, validation_error)


def desktop_json(desktop: Desktop, request: Request) -> dict[str, Any]:
    base = str(request.app.state.settings.e2b_desktop_url).rstrip("/")
    return {**desktop.to_dict(), "viewer_url": f"{base}/desktop/{desktop.desktop_id}"}


# An Annotated union: some mypy versions cannot type it as an argument, so it goes as Any.
_ACTIONS: TypeAdapter[Any] = TypeAdapter(cast(Any, Action))


def parse_actions(body: Any) -> list[Any]:
    """One action object, or ``{"actions": [...]}``."""
    try:
        if isinstance(body, dict) and "actions" in body:
            return list(ActionBatch.model_validate(body).actions)
        return [_ACTIONS.validate_python(body)]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = str(first.get("msg", "invalid action")).removeprefix("Value error, ")
        raise DesktopError("invalid_action", f"{where}: {message}" if where else message, 422) from None


def build_router(require_bearer: Any) -> APIRouter:
    router = APIRouter(prefix="/desktops", tags=["desktops"], dependencies=[Depends(require_bearer)])

    def ops_of(request: Request) -> DesktopOps:
        ops: DesktopOps = request.app.state.desktop_ops
        return ops

    @router.post("", status_code=201, summary="Create a desktop")
    async def create(body: CreateBody, request: Request) -> dict[str, Any]:
        desktop = await ops_of(request).create(
            resolution=body.resolution,
            duration_s=body.duration,
            memory_mb=body.memory_mb,
            cpu_count=body.cpu,
            created_by="e2b-desktop",
        )
        await request.app.state.desktop_watcher.created(desktop)
        return desktop_json(desktop, request)

    @router.get("", summary="List live desktops")
    async def list_desktops(request: Request) -> dict[str, Any]:
        return {"desktops": [desktop_json(d, request) for d in await ops_of(request).live()]}

    @router.get("/{desktop_id}", summary="One desktop")
    async def get(desktop_id: str, request: Request) -> dict[str, Any]:
        return desktop_json(await ops_of(request).get(desktop_id), request)

    @router.get("/{desktop_id}/screenshot", summary="PNG of the screen", response_class=Response)
    async def screenshot(desktop_id: str, request: Request) -> Response:
        data = await ops_of(request).screenshot(desktop_id)
        return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})

    @router.post("/{desktop_id}/actions", summary="Run actions (one, or {actions: [...]}) in order")
    async def actions(desktop_id: str, request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise DesktopError("invalid_request", "the body must be JSON", 400) from None
        return await ops_of(request).act(desktop_id, parse_actions(body))

    @router.delete("/{desktop_id}", status_code=204, summary="End a desktop")
    async def delete(desktop_id: str, request: Request) -> Response:
        await ops_of(request).kill(desktop_id)
        return Response(status_code=204)

    return router
