"""The one NATS connection helper every service uses.

``connect(settings, name)`` returns at once: the connection is made in the background and
re-made forever (NATS is a soft dependency; a service never waits for it to start).
Credentials travel in ``NATS_URL`` (``nats://user:pass@host:4222``), or come from the embedded
server's generated secret (``embedded.client_url``); the URL is never logged.
Callbacks registered with ``on_connect`` run after every (re)connection, e.g. to ensure the
JetStream stream exists or to announce the service again after a NATS restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import nats
from nats.aio.client import Client

from pmoves_e2b.config import Settings
from pmoves_e2b.events import embedded
from pmoves_e2b.observability.metrics import NATS_CONNECTED

log = logging.getLogger(__name__)

RECONNECT_WAIT_SECONDS = 0.2
CLOSE_CANCEL_WAIT_SECONDS = 1.0
CLOSE_CANCEL_TRIES = 5

ConnectHook = Callable[[Client], Awaitable[None]]


def redact_url(url: str) -> str:
    """``nats://user:pass@host:4222`` -> ``nats://host:4222`` (for logs and status output)."""
    parts = []
    for server in url.split(","):
        split = urlsplit(server.strip())
        host = split.hostname or ""
        port = f":{split.port}" if split.port else ""
        parts.append(f"{split.scheme}://{host}{port}")
    return ",".join(parts)


class EventConnection:
    """A NATS client that keeps (re)connecting in the background until closed."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        self.client = Client()
        self._hooks: list[ConnectHook] = []
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        # Connected and every on-connect hook done since the last (re)connect: the stream exists.
        self._ready = asyncio.Event()
        self._reported_error = False

    @property
    def connected(self) -> bool:
        return self.client.is_connected

    @property
    def ready(self) -> bool:
        """Connected, and the on-connect hooks of this connection (e.g. making the stream) are done."""
        return self._ready.is_set() and self.connected

    async def wait_ready(self, timeout: float) -> bool:
        return await _wait(self._ready, timeout) and self.ready

    @property
    def status(self) -> str:
        return "connected" if self.connected else "disconnected"

    def on_connect(self, hook: ConnectHook) -> None:
        self._hooks.append(hook)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._connect_forever(), name=f"nats-connect-{self.name}")

    async def wait_connected(self, timeout: float) -> bool:
        return await _wait(self._connected, timeout) and self.connected

    async def close(self) -> None:
        # One cancel can be lost: Python 3.11's asyncio.wait_for hands back the inner result when
        # the cancel lands just as a connect attempt fails, and nats-py then tries the next one
        # (seen here about once in 300 closes while NATS is down). So cancel until the task ends.
        for _ in range(CLOSE_CANCEL_TRIES):
            if self._task is None or self._task.done():
                break
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=CLOSE_CANCEL_WAIT_SECONDS)
        else:
            log.warning("the NATS connect task of %s did not stop; leaving it to the event loop's end", self.name)
        # nats-py can only close a client whose first connect completed.
        if self._connected.is_set() and not self.client.is_closed:
            try:
                await asyncio.wait_for(self.client.close(), 2)
            except (TimeoutError, nats.errors.Error, OSError):
                log.debug("nats close did not finish cleanly")

    async def _connect_forever(self) -> None:
        # max_reconnect_attempts=-1 makes nats-py retry the *initial* connect forever too.
        await self.client.connect(
            servers=[s.strip() for s in self.url.split(",")],
            name=self.name,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            # Retries a refused connect this often: back well under a second after the server returns.
            reconnect_time_wait=RECONNECT_WAIT_SECONDS,  # type: ignore[arg-type]  # float seconds; its hint says int
            connect_timeout=2,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )
        log.info("connected to NATS", extra={"nats": redact_url(self.url)})
        NATS_CONNECTED.set(1)
        self._reported_error = False
        self._connected.set()
        await self._run_hooks()
        self._ready.set()

    async def _run_hooks(self) -> None:
        for hook in self._hooks:
            try:
                await hook(self.client)
            except Exception:  # a failing hook must not kill the connection
                log.exception("NATS on-connect hook failed")

    async def _on_error(self, exc: Exception) -> None:
        # Reported once per outage: reconnect attempts repeat every second.
        if not self._reported_error:
            self._reported_error = True
            log.warning("NATS unreachable, retrying in the background: %s", exc, extra={"nats": redact_url(self.url)})

    async def _on_disconnected(self) -> None:
        NATS_CONNECTED.set(0)
        self._ready.clear()
        if self._connected.is_set():
            log.warning("disconnected from NATS")

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS", extra={"nats": redact_url(self.url)})
        NATS_CONNECTED.set(1)
        self._reported_error = False
        await self._run_hooks()
        self._ready.set()


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True


def server_url(settings: Settings, name: str) -> str:
    """``NATS_URL``, else the embedded server with the credentials of ``name`` (a service, else ``pmoves``)."""
    if not settings.embedded_nats:
        return settings.nats_server_url
    return embedded.client_url(settings, name if name in embedded.SERVICE_USERS else embedded.CLIENT_USER)


def connect(settings: Settings, name: str) -> EventConnection:
    """Start a background connection to ``NATS_URL`` (or the embedded server). Call in a running loop."""
    connection = EventConnection(server_url(settings, name), name)
    connection.start()
    return connection


async def probe(url: str, timeout: float = 1.0) -> str | None:
    """One-shot reachability check: None when the server answers a PING, else the reason."""
    client = Client()
    try:
        await asyncio.wait_for(
            client.connect(
                servers=[s.strip() for s in url.split(",")],
                allow_reconnect=False,
                connect_timeout=timeout,  # type: ignore[arg-type]  # nats-py takes float seconds; its hint says int
                max_reconnect_attempts=0,
                error_cb=_ignore_error,
            ),
            timeout,
        )
        await client.flush(timeout=timeout)  # type: ignore[arg-type]  # as above
        return None
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        return str(exc) or type(exc).__name__
    finally:
        if not client.is_closed:
            try:
                await asyncio.wait_for(client.close(), 1)
            except (TimeoutError, nats.errors.Error, OSError):
                pass


async def _ignore_error(_: Exception) -> None:
    return None
