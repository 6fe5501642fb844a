"""The spell routes of e2b-mcp-server: ``GET /spells``, ``GET /spells/{name}``, ``POST /spell/execute``.

``POST /spell/execute`` takes ``{spell_name, parameters, timeout, sandbox_id?}`` (PMOVES'
Agent Zero wrapper sends the first three) and answers 200 with the run, whose ``status``
says whether the spell completed, failed or timed out. A request that cannot run at all
gets ``{"error": code, "detail": reason}`` with 404 (unknown spell), 422 (bad parameters or
timeout) or 5xx (sandbox backend trouble), never a bare 500.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from pmoves_e2b.spells.executor import SpellError, SpellExecutor, SpellRequest
from pmoves_e2b.spells.registry import UnknownSpell


class ExecuteBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    spell_name: str = Field(min_length=1, description="Name from GET /spells")
    parameters: dict[str, Any] = Field(default_factory=dict)
    timeout: int | None = Field(None, ge=1, description="Seconds (default: the spell's timeout)")
    sandbox_id: str | None = Field(None, min_length=1, description="Run in this sandbox instead of a new one")


def error_response(exc: SpellError) -> JSONResponse:
    return JSONResponse({"error": exc.code, "detail": exc.message}, status_code=exc.status)


def listing(executor: SpellExecutor) -> dict[str, Any]:
    registry = executor.registry
    return {
        "spells": [spell.summary() for spell in registry.spells()],
        "problems": [{"path": p.path, "error": p.error} for p in registry.problems()],
    }


def router(executor: SpellExecutor) -> APIRouter:
    routes = APIRouter(tags=["spells"])

    @routes.get("/spells", summary="List spells with their parameter schemas")
    async def list_spells() -> dict[str, Any]:
        return listing(executor)

    @routes.get("/spells/{name}", summary="One spell, including its code", response_model=None)
    async def show_spell(name: str) -> dict[str, Any] | JSONResponse:
        try:
            spell = executor.registry.get(name)
        except UnknownSpell as exc:
            return error_response(SpellError("not_found", str(exc), 404))
        return {**spell.summary(), "code": spell.code}

    @routes.post("/spell/execute", summary="Run a spell in a sandbox", response_model=None)
    async def execute(body: ExecuteBody) -> dict[str, Any] | JSONResponse:
        try:
            return await executor.execute(SpellRequest(body.spell_name, body.parameters, body.timeout, body.sandbox_id))
        except SpellError as exc:
            return error_response(exc)

    return routes
