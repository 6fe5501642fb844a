"""The browser of a surf session: headed Chromium in the session's own desktop sandbox.

One desktop per session (``DesktopOps`` with source ``e2b-surf``, so e2b-desktop lists it and its
viewer shows the run live). Chromium runs in it with the DevTools protocol on 127.0.0.1:9222
(headed Chromium ignores ``--remote-debugging-address``), and a small relay in the desktop makes
that reachable on ``CDP_PORT`` of the sandbox. Playwright attaches with ``connect_over_cdp``
(one Playwright driver for all sessions of the process: starting one takes about a second)
THROUGH e2b-sandbox's proxy (``E2b-Sandbox-Id``/``-Port`` header routing with the desktop's
traffic token), never by reaching into the sandbox network. The proxy passes the Host we send
(``localhost``/an IP), which DevTools requires.

Warm desktops (``E2B_SURF_WARM_DESKTOPS``, default 0): that many desktops are kept made, their
Chromium started and attached, never used; a new session claims one (its first page then costs
only the page) and another is made behind it. A warm desktop is replaced after ``WARM_TTL_S`` and
its sandbox's duration covers that plus the longest run, so one left by a crashed e2b-surf ends on
its own. Warm desktops count against ``E2B_MAX_SANDBOXES``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import shlex
import time
from dataclasses import dataclass
from typing import Any

import httpx
from playwright.async_api import Browser, BrowserContext, CDPSession, Page, Playwright, async_playwright
from playwright.async_api import Error as PlaywrightError

from pmoves_e2b.desktop.desktops import Desktop, DesktopError, DesktopOps, parse_resolution
from pmoves_e2b.surf import metrics
from pmoves_e2b.surf.models import SurfError

log = logging.getLogger(__name__)

RESOLUTION = "1280x800"
DEVTOOLS_PORT = 9222  # Chromium's, loopback inside the desktop
CDP_PORT = 9223  # the relay's, on the sandbox address (reached only through the proxy)
PROFILE = "/home/user/.surf-chromium"  # a profile of its own: DevTools refuses the default one
START_TIMEOUT_S = 30.0
DEVTOOLS_POLL_S = 0.05  # Chromium's DevTools come up within a second: poll finely, it is the cold path
# Duration of the desktop beyond the run's timeout: a run that is killed at its deadline still
# gets its desktop removed by us; this is only the backstop if e2b-surf itself dies.
DESKTOP_SLACK_S = 120
WARM_TTL_S = 600  # a warm desktop unclaimed this long is replaced (bounds what a crash leaves)
WARM_RETRY_S = 30.0  # after a warm desktop could not be made (e.g. E2B_MAX_SANDBOXES reached)
WARM = "warm"  # the surf_session metadata of a warm desktop
# A fresh Chromium's first navigation, content() and screenshot are slow (about 0.5 s more than
# later ones); a warm desktop's browser does them once on a page of its own, no request made.
PREWARM_URL = "data:text/html,<title>ready</title><p>ready</p>"

# Forward CDP_PORT (all addresses) to Chromium's loopback DevTools port, one task per connection.
RELAY = f"""
import asyncio
async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    finally:
        w.close()
async def serve(r, w):
    try:
        ur, uw = await asyncio.open_connection("127.0.0.1", {DEVTOOLS_PORT})
    except OSError:
        w.close()
        return
    await asyncio.gather(pipe(r, uw), pipe(ur, w), return_exceptions=True)
async def main():
    server = await asyncio.start_server(serve, "0.0.0.0", {CDP_PORT})
    await server.serve_forever()
asyncio.run(main())
"""


@dataclass
class SurfBrowser:
    """A session's desktop and the Playwright objects of the Chromium running in it."""

    desktop_id: str
    ops: DesktopOps
    playwright: Playwright
    browser: Browser
    context: BrowserContext
    page: Page
    width: int
    height: int
    _cdp: CDPSession | None = None
    _frame_id: str | None = None
    _no_fetch: bool = False

    async def fetch(self, url: str, limit: int, timeout_s: float) -> tuple[int | None, bytes] | None:
        """GET ``url`` with the browser's own network stack, without navigating the page: Chromium's
        ``Network.loadNetworkResource`` (how DevTools loads source maps). Answers the HTTP status
        (None: no answer, e.g. host unreachable) and at most ``limit`` bytes of the body; None when
        this browser cannot do it (the caller navigates instead). A navigation costs a document
        of its own, torn down again by the next one, and a favicon request; this is one load."""
        if self._no_fetch:
            return None
        try:
            async with asyncio.timeout(timeout_s):
                return await self._fetch(url, limit)
        except TimeoutError:
            return None, b""  # no answer in time, as a navigation that timed out
        except PlaywrightError as exc:
            log.info("Network.loadNetworkResource unavailable, navigating instead: %s", exc)
            self._no_fetch = True
            return None

    async def html(self) -> str:
        """The page's HTML as the browser serializes its DOM (``DOM.getOuterHTML`` of the document:
        no script of the page runs, and no Playwright helper script must first be set up in each
        new document, which made ``page.content()`` cost ~40-150 ms on a page's first call)."""
        cdp = await self.cdp()
        document = await cdp.send("DOM.getDocument", {"depth": 0})
        out = await cdp.send("DOM.getOuterHTML", {"nodeId": document["root"]["nodeId"]})
        return str(out["outerHTML"])

    async def screenshot(self) -> bytes:
        """A full-page PNG: ``Page.captureScreenshot`` of the content's size beyond the viewport (what
        Playwright's full-page screenshot asks for too), with Chromium's fast PNG encoding."""
        cdp = await self.cdp()
        size = (await cdp.send("Page.getLayoutMetrics"))["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = await cdp.send(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True, "optimizeForSpeed": True, "clip": clip},
        )
        return base64.b64decode(shot["data"])

    async def cdp(self) -> CDPSession:
        """A CDP session on the page (made once) and its main frame's id."""
        if self._cdp is None:
            self._cdp = await self.context.new_cdp_session(self.page)
        if self._frame_id is None:
            tree = await self._cdp.send("Page.getFrameTree")
            self._frame_id = str(tree["frameTree"]["frame"]["id"])
        return self._cdp

    async def _fetch(self, url: str, limit: int) -> tuple[int | None, bytes]:
        cdp = await self.cdp()
        options = {"disableCache": False, "includeCredentials": False}
        loaded = await cdp.send(
            "Network.loadNetworkResource", {"frameId": self._frame_id, "url": url, "options": options}
        )
        resource = loaded["resource"]
        status = resource.get("httpStatusCode")
        stream = resource.get("stream")
        body = b""
        if stream:
            try:
                while len(body) < limit:
                    chunk = await cdp.send("IO.read", {"handle": stream, "size": limit - len(body)})
                    data = chunk.get("data", "")
                    body += base64.b64decode(data) if chunk.get("base64Encoded") else data.encode()
                    if chunk.get("eof"):
                        break
            finally:
                with contextlib.suppress(PlaywrightError):
                    await cdp.send("IO.close", {"handle": stream})
        return (int(status) if status else None), body[:limit]

    async def close(self) -> None:
        """Drop the CDP connection (Chromium goes with the desktop; the shared driver stays)."""
        with contextlib.suppress(Exception):
            await self.browser.close()


@dataclass
class _Warm:
    browser: SurfBrowser
    made: float  # time.monotonic()


class Browsers:
    """Makes and removes the desktops + browsers of surf sessions."""

    def __init__(self, ops: DesktopOps, resolution: str = RESOLUTION, warm: int = 0, max_timeout_s: int = 60) -> None:
        self.ops = ops
        self.resolution = resolution
        self.warm_size = warm
        self.max_timeout_s = max_timeout_s  # the longest run (E2B_SURF_TIMEOUT)
        self._cleanups: set[asyncio.Task[None]] = set()
        self._driver: asyncio.Task[Playwright] | None = None
        self._warm: list[_Warm] = []
        self._ready: dict[str, SurfBrowser] = {}  # desktop id -> its attached browser, until open()
        self._filler: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        """Service start: begin keeping the warm desktops."""
        if self.warm_size > 0 and self._filler is None:
            self._filler = asyncio.create_task(self._keep_warm(), name="surf-warm-desktops")

    async def _keep_warm(self) -> None:
        while True:
            self._wake.clear()
            for warm in [w for w in self._warm if time.monotonic() - w.made > WARM_TTL_S]:
                self._warm.remove(warm)
                self._discard(warm.browser)
            metrics.WARM_DESKTOPS.set(len(self._warm))
            wait_s = WARM_TTL_S / 4
            while len(self._warm) < self.warm_size:
                try:
                    self._warm.append(await self._make_warm())
                    metrics.WARM_DESKTOPS.set(len(self._warm))
                except SurfError as exc:
                    log.warning("could not make a warm surf desktop: %s", exc.message)
                    wait_s = WARM_RETRY_S
                    break
                except Exception:  # keep trying later: sessions still get cold desktops meanwhile
                    log.exception("could not make a warm surf desktop")
                    wait_s = WARM_RETRY_S
                    break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._wake.wait()

    async def _make_warm(self) -> _Warm:
        duration = min(WARM_TTL_S + self.max_timeout_s + DESKTOP_SLACK_S, self.ops.max_duration_s)
        desktop_id = await self._create(WARM, duration)
        try:
            browser = await self.open(desktop_id)
            await _prewarm(browser.page)
            await browser.cdp()  # the first robots.txt of a run then needs no set-up round trips
        except BaseException:
            await asyncio.shield(self.remove(desktop_id))
            raise
        return _Warm(browser, time.monotonic())

    def _claim(self, timeout_s: int) -> str | None:
        """A warm desktop for a run of ``timeout_s`` (its duration must outlast the run), if any."""
        while self._warm:
            warm = self._warm.pop(0)
            metrics.WARM_DESKTOPS.set(len(self._warm))
            self._wake.set()  # make the next one
            duration = min(WARM_TTL_S + self.max_timeout_s + DESKTOP_SLACK_S, self.ops.max_duration_s)
            left = duration - (time.monotonic() - warm.made)
            if left >= timeout_s + DESKTOP_SLACK_S and warm.browser.browser.is_connected():
                self._ready[warm.browser.desktop_id] = warm.browser
                return warm.browser.desktop_id
            self._discard(warm.browser)
        return None

    def _discard(self, browser: SurfBrowser) -> None:
        async def discard() -> None:
            await browser.close()
            await self.remove(browser.desktop_id)

        task = asyncio.ensure_future(discard())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    def _playwright(self) -> asyncio.Task[Playwright]:
        """The shared Playwright driver (a node process), started on first use; a failed start is
        retried by the next session."""
        if self._driver is None or (
            self._driver.done() and (self._driver.cancelled() or self._driver.exception() is not None)
        ):
            self._driver = asyncio.ensure_future(async_playwright().start())
        return self._driver

    async def close(self) -> None:
        """Service shutdown: remove the warm desktops, stop the shared driver."""
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(BaseException):
                await self._filler
            self._filler = None
        warm, self._warm = self._warm, []
        metrics.WARM_DESKTOPS.set(0)
        for browser in [w.browser for w in warm] + list(self._ready.values()):
            self._discard(browser)
        self._ready.clear()
        await self.drain(30)
        if self._driver is not None:
            driver, self._driver = self._driver, None
            with contextlib.suppress(Exception):
                await (await driver).stop()

    async def create_desktop(self, session_id: str, timeout_s: int, wait_for_session: bool = True) -> str:
        """A desktop for the session: a warm one if there is one, else a new one (XFCE's start
        not waited for unless ``wait_for_session``)."""
        claimed = self._claim(timeout_s)
        if claimed is not None:
            return claimed
        duration = min(timeout_s + DESKTOP_SLACK_S, self.ops.max_duration_s)
        return await self._create(session_id, duration, wait_for_session)

    async def _create(self, surf_session: str, duration: int, wait_for_session: bool = True) -> str:
        """A desktop with its browser attached (kept for ``open``): Chromium starts and Playwright
        attaches as soon as X answers, while XFCE starts (waited for unless ``wait_for_session``
        is false: a scrape drives the page only, and its XFCE starts once the browser is attached)."""
        self._playwright()  # the driver starts while the desktop is made
        launched: dict[str, SurfBrowser] = {}

        async def launch(desktop_id: str) -> None:
            launched[desktop_id] = await self._launch(desktop_id)

        creating = asyncio.ensure_future(
            self.ops.create(
                resolution=self.resolution,
                duration_s=duration,
                created_by="e2b-surf",
                extra_metadata={"surf_session": surf_session},
                on_display=launch,
                wait_for_session=wait_for_session,
            )
        )
        try:
            # Shielded: the SDK call goes on in its thread when the run is stopped or times out
            # meanwhile, and the desktop it makes must then be removed, not left to its duration.
            desktop = await asyncio.shield(creating)
        except asyncio.CancelledError:
            creating.add_done_callback(functools.partial(self._remove_when_made, launched))
            raise
        except DesktopError as exc:
            raise SurfError("desktop_unavailable", f"no desktop for the run: {exc.message}", 503) from None
        self._ready[desktop.desktop_id] = launched[desktop.desktop_id]
        return desktop.desktop_id

    def _remove_when_made(self, launched: dict[str, SurfBrowser], creating: asyncio.Future[Desktop]) -> None:
        if not creating.cancelled() and creating.exception() is None:
            desktop_id = creating.result().desktop_id
            self._ready[desktop_id] = launched[desktop_id]  # closed by remove()
            task = asyncio.ensure_future(self.remove(desktop_id))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)

    async def open(self, desktop_id: str) -> SurfBrowser:
        """The desktop's browser: attached while the desktop was made (a warm one's long before)."""
        ready = self._ready.pop(desktop_id, None)
        if ready is not None:
            return ready
        return await self._launch(desktop_id)

    async def _launch(self, desktop_id: str) -> SurfBrowser:
        """Start Chromium in the desktop (X is enough: no need to wait for XFCE) and attach Playwright."""
        width, height = parse_resolution(self.resolution)
        chromium = (
            f"chromium --user-data-dir={PROFILE} --remote-debugging-port={DEVTOOLS_PORT} "
            f"--window-position=0,0 --window-size={width},{height} --start-maximized "
            "--disable-session-crashed-bubble --hide-crash-restore-bubble about:blank"
        )
        relay = f"python3 -c {shlex.quote(RELAY)}"
        try:
            await self.ops.run(desktop_id, f"{chromium} >/tmp/surf-chromium.log 2>&1", background=True)
            await self.ops.run(desktop_id, f"{relay} >/tmp/surf-cdp-relay.log 2>&1", background=True)
            base, headers = await self.ops.port(desktop_id, CDP_PORT)
        except DesktopError as exc:
            raise SurfError("browser_failed", f"could not start the browser: {exc.message}", 502) from None
        await _wait_devtools(base, headers)
        try:
            # Shielded: a run cancelled meanwhile must not cancel the start other sessions share.
            playwright = await asyncio.shield(self._playwright())
        except PlaywrightError as exc:
            raise SurfError("browser_failed", f"could not start Playwright: {exc}", 502) from None
        try:
            browser = await playwright.chromium.connect_over_cdp(base, headers=headers, timeout=START_TIMEOUT_S * 1000)
        except PlaywrightError as exc:
            raise SurfError("browser_failed", f"could not attach to the browser: {exc}", 502) from None
        try:
            context = browser.contexts[0] if browser.contexts else await browser.new_context()
            page = context.pages[0] if context.pages else await context.new_page()
        except PlaywrightError as exc:
            with contextlib.suppress(Exception):
                await browser.close()
            raise SurfError("browser_failed", f"could not attach to the browser: {exc}", 502) from None
        return SurfBrowser(desktop_id, self.ops, playwright, browser, context, page, width, height)

    async def remove(self, desktop_id: str) -> None:
        """Kill the desktop (gone already is fine)."""
        claimed = self._ready.pop(desktop_id, None)
        if claimed is not None:  # stopped between claim and open
            await claimed.close()
        try:
            await self.ops.kill(desktop_id)
        except DesktopError as exc:
            if exc.status != 404:
                log.warning("could not kill surf desktop %s: %s", desktop_id, exc.message)

    async def drain(self, timeout_s: float) -> None:
        """Wait for the removals of desktops made after their run had ended."""
        if self._cleanups:
            await asyncio.wait(list(self._cleanups), timeout=timeout_s)

    async def exists(self, desktop_id: str) -> bool:
        return not await self.ops.is_gone(desktop_id)


async def _prewarm(page: Page) -> None:
    try:
        await page.goto(PREWARM_URL, wait_until="load", timeout=START_TIMEOUT_S * 1000)
        await page.content()
        await page.screenshot(type="png", full_page=True, timeout=START_TIMEOUT_S * 1000)
        await page.goto("about:blank", timeout=START_TIMEOUT_S * 1000)
    except PlaywrightError as exc:
        raise SurfError("browser_failed", f"the warm browser did not answer: {exc}", 502) from None


async def _wait_devtools(base: str, headers: dict[str, str]) -> dict[str, Any]:
    """Wait until DevTools answers ``/json/version`` through the proxy (Chromium takes a moment)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last = "no answer"
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline:
            try:
                response = await client.get(f"{base}/json/version", headers=headers)
                if response.status_code == 200:
                    return dict(response.json())
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = str(exc) or type(exc).__name__
            await asyncio.sleep(DEVTOOLS_POLL_S)
    raise SurfError("browser_failed", f"the browser's DevTools did not answer in {START_TIMEOUT_S:g} s ({last})", 502)
