"""The REST routes PMOVES calls on e2b-mcp-server (field names and defaults as PMOVES sends them).

``POST /sandbox/create`` ``{duration, memory_mb, cpu_limit}``, ``POST /sandbox/execute``
``{sandbox_id, language, code}``, ``DELETE /sandbox/{id}`` (204), and the doc's thin MCP
aliases ``POST /mcp/tools/list`` and ``POST /mcp/tools/call`` ``{tool, arguments}``.
Every answer is a JSON object; bad input is a 422 JSON answer, never a 500.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pmoves_e2b.config import Settings
from pmoves_e2b.mcp.sandboxes import CODE_INTERPRETER_TEMPLATE, SandboxOpError, SandboxOps
from pmoves_e2b.mcp.tools import SandboxToolError


class CreateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    duration: int = Field(3600, ge=1, le=86_400, description="Seconds until the sandbox is deleted")
    memory_mb: int = Field(2048, ge=64)
    cpu_limit: float = Field(2, gt=0)


class ExecuteBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    sandbox_id: str = Field(min_length=1)
    language: str = "python"
    code: str


class ToolCallBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tool: str = Field(min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)


def error_body(error: str, detail: str) -> dict[str, str]:
    return {"error": error, "detail": detail}


async def sandbox_op_error(_: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, SandboxOpError):  # registered for SandboxOpError only
        raise exc
    return JSONResponse(error_body("sandbox_error", str(exc)), status_code=exc.status)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(SandboxOpError, sandbox_op_error)


def build_router(ops: SandboxOps, server: MCPServer, settings: Settings) -> APIRouter:
    router = APIRouter()

    @router.post("/sandbox/create", status_code=201)
    async def create_sandbox(body: CreateBody) -> dict[str, Any]:
        # Each sandbox gets the server's configured limits; a request for more is refused
        # rather than silently given less.
        if body.memory_mb > settings.e2b_sandbox_memory_mb:
            raise SandboxOpError(
                f"memory_mb {body.memory_mb} exceeds this server's limit E2B_SANDBOX_MEMORY_MB="
                f"{settings.e2b_sandbox_memory_mb}",
                422,
            )
        if body.cpu_limit > settings.e2b_sandbox_cpu_limit:
            raise SandboxOpError(
                f"cpu_limit {body.cpu_limit:g} exceeds this server's limit E2B_SANDBOX_CPU_LIMIT="
                f"{settings.e2b_sandbox_cpu_limit:g}",
                422,
            )
        created = await ops.create(template=CODE_INTERPRETER_TEMPLATE, timeout_s=body.duration)
        info = await ops.info(created["sandbox_id"])
        return {
            "sandbox_id": created["sandbox_id"],
            "status": "running",
            "template": CODE_INTERPRETER_TEMPLATE,
            "duration": body.duration,
            "memory_mb": info["memory_mb"],
            "cpu_limit": info["cpu_count"],
            "started_at": info["started_at"],
            "end_at": info["end_at"],
        }

    @router.post("/sandbox/execute")
    async def execute(body: ExecuteBody) -> dict[str, Any]:
        result = await ops.run_code(body.sandbox_id, body.code, body.language, settings.e2b_execution_timeout_sec)
        return {"sandbox_id": body.sandbox_id, "language": body.language, **result}

    @router.delete("/sandbox/{sandbox_id}", status_code=204)
    async def delete(sandbox_id: str) -> Response:
        await ops.kill(sandbox_id)
        return Response(status_code=204)

    @router.post("/mcp/tools/list")
    async def tools_list() -> dict[str, Any]:
        tools = await server.list_tools()
        return {"tools": [tool.model_dump(mode="json", by_alias=True, exclude_none=True) for tool in tools]}

    @router.post("/mcp/tools/call")
    async def tools_call(body: ToolCallBody) -> JSONResponse:
        names = [tool.name for tool in await server.list_tools()]
        if body.tool not in names:
            return JSONResponse(error_body("unknown_tool", f"no tool {body.tool!r}; tools: {', '.join(names)}"), 404)
        try:
            result = await server.call_tool(body.tool, body.arguments)
        except UnexpectedToolError as exc:
            return JSONResponse(error_body("internal_error", str(exc)), 500)
        except ToolError as exc:
            cause = exc.__cause__
            if isinstance(cause, SandboxToolError):
                return JSONResponse(error_body("tool_error", str(cause)), cause.status)
            if isinstance(cause, ValidationError):
                return JSONResponse(error_body("invalid_arguments", str(exc)), 422)
            return JSONResponse(error_body("tool_error", str(exc)), 400)
        data = result.model_dump(mode="json", by_alias=True, exclude_none=True)
        return JSONResponse({"tool": body.tool, **data})

    return router
