"""Scrape mode: crawl from ``url`` in the session's browser and extract each page.

Breadth first: ``url`` is depth 0; with ``follow_links`` the links of a page at depth d < ``depth``
are visited at depth d+1 (only ``url``'s origin when ``same_origin``), until ``max_pages`` pages
were loaded. robots.txt is obeyed for every page (``url`` included) and each host gets at most one
page request per ``HOST_INTERVAL_S`` (or its Crawl-delay); the robots.txt fetch itself, one small
file per host before its first page, is not paced (a browser opening one page asks for far more
at once), so a run's first page follows it at once. Per page, as ``formats`` asks: final URL,
title, HTTP status, main content as Markdown and text (readability unless ``extract_content`` is
false), its HTML, links, tables, a full-page PNG screenshot; large values become files.

A page that cannot be loaded is recorded with its ``error`` and the crawl goes on; pages skipped
(robots.txt, other origin) are steps of kind ``skip``; every visit is a step of kind ``visit``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any
from urllib.parse import urldefrag, urlsplit

from playwright.async_api import Error as PlaywrightError

from pmoves_e2b.surf.browser import SurfBrowser
from pmoves_e2b.surf.extract import Extracted, extract
from pmoves_e2b.surf.robots import MAX_ROBOTS_BYTES, HostPace, Robots, origin_of
from pmoves_e2b.surf.run import RunContext

HOST_INTERVAL_S = 0.25
NAV_TIMEOUT_S = 30.0
SCREENSHOT_TIMEOUT_S = 15.0
MAX_ERROR = 500


def _normal(url: str) -> str:
    return urldefrag(url)[0]


def _short(exc: Exception) -> str:
    # Playwright's messages carry a call log after the first line.
    return str(exc).strip().splitlines()[0][:MAX_ERROR] if str(exc).strip() else type(exc).__name__


class Scraper:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.request = ctx.request
        self.pace = HostPace(HOST_INTERVAL_S)
        self.robots = Robots(self._fetch_robots)
        self.origin = origin_of(self.request.url)
        self.loaded = 0
        self.failed = 0
        self.skipped: list[dict[str, str]] = []

    def _nav_timeout_ms(self) -> float:
        return max(1.0, min(NAV_TIMEOUT_S, self.ctx.time_left())) * 1000

    async def _fetch_robots(self, url: str) -> tuple[int | None, str]:
        """robots.txt through the browser (its network, its proxy settings, nothing of ours); not paced.
        Loaded without a navigation when the browser can (one load instead of a document)."""
        fetched = await self.ctx.browser.fetch(
            url, MAX_ROBOTS_BYTES, max(1.0, min(NAV_TIMEOUT_S, self.ctx.time_left()))
        )
        if fetched is not None:
            status, body = fetched
            return status, body.decode("utf-8", errors="replace")
        try:
            # Its answer is all we need: no waiting for the browser to render the text as a page.
            response = await self.ctx.page.goto(url, wait_until="commit", timeout=self._nav_timeout_ms())
            if response is None:
                return None, ""
            return response.status, await response.text()
        except PlaywrightError:
            return None, ""

    async def run(self) -> dict[str, Any]:
        queue: deque[tuple[str, int]] = deque([(_normal(self.request.url), 0)])
        seen = {queue[0][0]}
        depth_reached = 0
        while queue and self.loaded + self.failed < self.request.max_pages:
            self.ctx.check()
            url, depth = queue.popleft()
            rules = await self.robots.rules(url)
            if not rules.allowed(url):
                await self._skip(url, depth, rules.why)
                continue
            await self.pace.wait(url, rules.crawl_delay(), sleep=self.ctx.sleep)
            # The visit step is stored while the page loads (it is recorded before the page).
            visit = asyncio.ensure_future(self.ctx.record_step("visit", {"url": url, "depth": depth}))
            try:
                links = await self._visit(url, depth, visit)
            finally:
                if not visit.done():
                    await asyncio.gather(visit, return_exceptions=True)
            depth_reached = max(depth_reached, depth)
            if not (self.request.follow_links and depth < self.request.depth):
                continue
            for link in links:
                target = _normal(link)
                if target in seen:
                    continue
                seen.add(target)
                if self.request.same_origin and origin_of(target) != self.origin:
                    await self._skip(target, depth + 1, "other origin")
                    continue
                queue.append((target, depth + 1))
        return {
            "start_url": self.request.url,
            "pages": self.loaded,
            "failed_pages": self.failed,
            "skipped": self.skipped,
            "depth_reached": depth_reached,
            "not_visited": len(queue),
        }

    async def _skip(self, url: str, depth: int, reason: str) -> None:
        self.skipped.append({"url": url, "reason": reason})
        await self.ctx.record_step("skip", {"url": url, "depth": depth, "reason": reason})

    async def _visit(self, url: str, depth: int, visit: asyncio.Future[Any]) -> list[str]:
        """Load and record one page (after its ``visit`` step); answers its links (to follow)."""
        page = self.ctx.page
        index = self.loaded + self.failed
        try:
            response = await page.goto(url, wait_until="load", timeout=self._nav_timeout_ms())
        except PlaywrightError as exc:
            self.pace.done(url)
            self.failed += 1
            await visit
            await self.ctx.record_page(url, {"depth": depth, "error": {"code": "load_failed", "message": _short(exc)}})
            return []
        self.pace.done(url)
        self.ctx.check()
        data: dict[str, Any] = {"depth": depth, "final_url": page.url, "status": response.status if response else None}
        formats = set(self.request.formats)
        # The screenshot is taken while the page's HTML is read and extracted (the cold path's page part).
        shooting = asyncio.ensure_future(_screenshot(self.ctx.browser)) if "screenshot" in formats else None
        try:
            content_type = response.headers.get("content-type", "") if response else ""
            html = await _html(self.ctx.browser)
            extracted: Extracted = await asyncio.to_thread(
                extract, html, page.url, self.request.extract_content and ("html" in content_type or not content_type)
            )
            data["title"] = extracted.title or await page.title()
        except BaseException:
            if shooting is not None:
                shooting.cancel()
            raise
        if "markdown" in formats:
            data["markdown"] = await self.ctx.spill(f"page-{index:04d}.md", extracted.markdown)
        if "text" in formats:
            data["text"] = await self.ctx.spill(f"page-{index:04d}.txt", extracted.text)
        if "html" in formats:
            data["html"] = await self.ctx.spill(f"page-{index:04d}.html", extracted.html)
        if "links" in formats:
            data["links"] = extracted.links
        if "tables" in formats:
            data["tables"] = extracted.tables
        if shooting is not None:
            png = await shooting
            if isinstance(png, bytes):
                data["screenshot"] = await self.ctx.save_file(f"page-{index:04d}.png", png)
            else:
                data["screenshot_error"] = png
        self.loaded += 1
        await visit
        await self.ctx.record_page(url, data)
        return [link["url"] for link in extracted.links if urlsplit(link["url"]).scheme in ("http", "https")]


async def _html(browser: SurfBrowser) -> str:
    try:
        return await browser.html()
    except PlaywrightError:  # e.g. the document went away meanwhile: Playwright's way waits for the next
        return await browser.page.content()


async def _screenshot(browser: SurfBrowser) -> bytes | str:
    """A full-page PNG, or why there is none."""
    try:
        async with asyncio.timeout(SCREENSHOT_TIMEOUT_S):
            return await browser.screenshot()
    except (PlaywrightError, TimeoutError):
        pass
    try:  # Playwright's own way (it also waits for web fonts)
        return await browser.page.screenshot(type="png", full_page=True, timeout=SCREENSHOT_TIMEOUT_S * 1000)
    except PlaywrightError as exc:
        return _short(exc)


async def run(ctx: RunContext) -> dict[str, Any]:
    return await Scraper(ctx).run()
