"""E2B's snapshot and fork routes, as the stock SDKs call them (``sandbox/snapshots.py`` does the work).

``POST /sandboxes/{id}/snapshots`` (``Sandbox.create_snapshot``), ``GET /snapshots``
(``Sandbox.list_snapshots``, paged like the sandbox list) and ``POST /sandboxes/{id}/fork``
(``Sandbox.fork``); deleting a snapshot is the template API's ``DELETE /templates/{id}``.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from pmoves_e2b.sandbox.api import ApiKeys, Shapes, _Strict, encode_page_token, page_query, parse_body
from pmoves_e2b.sandbox.errors import SandboxError
from pmoves_e2b.sandbox.snapshots import MAX_FORKS, SnapshotInfo, Snapshots


class SnapshotBody(_Strict):
    name: str | None = Field(None, min_length=1, max_length=128)
    memory: bool | None = None  # E2B's default: a full snapshot (memory too)


class ForkBody(_Strict):
    timeout: int | None = Field(None, ge=0)
    count: int = Field(1, ge=1, le=MAX_FORKS)


def _shape(info: SnapshotInfo) -> dict[str, object]:
    return {"snapshotID": info.snapshot_id, "names": info.names}


def build_snapshot_router(snapshots: Snapshots, keys: ApiKeys, shapes: Shapes) -> APIRouter:
    def require_api_key(request: Request) -> None:
        request.state.api_key_id = keys.authenticate(request)

    router = APIRouter(dependencies=[Depends(require_api_key)])
    manager = snapshots.manager

    async def create_snapshot(request: Request, sandbox_id: str) -> JSONResponse:
        body: SnapshotBody = await parse_body(request, SnapshotBody, required=False)
        info = await snapshots.take(sandbox_id, body.name, memory=body.memory is not False)
        return JSONResponse(_shape(info), status_code=201)

    async def list_snapshots(request: Request) -> JSONResponse:
        found = snapshots.listed(request.query_params.get("sandboxID"), request.query_params.get("name"))
        limit, cursor = page_query(request)
        if cursor is not None:
            found = [info for info in found if (info.created_at, info.snapshot_id) > cursor]
        page = found[:limit]
        headers = {}
        if len(found) > limit:
            headers["x-next-token"] = encode_page_token((page[-1].created_at, page[-1].snapshot_id))
        return JSONResponse([_shape(info) for info in page], headers=headers)

    async def fork(request: Request, sandbox_id: str) -> JSONResponse:
        body: ForkBody = await parse_body(request, ForkBody, required=False)
        results = await snapshots.fork(sandbox_id, body.count, body.timeout, request.state.api_key_id)
        shaped: list[dict[str, object]] = []
        for result in results:
            if isinstance(result, SandboxError):
                shaped.append({"error": {"code": result.status, "message": result.message}})
            elif isinstance(result, Exception):
                shaped.append({"error": {"code": 500, "message": f"the fork did not start: {result}"}})
            else:
                shaped.append({"sandbox": shapes.sandbox(result, manager.network(result.sandbox_id))})
        return JSONResponse(shaped, status_code=201)

    add = router.add_api_route
    add("/sandboxes/{sandbox_id}/snapshots", create_snapshot, methods=["POST"], status_code=201, summary="Snapshot")
    add("/snapshots", list_snapshots, methods=["GET"], summary="List snapshots")
    add("/sandboxes/{sandbox_id}/fork", fork, methods=["POST"], status_code=201, summary="Fork a running sandbox")
    return router
