"""The MCP server and its sandbox tools (official ``mcp`` SDK, ``MCPServer``).

Tool names have no dots: Agent Zero calls ``<server>.<tool>`` and splits on ".".
Schemas stay small because Agent Zero pastes them into the model's prompt.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ContentBlock, ImageContent, TextContent, ToolAnnotations
from pydantic import Field

from pmoves_e2b import __version__
from pmoves_e2b.mcp.keepalive import keepalive
from pmoves_e2b.mcp.sandboxes import (
    BASE_TEMPLATE,
    CODE_INTERPRETER_TEMPLATE,
    IMAGE_FORMATS,
    IMPLICIT_SANDBOX_TIMEOUT_S,
    SandboxOpError,
    SandboxOps,
)

SERVER_NAME = "e2b-mcp-server"
INSTRUCTIONS = (
    "Isolated Linux sandboxes for running code. Typical flow: sandbox_create -> write_file / "
    "run_code (stateful Python, charts come back as images) / run_command -> sandbox_kill."
)

P = ParamSpec("P")
R = TypeVar("R")

SandboxId = Annotated[str, Field(description="Id returned by sandbox_create")]
OptionalSandboxId = Annotated[
    str | None,
    Field(description=f"Sandbox to use; omit to start a new one (expires after {IMPLICIT_SANDBOX_TIMEOUT_S} s)"),
]
Path = Annotated[str, Field(description="Absolute path or relative to /home/user")]
TimeoutSeconds = Annotated[int, Field(ge=1, le=86_400, description="Seconds until the sandbox is deleted")]
ExpiresSeconds = Annotated[int, Field(ge=1, le=86_400, description="Seconds the URL stays valid")]


class SandboxToolError(ToolError):
    """A tool failure an agent can act on; ``status`` is what the REST routes answer with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _as_tool_error(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except SandboxOpError as exc:
            raise SandboxToolError(str(exc), exc.status) from exc

    return wrapper


def code_result(sandbox_id: str, created: bool, result: dict[str, Any]) -> CallToolResult:
    """Text for the model plus every image result as MCP image content."""
    parts = [f"sandbox_id: {sandbox_id}" + (" (new sandbox)" if created else "")]
    if result["stdout"]:
        parts.append("stdout:\n" + result["stdout"].rstrip("\n"))
    if result["stderr"]:
        parts.append("stderr:\n" + result["stderr"].rstrip("\n"))
    images: list[ContentBlock] = []
    for item in result["results"]:
        for fmt, mime in IMAGE_FORMATS.items():
            if item.get(fmt):
                images.append(ImageContent(type="image", data=item[fmt], mime_type=mime))
        if item.get("text") and not any(item.get(fmt) for fmt in IMAGE_FORMATS):
            parts.append("result:\n" + item["text"])
        elif any(item.get(fmt) for fmt in IMAGE_FORMATS):
            parts.append(f"result: image ({len(images)} attached)")
    error = result["error"]
    if error:
        parts.append(f"error: {error['name']}: {error['value']}\n{error['traceback']}")
    if len(parts) == 1:
        parts.append("(no output)")
    structured = {
        "sandbox_id": sandbox_id,
        "stdout": result["stdout"],
        "stderr": result["stderr"],
        # Images travel as image content; the structured copy keeps only their formats.
        "results": [{k: v for k, v in item.items() if k not in IMAGE_FORMATS} for item in result["results"]],
        "error": error,
    }
    return CallToolResult(
        content=[TextContent(type="text", text="\n\n".join(parts)), *images],
        structured_content=structured,
        is_error=bool(error),
    )


def build_mcp_server(ops: SandboxOps, default_timeout_s: int, execution_timeout_s: int) -> MCPServer:
    server = MCPServer(SERVER_NAME, instructions=INSTRUCTIONS, version=__version__)

    async def sandbox_for(sandbox_id: str | None, template: str) -> tuple[str, bool]:
        if sandbox_id:
            return sandbox_id, False
        created = await ops.create(template=template, timeout_s=IMPLICIT_SANDBOX_TIMEOUT_S)
        return created["sandbox_id"], True

    @server.tool(
        description="Create an isolated Linux sandbox (Python with a Jupyter kernel, shell, files). "
        "Returns sandbox_id. It is deleted after timeout_seconds unless extended."
    )
    @_as_tool_error
    async def sandbox_create(
        timeout_seconds: TimeoutSeconds = default_timeout_s,
        template: Annotated[
            str, Field(description="'code-interpreter-v1' (run_code and run_command) or 'base' (commands only)")
        ] = CODE_INTERPRETER_TEMPLATE,
        ctx: Context | None = None,
    ) -> dict[str, Any]:
        async with keepalive(ctx, "sandbox_create"):
            return await ops.create(template=template, timeout_s=timeout_seconds)

    @server.tool(description="List running sandboxes.", annotations=ToolAnnotations(read_only_hint=True))
    @_as_tool_error
    async def sandbox_list() -> dict[str, Any]:
        return {"sandboxes": await ops.list_all()}

    @server.tool(
        description="Delete a sandbox and everything in it.", annotations=ToolAnnotations(destructive_hint=True)
    )
    @_as_tool_error
    async def sandbox_kill(sandbox_id: SandboxId) -> dict[str, Any]:
        await ops.kill(sandbox_id)
        return {"sandbox_id": sandbox_id, "killed": True}

    @server.tool(description="Set how many seconds from now the sandbox lives (extend or shorten).")
    @_as_tool_error
    async def sandbox_set_timeout(sandbox_id: SandboxId, timeout_seconds: TimeoutSeconds) -> dict[str, Any]:
        await ops.set_timeout(sandbox_id, timeout_seconds)
        return {"sandbox_id": sandbox_id, "timeout_seconds": timeout_seconds}

    @server.tool(
        description="Run code in the sandbox's Jupyter kernel. State (variables, imports) persists between "
        "calls in the same sandbox. Returns stdout, stderr, the last expression's value and charts as images."
    )
    @_as_tool_error
    async def run_code(
        code: Annotated[str, Field(description="Code to run, notebook style")],
        sandbox_id: OptionalSandboxId = None,
        language: Annotated[str, Field(description="python (default), javascript, typescript or bash")] = "python",
        timeout_seconds: Annotated[int, Field(ge=1, le=3600)] = execution_timeout_s,
        ctx: Context | None = None,
    ) -> CallToolResult:
        async with keepalive(ctx, "run_code") as progress:
            sandbox_id, created = await sandbox_for(sandbox_id, CODE_INTERPRETER_TEMPLATE)
            result = await ops.run_code(sandbox_id, code, language, timeout_seconds, on_output=progress.note_output)
        return code_result(sandbox_id, created, result)

    @server.tool(
        description="Run a shell command (bash -l -c) in the sandbox. background=true returns at once with "
        "the pid and leaves the command running."
    )
    @_as_tool_error
    async def run_command(
        command: Annotated[str, Field(description="Shell command line")],
        sandbox_id: OptionalSandboxId = None,
        timeout_seconds: Annotated[int, Field(ge=1, le=3600)] = 60,
        background: bool = False,
        cwd: Annotated[str | None, Field(description="Working directory (default /home/user)")] = None,
        ctx: Context | None = None,
    ) -> dict[str, Any]:
        async with keepalive(ctx, "run_command"):
            sandbox_id, _ = await sandbox_for(sandbox_id, BASE_TEMPLATE)
            result = await ops.run_command(sandbox_id, command, timeout_seconds, background, cwd)
        return {"sandbox_id": sandbox_id, **result}

    @server.tool(
        description="Read a file. Text comes back as utf-8, anything else as base64.",
        annotations=ToolAnnotations(read_only_hint=True),
    )
    @_as_tool_error
    async def read_file(sandbox_id: SandboxId, path: Path) -> dict[str, Any]:
        return await ops.read_file(sandbox_id, path)

    @server.tool(description="Write a file (parent directories are created, existing files replaced).")
    @_as_tool_error
    async def write_file(
        sandbox_id: SandboxId,
        path: Path,
        content: str,
        encoding: Literal["utf-8", "base64"] = "utf-8",
    ) -> dict[str, Any]:
        return await ops.write_file(sandbox_id, path, content, encoding)

    @server.tool(description="List a directory.", annotations=ToolAnnotations(read_only_hint=True))
    @_as_tool_error
    async def list_files(
        sandbox_id: SandboxId,
        path: Path = "/home/user",
        depth: Annotated[int, Field(ge=1, le=10)] = 1,
    ) -> dict[str, Any]:
        return {"path": path, "entries": await ops.list_files(sandbox_id, path, depth)}

    @server.tool(description="Get a URL to upload a file into the sandbox without the tool (multipart POST).")
    @_as_tool_error
    async def upload_url(
        sandbox_id: SandboxId, path: Path, expires_in_seconds: ExpiresSeconds = 3600
    ) -> dict[str, Any]:
        return await ops.file_url(sandbox_id, path, "upload", expires_in_seconds)

    @server.tool(description="Get a URL to download a file from the sandbox (plain GET).")
    @_as_tool_error
    async def download_url(
        sandbox_id: SandboxId, path: Path, expires_in_seconds: ExpiresSeconds = 3600
    ) -> dict[str, Any]:
        return await ops.file_url(sandbox_id, path, "download", expires_in_seconds)

    return server
