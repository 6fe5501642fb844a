"""MCP tools ``spell_list`` and ``spell_run`` (names without dots: Agent Zero splits on ".")."""

from __future__ import annotations

import json
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import CallToolResult, ContentBlock, ImageContent, TextContent, ToolAnnotations
from pydantic import Field

from pmoves_e2b.mcp.keepalive import keepalive
from pmoves_e2b.mcp.tools import SandboxToolError
from pmoves_e2b.spells.executor import SpellError, SpellExecutor, SpellRequest

IMAGE_TYPES = ("image/png", "image/jpeg")


def run_result(run: dict[str, Any]) -> CallToolResult:
    """Text for the model, inline images as image content, the whole run as structured content."""
    parts = [f"spell {run['spell_name']} {run['spell_version']}: {run['status']} in {run['duration_seconds']} s"]
    if run["error"]:
        parts.append(f"error: {run['error']}")
    if run["stdout"]:
        parts.append("stdout:\n" + run["stdout"].rstrip("\n"))
    if run["stderr"]:
        parts.append("stderr:\n" + run["stderr"].rstrip("\n"))
    if run["result"] is not None:
        parts.append("result:\n" + json.dumps(run["result"], indent=1, ensure_ascii=False))
    images: list[ContentBlock] = []
    for file in run["files"]:
        where = file.get("url") or "inline (structured content, content_base64)"
        parts.append(f"file {file['name']} ({file['size']} bytes, {file['mime_type']}): {where}")
        if file["mime_type"] in IMAGE_TYPES and "content_base64" in file:
            images.append(ImageContent(type="image", data=file["content_base64"], mime_type=file["mime_type"]))
    return CallToolResult(
        content=[TextContent(type="text", text="\n\n".join(parts)), *images],
        structured_content=run,
        is_error=run["status"] != "completed",
    )


def register(server: MCPServer, executor: SpellExecutor) -> None:

    @server.tool(
        description="List the spells (ready-made code recipes run in a fresh sandbox) with their parameters.",
        annotations=ToolAnnotations(read_only_hint=True),
    )
    async def spell_list() -> dict[str, Any]:
        return {
            "spells": [
                {"name": s.name, "description": s.description, "parameters": s.parameters, "example": s.example}
                for s in executor.registry.spells()
            ]
        }

    @server.tool(
        description="Run a spell by name with its parameters (see spell_list). Returns status, stdout, stderr, "
        "the spell's JSON result and its files (images attached)."
    )
    async def spell_run(
        spell_name: Annotated[str, Field(description="Name from spell_list")],
        parameters: Annotated[dict[str, Any] | None, Field(description="Parameters as the spell's schema says")] = None,
        timeout_seconds: Annotated[int | None, Field(ge=1, description="Default: the spell's timeout")] = None,
        sandbox_id: Annotated[str | None, Field(description="Run in this sandbox instead of a new one")] = None,
        ctx: Context | None = None,
    ) -> CallToolResult:
        try:
            async with keepalive(ctx, f"spell {spell_name}"):
                run = await executor.execute(SpellRequest(spell_name, parameters or {}, timeout_seconds, sandbox_id))
        except SpellError as exc:
            raise SandboxToolError(exc.message, exc.status) from exc
        return run_result(run)
