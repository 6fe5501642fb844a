"""MCP tools ``surf_scrape`` and ``surf_agent`` (names without dots: Agent Zero splits on ".").

Both run a session of e2b-surf (through ``surf.client``), wait for its end and answer with the
session as structured content plus a short text for the model. Progress notifications keep the
call's stream alive while the run goes on (``keepalive``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import CallToolResult, TextContent
from pydantic import Field

from pmoves_e2b.mcp.keepalive import keepalive
from pmoves_e2b.mcp.tools import SandboxToolError
from pmoves_e2b.surf.client import SurfApi, SurfClientError
from pmoves_e2b.surf.models import Session
from pmoves_e2b.surf.outcome import outcome

# A tool call waits at most this long beyond the run's own time budget.
WAIT_MARGIN_S = 30.0
# Markdown of a page shown to the model in the text part (the whole page is in structured content).
TEXT_CHARS_PER_PAGE = 4000

Format = Literal["markdown", "text", "html", "links", "tables", "screenshot"]


def _text(value: Any) -> str:
    if isinstance(value, dict):  # a large value stored as a file
        return f"[{value.get('bytes', '?')} bytes: {value.get('url', '')}]"
    return str(value or "")


def session_result(session: Session) -> CallToolResult:
    answer = outcome(session)
    head = f"surf session {session.session_id} ({session.mode}): {session.state}"
    parts = [head]
    if session.error:
        parts.append(f"error: {session.error.get('code')}: {session.error.get('message')}")
    for page in answer["pages"]:
        title = page.get("title") or ""
        parts.append(
            f"## {title} <{page.get('final_url') or page['url']}>\n" + _text(page.get("markdown"))[:TEXT_CHARS_PER_PAGE]
        )
    if session.mode == "agent" and session.result is not None:
        parts.append(f"result: {session.result}")
    return CallToolResult(
        content=[TextContent(type="text", text="\n\n".join(parts))],
        structured_content=answer,
        is_error=session.state != "completed",
    )


async def _run(surf: SurfApi, request: dict[str, Any], budget_s: int, ctx: Context | None, what: str) -> CallToolResult:
    wait_s = float(request.get("timeout", budget_s)) + WAIT_MARGIN_S
    try:
        async with keepalive(ctx, what):
            session = await surf.run(request, wait_s)
    except SurfClientError as exc:
        raise SandboxToolError(f"{exc.code}: {exc.detail}", exc.status) from exc
    return session_result(session)


def _given(**options: Any) -> dict[str, Any]:
    """Only the options the caller set: e2b-surf applies its own defaults to the rest."""
    return {key: value for key, value in options.items() if value is not None}


def register(server: MCPServer, surf: SurfApi, budget_s: int) -> None:
    """``budget_s``: e2b-surf's default time budget of a run (``E2B_SURF_TIMEOUT``)."""

    @server.tool(
        description="Open a web page in a fresh isolated browser (e2b-surf) and return its main content as "
        "Markdown and text, links, tables and a screenshot URL. follow_links=true crawls the same site up to "
        "depth link hops and max_pages pages; robots.txt is respected."
    )
    async def surf_scrape(
        url: Annotated[str, Field(description="http(s) URL to open")],
        depth: Annotated[int | None, Field(ge=0, le=10, description="Link hops when follow_links")] = None,
        follow_links: Annotated[bool | None, Field(description="Crawl links (default false: only url)")] = None,
        max_pages: Annotated[int | None, Field(ge=1, le=500)] = None,
        same_origin: Annotated[bool | None, Field(description="Only follow links to the same origin")] = None,
        formats: Annotated[list[Format] | None, Field(description="What to extract per page")] = None,
        timeout_seconds: Annotated[int | None, Field(ge=1, description="Run budget (capped by e2b-surf)")] = None,
        ctx: Context | None = None,
    ) -> CallToolResult:
        request = {"url": url, "mode": "scrape"} | _given(
            depth=depth,
            follow_links=follow_links,
            max_pages=max_pages,
            same_origin=same_origin,
            formats=formats,
            timeout=timeout_seconds,
        )
        return await _run(surf, request, budget_s, ctx, f"surf_scrape {url}")

    @server.tool(
        description="Let a computer-use agent do a task in a browser on a live desktop (e2b-surf), starting at url. "
        "Returns the outcome and every step (action, reasoning, screenshot URL); a person can watch or take over "
        "in e2b-surf's UI."
    )
    async def surf_agent(
        url: Annotated[str, Field(description="http(s) URL to start at")],
        task: Annotated[str, Field(min_length=1, description="What to do, in plain words")],
        model: Annotated[str | None, Field(description="provider:model (default: e2b-surf's)")] = None,
        max_steps: Annotated[int | None, Field(ge=1, le=500)] = None,
        timeout_seconds: Annotated[int | None, Field(ge=1, description="Run budget (capped by e2b-surf)")] = None,
        ctx: Context | None = None,
    ) -> CallToolResult:
        request = {"url": url, "mode": "agent", "task": task} | _given(
            model=model, max_steps=max_steps, timeout=timeout_seconds
        )
        return await _run(surf, request, budget_s, ctx, f"surf_agent {url}")
