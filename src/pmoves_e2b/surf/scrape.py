"""Scrape mode: load pages in the session's browser and extract what the request asks for."""

from __future__ import annotations

from typing import Any

from pmoves_e2b.surf.run import RunContext


async def run(ctx: RunContext) -> dict[str, Any]:
    ctx.check()
    response = await ctx.page.goto(ctx.request.url, wait_until="load", timeout=ctx.time_left() * 1000)
    data = {"final_url": ctx.page.url, "title": await ctx.page.title(), "status": response.status if response else None}
    await ctx.record_page(ctx.request.url, data)
    return {"pages": 1}
