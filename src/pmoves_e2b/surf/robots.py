"""robots.txt rules (RFC 9309) and the polite per-host pace of scrape mode.

robots.txt is fetched through the session's browser (the scraper never opens connections of its
own), once per origin per run. As the RFC says: 2xx → its rules; 4xx (none there) → everything
allowed; 5xx or unreachable → everything disallowed. ``Crawl-delay`` raises the per-host interval
(up to ``MAX_CRAWL_DELAY_S``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit
from urllib.robotparser import RobotFileParser

USER_AGENT = "e2b-surf"
MAX_ROBOTS_BYTES = 512 * 1024  # RFC 9309: at least 500 KiB must be parsed
MAX_CRAWL_DELAY_S = 10.0

# url -> (HTTP status or None when unreachable, body)
Fetch = Callable[[str], Awaitable[tuple[int | None, str]]]


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port
    default = {"http": 80, "https": 443}.get(parts.scheme)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


@dataclass
class Rules:
    parser: RobotFileParser | None  # None: everything allowed
    disallow_all: bool = False
    why: str = "disallowed by robots.txt"

    def allowed(self, url: str) -> bool:
        if self.disallow_all:
            return False
        return True if self.parser is None else self.parser.can_fetch(USER_AGENT, url)

    def crawl_delay(self) -> float:
        if self.parser is None:
            return 0.0
        delay = self.parser.crawl_delay(USER_AGENT)
        return min(float(delay), MAX_CRAWL_DELAY_S) if delay else 0.0


def parse_rules(status: int | None, body: str) -> Rules:
    if status is None or status >= 500:
        what = "unreachable" if status is None else f"answered {status}"
        return Rules(None, disallow_all=True, why=f"robots.txt {what}: everything disallowed (RFC 9309)")
    if status >= 400:
        return Rules(None)
    parser = RobotFileParser()
    parser.parse(body[:MAX_ROBOTS_BYTES].splitlines())
    return Rules(parser)


@dataclass
class Robots:
    """robots.txt per origin, fetched with ``fetch`` on first use."""

    fetch: Fetch
    _rules: dict[str, Rules] = field(default_factory=dict)

    async def rules(self, url: str) -> Rules:
        origin = origin_of(url)
        if origin not in self._rules:
            status, body = await self.fetch(origin + "/robots.txt")
            self._rules[origin] = parse_rules(status, body)
        return self._rules[origin]

    async def allowed(self, url: str) -> bool:
        return (await self.rules(url)).allowed(url)


@dataclass
class HostPace:
    """At least ``interval_s`` (or the host's Crawl-delay) between two requests to one host.

    ``wait`` before a request, ``done`` once its answer came: the interval counts from the later
    of the two, so the host sees the gap even when one request takes longer to reach it than the next.
    """

    interval_s: float
    _last: dict[str, float] = field(default_factory=dict)

    async def wait(
        self, url: str, crawl_delay_s: float = 0.0, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    ) -> None:
        host = origin_of(url)
        gap = max(self.interval_s, crawl_delay_s)
        last = self._last.get(host)
        if last is not None:
            pause = last + gap - time.monotonic()
            if pause > 0:
                await sleep(pause)
        self._last[host] = time.monotonic()

    def done(self, url: str) -> None:
        self._last[origin_of(url)] = time.monotonic()
