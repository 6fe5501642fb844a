"""e2b-surf scrape mode: first page from a cold session, first page with a warm desktop, pages per
second on the local 20-page site, memory per surf session.

Run as root: ``.venv/bin/python bench/bench_surf_scrape.py [--runs 3] [--pool 2]``. Starts its own
stack (template ``desktop`` built, ``E2B_POOL_SIZE`` = ``--pool``) and the test site of
tests/surf/surf_site.py on port 80 of the "fake internet" netns (fixed names: not beside the
netns tests). Times are the client's, from its ``POST /api/surf`` and the session's SSE stream:

- cold session: ``POST /api/surf`` (one page, PMOVES' defaults) until the first ``page`` event;
  the session makes its desktop, starts Chromium in it and attaches over CDP, then loads the page
  (robots.txt first), extracts it, screenshots it and records it. Goal < 2 s.
- its page part: the same run from its ``running`` event (desktop and browser ready) until the
  first ``page`` event.
- warm desktop: a second stack with ``E2B_SURF_WARM_DESKTOPS=1`` (a desktop kept made, Chromium
  attached, never used); once e2b-surf reports it ready, ``POST /api/surf`` until the first
  ``page`` event. Goal < 500 ms.
- pages/s: a crawl of 20 pages of the site (``follow_links`` one hop from its ``/articles`` index,
  breadth first) from its first page event to its last; each host is paced at one request per ``HOST_INTERVAL_S`` (the ceiling).
- memory: e2b-sandbox's metrics of a session's desktop with its Chromium on a page, and the growth
  of e2b-surf's RSS (with its children: Playwright's driver) while the session runs.

Baselines from the same run: a bare desktop create through ``DesktopOps`` (what a cold session must
do before its browser); Debian's Chromium headless on the host (Playwright, already launched)
loading, extracting and screenshotting the same pages (the browser's own work, no sandbox, CDP
proxy or recording); an idle desktop's memory without a browser.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from desktop_service.desktop_harness import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from isolation.ns_harness import FAKE_INTERNET_SERVER_IP, fake_internet_netns  # noqa: E402
from measure import report, report_baseline  # noqa: E402
from playwright.async_api import async_playwright  # noqa: E402
from stack.harness import make_stack, stop_and_clean  # noqa: E402
from surf.surf_site import Site, serve_site  # noqa: E402

from pmoves_e2b.desktop.desktops import DesktopOps  # noqa: E402
from pmoves_e2b.sdk.config import build_sdk_config  # noqa: E402
from pmoves_e2b.surf.browser import RESOLUTION  # noqa: E402
from pmoves_e2b.surf.extract import extract  # noqa: E402
from pmoves_e2b.surf.scrape import HOST_INTERVAL_S  # noqa: E402

FINAL = ("completed", "failed", "stopped", "interrupted")
PMOVES_DEFAULTS = {"depth": 2, "extract_content": True, "follow_links": False}
CRAWL_PAGES = 20
METRICS_WAIT_S = 6.0  # e2b-sandbox samples a sandbox's metrics every few seconds


# The test browser's no-phone-home flags, with the fake internet's site let through.
HOST_CHROMIUM_ARGS = [
    f"{arg}, EXCLUDE {FAKE_INTERNET_SERVER_IP}" if arg.startswith("--host-resolver-rules") else arg
    for arg in CHROMIUM_ARGS
]


def line(name: str, value: float, unit: str) -> None:
    print(f"{name:46s}     {value:8.2f} {unit}", flush=True)


async def session_times(api: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    """Start a session; client times (s, from the POST) of running, each page, the end."""
    started = time.perf_counter()
    created = await api.post("/api/surf", json=body)
    if created.status_code != 202:
        raise SystemExit(f"POST /api/surf answered {created.status_code}: {created.text}")
    session_id = created.json()["session_id"]
    times: dict[str, Any] = {"session_id": session_id, "pages": [], "urls": []}
    async with api.stream("GET", f"/api/sessions/{session_id}/events", timeout=httpx.Timeout(60, read=None)) as sse:
        async for raw in sse.aiter_lines():
            if not raw.startswith("data: "):
                continue
            event = json.loads(raw[6:])
            now = time.perf_counter() - started
            if event["type"] == "state" and event["state"] == "running" and "running" not in times:
                times["running"] = now
            elif event["type"] == "page":
                times["pages"].append(now)
                times["urls"].append(event["page"]["data"].get("final_url") or event["page"]["url"])
            elif event["type"] == "state" and event["state"] in FINAL:
                times["end"], times["state"] = now, event["state"]
                break
    if times.get("state") != "completed" or not times["pages"]:
        detail = (await api.get(f"/api/sessions/{session_id}")).json().get("error")
        raise SystemExit(f"session {session_id} ended {times.get('state')}: {detail}")
    return times


async def local_browser_pages(urls: list[str], rounds: int) -> tuple[list[float], float]:
    """Host Chromium, launched once: per page load + extract + full-page PNG (ms), and pages/s."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=HOST_CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 800})

            async def one(url: str) -> None:
                await page.goto(url, wait_until="load")
                await asyncio.to_thread(extract, await page.content(), page.url, True)
                await page.screenshot(type="png", full_page=True)

            await one(urls[0])  # warm-up
            first: list[float] = []
            for _ in range(rounds):
                started = time.perf_counter()
                await one(urls[0])
                first.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            for url in urls:
                await one(url)
            rate = len(urls) / (time.perf_counter() - started)
        finally:
            await browser.close()
    return first, rate


def memory_mb(stack, sandbox_id: str) -> float:  # type: ignore[no-untyped-def]
    response = httpx.get(
        f"{stack.sandbox_url}/sandboxes/{sandbox_id}/metrics",
        headers={"X-API-KEY": stack.api_key},
        timeout=30,
        trust_env=False,
    )
    samples = response.json()
    return samples[-1]["memUsed"] / 2**20 if samples else float("nan")


def rss_mb(pid: int | None) -> float:
    """RSS of ``pid`` and its descendants (Playwright's node driver is a child of e2b-surf)."""
    if pid is None:
        return float("nan")
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total_kb, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            rows = Path(f"/proc/{current}/status").read_text().splitlines()
        except OSError:
            continue
        total_kb += sum(int(row.split()[1]) for row in rows if row.startswith("VmRSS:"))
    return total_kb / 1024


async def bench(stack, site: Site, runs: int) -> list[float]:  # type: ignore[no-untyped-def]
    ops = DesktopOps(build_sdk_config(stack.sandbox_url, stack.api_key), source="e2b-surf")
    auth = {"Authorization": f"Bearer {stack.surf_token}"}
    api = httpx.AsyncClient(base_url=stack.surf_url, headers=auth, timeout=120, trust_env=False)
    try:
        # Baseline: a bare desktop, as a session makes it (and the memory of an idle one).
        creates: list[float] = []
        idle_mb = float("nan")
        for index in range(runs):
            started = time.perf_counter()
            desktop = await ops.create(resolution=RESOLUTION, duration_s=300, created_by="bench")
            creates.append((time.perf_counter() - started) * 1000)
            if index == runs - 1:
                await asyncio.sleep(METRICS_WAIT_S)
                idle_mb = memory_mb(stack, desktop.desktop_id)
            await ops.kill(desktop.desktop_id)
            await asyncio.sleep(3)  # the warm pool refills between creates, as between sessions

        cold: list[float] = []
        ready: list[float] = []
        warm: list[float] = []
        for _ in range(runs):
            times = await session_times(api, {"url": site.url("/"), **PMOVES_DEFAULTS})
            cold.append(times["pages"][0] * 1000)
            ready.append(times["running"] * 1000)
            warm.append((times["pages"][0] - times["running"]) * 1000)
            await asyncio.sleep(3)

        crawl = await session_times(
            api, {"url": site.url("/articles"), "follow_links": True, "depth": 1, "max_pages": CRAWL_PAGES}
        )
        pages = crawl["pages"]
        crawl_rate = (len(pages) - 1) / (pages[-1] - pages[0])
        session_rate = len(pages) / crawl["end"]

        local_first, local_rate = await local_browser_pages(crawl["urls"], runs)

        report_baseline("bare desktop create (DesktopOps)", creates)
        report("cold session: POST -> first page (goal 2000)", cold, creates)
        report("  of which POST -> running (desktop+browser)", ready, creates)
        report_baseline("host Chromium: load+extract+PNG of the page", local_first)
        report("cold session: running -> first page", warm, local_first)
        print(f"{'crawl of the 20-page site':46s}     {len(pages):8d} pages", flush=True)
        line("baseline: host Chromium, same pages, pages/s", local_rate, "pages/s")
        line("baseline: pace ceiling 1/HOST_INTERVAL_S", 1 / HOST_INTERVAL_S, "pages/s")
        line("crawl pages/s (first page -> last page)", crawl_rate, "pages/s")
        line("  ratio to host Chromium", crawl_rate / local_rate, "x")
        line("crawl pages/s (whole session, from POST)", session_rate, "pages/s")

        # Memory: a session held on a page that never answers (its Chromium loaded, waiting).
        surf_pid = stack.service_pid("surf")
        rss_before = rss_mb(surf_pid)
        created = (await api.post("/api/surf", json={"url": site.url("/slow"), "timeout": 60})).json()
        session_id = created["session_id"]
        try:
            deadline = time.monotonic() + 60
            while (session := (await api.get(f"/api/sessions/{session_id}")).json())["state"] == "queued":
                if time.monotonic() > deadline:
                    raise SystemExit("the memory session never ran")
                await asyncio.sleep(0.3)
            await asyncio.sleep(METRICS_WAIT_S)
            session_mb = memory_mb(stack, session["desktop_id"])
            rss_during = rss_mb(surf_pid)
        finally:
            await api.delete(f"/api/sessions/{session_id}")
        line("baseline: idle desktop memory (no browser)", idle_mb, "MB")
        line("surf session desktop memory (Chromium on a page)", session_mb, "MB")
        line("  ratio to the idle desktop", session_mb / idle_mb, "x")
        line("e2b-surf RSS growth for the session (+children)", rss_during - rss_before, "MB")
        line("e2b-surf RSS with its children (info)", rss_during, "MB")
        return local_first
    finally:
        await api.aclose()
        ops.close()


async def bench_warm(stack, site: Site, runs: int, local_first: list[float]) -> None:  # type: ignore[no-untyped-def]
    auth = {"Authorization": f"Bearer {stack.surf_token}"}
    async with httpx.AsyncClient(base_url=stack.surf_url, headers=auth, timeout=120, trust_env=False) as api:
        first: list[float] = []
        paced: list[float] = []
        for _ in range(runs):
            deadline = time.monotonic() + 180
            while "e2b_surf_warm_desktops 1.0" not in (await api.get("/metrics")).text:
                if time.monotonic() > deadline:
                    raise SystemExit("no warm desktop got ready")
                await asyncio.sleep(0.3)
            site.clear()
            times = await session_times(api, {"url": site.url("/"), **PMOVES_DEFAULTS})
            first.append(times["pages"][0] * 1000)
            asked = {path: at for _, path, at in site.requests}
            paced.append((asked["/"] - asked["/robots.txt"]) * 1000)
        report_baseline("host Chromium: load+extract+PNG of the page", local_first)
        report("warm desktop: POST -> first page (goal 500)", first, local_first)
        report("  of which robots.txt -> page (host pace)", paced, local_first)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="cold sessions (and bare desktop creates)")
    parser.add_argument("--pool", type=int, default=2, help="E2B_POOL_SIZE of the stack (0: no warm sandboxes)")
    options = parser.parse_args()
    print(f"warm pool size {options.pool}; page times from the client (POST /api/surf + SSE)", flush=True)
    with fake_internet_netns() as netns, serve_site(netns) as site:
        stack = make_stack({"E2B_POOL_SIZE": str(options.pool), "E2B_SURF_TIMEOUT": "300"})
        try:
            stack.up()
            local_first = asyncio.run(bench(stack, site, options.runs))
        finally:
            stop_and_clean(stack)
        print("--- a stack with E2B_SURF_WARM_DESKTOPS=1", flush=True)
        env = {"E2B_POOL_SIZE": str(options.pool), "E2B_SURF_TIMEOUT": "300", "E2B_SURF_WARM_DESKTOPS": "1"}
        stack = make_stack(env)
        try:
            stack.up()
            asyncio.run(bench_warm(stack, site, options.runs, local_first))
        finally:
            stop_and_clean(stack)
    return 0


if __name__ == "__main__":
    sys.exit(main())
