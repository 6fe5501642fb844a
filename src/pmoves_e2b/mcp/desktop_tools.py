"""MCP tools for desktops (names without dots: Agent Zero splits on ".").

``desktop_create``, ``desktop_screenshot`` (the PNG as MCP image content), ``desktop_click``,
``desktop_type``, ``desktop_key``, ``desktop_scroll``, ``desktop_kill``. Served by
e2b-mcp-server; the desktops are the same ones e2b-desktop shows.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, TypeVar

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import CallToolResult, ImageContent, TextContent, ToolAnnotations
from pydantic import Field

from pmoves_e2b.desktop.actions import Click, DoubleClick, Key, Scroll, Type
from pmoves_e2b.desktop.desktops import DesktopError, DesktopOps
from pmoves_e2b.mcp.keepalive import keepalive
from pmoves_e2b.mcp.tools import SandboxToolError

DesktopId = Annotated[str, Field(description="Id returned by desktop_create")]
Coord = Annotated[int, Field(ge=0, le=65_535, description="Pixels from the left/top edge of the screen")]


T = TypeVar("T")


async def _tool(call: Awaitable[T]) -> T:
    try:
        return await call
    except DesktopError as exc:
        raise SandboxToolError(exc.message, exc.status) from exc


def register(server: MCPServer, ops: DesktopOps, viewer_url: Callable[[str], str]) -> None:
    @server.tool(
        description="Start a Linux desktop (XFCE, Chromium) to see and drive with the desktop_* tools. "
        "Returns desktop_id and a viewer_url a person can open to watch it live."
    )
    async def desktop_create(
        resolution: Annotated[str | None, Field(description="WIDTHxHEIGHT, e.g. 1280x800")] = None,
        timeout_seconds: Annotated[int | None, Field(ge=1, description="Lifetime (capped by the server)")] = None,
        ctx: Context | None = None,
    ) -> dict[str, Any]:
        async with keepalive(ctx, "desktop_create"):
            desktop = await _tool(
                ops.create(resolution=resolution, duration_s=timeout_seconds, created_by="e2b-mcp-server")
            )
        return {**desktop.to_dict(), "viewer_url": viewer_url(desktop.desktop_id)}

    @server.tool(description="Screenshot of the desktop (PNG image).", annotations=ToolAnnotations(read_only_hint=True))
    async def desktop_screenshot(desktop_id: DesktopId) -> CallToolResult:
        data = await _tool(ops.screenshot(desktop_id))
        return CallToolResult(
            content=[
                TextContent(type="text", text=f"screenshot of desktop {desktop_id} ({len(data)} bytes PNG)"),
                ImageContent(type="image", data=base64.b64encode(data).decode(), mime_type="image/png"),
            ]
        )

    @server.tool(description="Click at (x, y). button: left, right or middle; double=true for a double click.")
    async def desktop_click(
        desktop_id: DesktopId,
        x: Coord,
        y: Coord,
        button: Literal["left", "right", "middle"] = "left",
        double: bool = False,
    ) -> dict[str, Any]:
        action = DoubleClick(type="double_click", x=x, y=y) if double else Click(type="click", x=x, y=y, button=button)
        return await _tool(ops.act(desktop_id, [action]))

    @server.tool(description="Type text at the keyboard focus (unicode allowed).")
    async def desktop_type(
        desktop_id: DesktopId, text: Annotated[str, Field(min_length=1, max_length=10_000)]
    ) -> dict[str, Any]:
        return await _tool(ops.act(desktop_id, [Type(type="type", text=text)]))

    @server.tool(
        description="Press a key or combination: 'enter', 'escape', 'tab', 'ctrl+l', 'ctrl+shift+t', 'alt+f4', "
        "'page_down', 'f5', single letters and digits."
    )
    async def desktop_key(desktop_id: DesktopId, keys: Annotated[str, Field(min_length=1)]) -> dict[str, Any]:
        try:
            action = Key(type="key", keys=keys)
        except ValueError as exc:
            raise SandboxToolError(str(exc), 422) from exc
        return await _tool(ops.act(desktop_id, [action]))

    @server.tool(description="Scroll the mouse wheel, optionally at (x, y).")
    async def desktop_scroll(
        desktop_id: DesktopId,
        direction: Literal["up", "down"] = "down",
        amount: Annotated[int, Field(ge=1, le=50)] = 3,
        x: Coord | None = None,
        y: Coord | None = None,
    ) -> dict[str, Any]:
        try:
            action = Scroll(type="scroll", direction=direction, amount=amount, x=x, y=y)
        except ValueError as exc:
            raise SandboxToolError(str(exc), 422) from exc
        return await _tool(ops.act(desktop_id, [action]))

    @server.tool(description="End a desktop.", annotations=ToolAnnotations(destructive_hint=True))
    async def desktop_kill(desktop_id: DesktopId) -> dict[str, Any]:
        await _tool(ops.kill(desktop_id))
        return {"desktop_id": desktop_id, "killed": True}
