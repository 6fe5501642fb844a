"""Desktops: sandboxes of template ``desktop`` driven through the official ``e2b-desktop`` SDK.

One desktop = one sandbox (the desktop id is the sandbox id). The durable record is the
sandbox itself: its E2B metadata marks it as ours (``pmoves_desktop``) and carries the
resolution, who created it and the NATS request it answers, so any process (e2b-desktop,
e2b-mcp-server) and a restarted one see the same desktops. In memory we keep only the SDK
objects and the VNC password of the stream we started (``DesktopOps``).

The ``e2b_desktop`` SDK is synchronous: its calls run on a private thread pool, never on
the event loop. Listing, info and kill use the async core ``e2b`` SDK. The SDK is configured
only by :mod:`pmoves_e2b.sdk.config`.

A desktop is booted here with the very commands the SDK's ``create`` runs (same Xvfb line, same
``startxfce4``, same process checks, as ``user``), but each wait is one command polling inside
the sandbox every ``desktop_boot.POLL_S`` instead of the SDK's client-side polls every 0.5 s, which cost
up to half a second per step. The SDK calls XFCE ready when its processes exist, about 0.3 s
before xfdesktop has drawn anything (a screenshot then is black); ours also waits for the drawn
backdrop (``_XROOTPMAP_ID`` on the root window), so the first screenshot shows the desktop.
``on_display`` lets a caller start its programs (e2b-surf: Chromium) as soon as X answers, while
XFCE starts; ``wait_for_session=False`` returns without waiting for XFCE, which then starts once
``on_display`` is done (its start, over a second of CPU at once, slowed the program the caller waits for).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shlex
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

from e2b import AsyncSandbox, SandboxQuery
from e2b import exceptions as e2b_errors
from e2b.sandbox.commands.command_handle import CommandExitException
from e2b.sandbox.sandbox_api import SandboxInfo
from e2b_desktop import Sandbox as DesktopSandbox
from e2b_desktop.main import _VNCServer

from pmoves_e2b.config import Settings
from pmoves_e2b.desktop import keymap, metrics
from pmoves_e2b.desktop.actions import (
    Click,
    DoubleClick,
    Drag,
    Key,
    Launch,
    Move,
    Open,
    Scroll,
    Type,
    Wait,
)
from pmoves_e2b.desktop.keys import parse_keys
from pmoves_e2b.desktop_boot import (
    DISPLAY,
    SESSION_READY,
    SESSION_READY_S,
    WARM_RESOLUTION,
    WARM_TEMPLATE,
    X_READY,
    X_START_S,
    until,
    xvfb,
)
from pmoves_e2b.sdk.config import SdkConfig, sdk_config
from pmoves_e2b.sdk.errors import Failure, classify

log = logging.getLogger(__name__)

TYPE_CHUNK = 50  # characters per xdotool call
POINTER_TRIES = 5  # 50 ms apart: a window that vanished under the pointer is gone by the next try

DESKTOP_TEMPLATE = "desktop"
VNC_PORT = 5900
STREAM_PORT = 6080  # noVNC's websockify inside the sandbox (the SDK's stream.start)
MARKER = "pmoves_desktop"
# xdotool types non-ASCII text only under a UTF-8 locale (C.UTF-8 is always in Debian's libc).
DESKTOP_ENVS = {"LANG": "C.UTF-8"}
SDK_THREADS = 16

P = ParamSpec("P")
R = TypeVar("R")


class DesktopError(Exception):
    """A desktop operation failed; ``message`` says what to do, ``status`` is the HTTP answer."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def not_found(desktop_id: str) -> DesktopError:
    return DesktopError(
        "not_found", f"desktop {desktop_id} was not found or has ended; create one with POST /desktops", 404
    )


def parse_resolution(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise DesktopError("invalid_resolution", f"resolution {text!r} is not WIDTHxHEIGHT, e.g. 1280x800", 422)
    w, h = int(width), int(height)
    if not (320 <= w <= 7680 and 200 <= h <= 4320):
        raise DesktopError("invalid_resolution", f"resolution {text} is outside 320x200 .. 7680x4320", 422)
    return w, h


@dataclass(frozen=True)
class Desktop:
    """A live desktop as the backend reports it."""

    desktop_id: str
    resolution: str
    started_at: datetime
    end_at: datetime
    memory_mb: int
    cpu_count: float
    metadata: dict[str, str]

    @property
    def created_by(self) -> str:
        return self.metadata.get("created_by", "")

    @property
    def request_id(self) -> str | None:
        return self.metadata.get("pmoves_request_id") or None

    def to_dict(self) -> dict[str, Any]:
        return {
            "desktop_id": self.desktop_id,
            "resolution": self.resolution,
            "started_at": self.started_at.isoformat(),
            "end_at": self.end_at.isoformat(),
            "memory_mb": self.memory_mb,
            "cpu_count": self.cpu_count,
            "created_by": self.created_by,
            "metadata": {k: v for k, v in self.metadata.items() if k != MARKER},
        }


def desktop_from_info(info: SandboxInfo) -> Desktop:
    metadata = dict(info.metadata or {})
    return Desktop(
        desktop_id=info.sandbox_id,
        resolution=metadata.get("resolution", ""),
        started_at=info.started_at,
        end_at=info.end_at,
        memory_mb=info.memory_mb,
        cpu_count=info.cpu_count,
        metadata=metadata,
    )


@dataclass(frozen=True)
class StreamTarget:
    """Where the relay reaches a desktop's VNC (noVNC's websockify in the sandbox) and its password."""

    url: str
    headers: dict[str, str]
    password: str


@dataclass
class _Live:
    sandbox: DesktopSandbox
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    vnc_password: str | None = None
    keys: keymap.Slots = field(default_factory=keymap.Slots)


@dataclass
class DesktopOps:
    config: SdkConfig
    default_resolution: str = "1920x1080"
    max_duration_s: int = 3600
    template: str = DESKTOP_TEMPLATE
    source: str = "e2b-desktop"
    # E2B_DESKTOP_WARM: desktops of WARM_RESOLUTION come from WARM_TEMPLATE, whose sandboxes the
    # warm pool keeps booted (X and XFCE up and drawn): a create is then a pool claim.
    warm: bool = False
    _live: dict[str, _Live] = field(default_factory=dict)
    _pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(SDK_THREADS, thread_name_prefix="desktop-sdk")
    )

    async def _sdk(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    # ----- lifecycle -------------------------------------------------------------------

    async def create(
        self,
        resolution: str | None = None,
        duration_s: int | None = None,
        memory_mb: int | None = None,
        cpu_count: float | None = None,
        created_by: str = "e2b-desktop",
        extra_metadata: dict[str, str] | None = None,
        on_display: Callable[[str], Awaitable[None]] | None = None,
        wait_for_session: bool = True,
    ) -> Desktop:
        """A new desktop, its XFCE session up and drawn (or only started: ``wait_for_session=False``).
        ``on_display(desktop_id)`` runs once X answers, beside XFCE's start; the create fails
        (desktop removed) when it fails."""
        resolution = resolution or self.default_resolution
        size = parse_resolution(resolution)
        duration_s = duration_s or self.max_duration_s
        if duration_s > self.max_duration_s:
            raise DesktopError(
                "invalid_duration",
                f"duration {duration_s} s exceeds E2B_DESKTOP_MAX_DURATION={self.max_duration_s} s",
                422,
            )
        metadata = {
            **(extra_metadata or {}),
            MARKER: "1",
            "resolution": f"{size[0]}x{size[1]}",
            "created_by": created_by,
        }
        started = time.monotonic()
        booted = self.warm and size == WARM_RESOLUTION and wait_for_session
        async with self._translate(None):
            sandbox = await self._sdk(
                _new_sandbox,
                template=WARM_TEMPLATE if booted else self.template,
                timeout=duration_s,
                metadata=metadata,
                envs={**DESKTOP_ENVS, "DISPLAY": DISPLAY},
                # Its ports (the VNC stream on 6080) answer only requests that carry the
                # sandbox's traffic token, which the relay sends: knowing the id is not enough.
                network={"allow_public_traffic": False},
                **self.config.options(),
            )
        if booted:  # up and drawn before the create answered
            await self._booted(sandbox, on_display)
        else:
            await self._boot(sandbox, size, on_display, wait_for_session)
        metrics.CREATE_SECONDS.observe(time.monotonic() - started)
        metrics.DESKTOPS_CREATED.labels(created_by).inc()
        desktop = await self.get(sandbox.sandbox_id)
        short = self._short_of(desktop, memory_mb, cpu_count)
        if short:
            await self.kill(desktop.desktop_id)
            raise DesktopError("insufficient_resources", short, 422)
        return desktop

    async def _booted(self, sandbox: DesktopSandbox, on_display: Callable[[str], Awaitable[None]] | None) -> None:
        """A desktop of WARM_TEMPLATE: set the SDK object as its create leaves it, run the caller's start."""
        _as_sdk_create_leaves_it(sandbox)
        self._live[sandbox.sandbox_id] = _Live(sandbox)
        if on_display is None:
            return
        try:
            await on_display(sandbox.sandbox_id)
        except BaseException:
            await self._remove_unbooted(sandbox.sandbox_id)
            raise

    async def _boot(
        self,
        sandbox: DesktopSandbox,
        size: tuple[int, int],
        on_display: Callable[[str], Awaitable[None]] | None,
        wait_for_session: bool,
    ) -> None:
        desktop_id = sandbox.sandbox_id
        self._live[desktop_id] = _Live(sandbox)
        hook: asyncio.Future[None] | None = None
        try:
            async with self._translate(None):
                await self._sdk(_start_display, sandbox, *size)
            if on_display is not None:
                hook = asyncio.ensure_future(on_display(desktop_id))
                if not wait_for_session:
                    # Nobody waits for XFCE, someone waits for the caller's program (e2b-surf's
                    # browser): XFCE's start, a second of CPU at once, would slow that program's.
                    await hook
            async with self._translate(None):
                await self._sdk(_start_xfce, sandbox, wait_for_session)
            if hook is not None:
                await hook
        except BaseException:
            if hook is not None:
                hook.cancel()
                await asyncio.gather(hook, return_exceptions=True)
            await self._remove_unbooted(desktop_id)
            raise

    async def _remove_unbooted(self, desktop_id: str) -> None:
        """As the SDK does: a desktop that did not boot is removed (even when the create was cancelled)."""
        self._live.pop(desktop_id, None)
        with contextlib.suppress(Exception):
            await asyncio.shield(AsyncSandbox.kill(desktop_id, **self.config.options()))

    @staticmethod
    def _short_of(desktop: Desktop, memory_mb: int | None, cpu_count: float | None) -> str | None:
        # Resources come from the template (the E2B API has no per-create resources): a request
        # for more than a desktop gets is refused, never silently given less.
        if memory_mb is not None and memory_mb > desktop.memory_mb:
            return f"memory_mb {memory_mb} is more than a desktop gets here ({desktop.memory_mb} MB)"
        if cpu_count is not None and cpu_count > desktop.cpu_count:
            return f"cpu {cpu_count:g} is more than a desktop gets here ({desktop.cpu_count:g})"
        return None

    async def live(self) -> list[Desktop]:
        async with self._translate(None):
            paginator = AsyncSandbox.list(query=SandboxQuery(metadata={MARKER: "1"}), **self.config.options())
            infos: list[SandboxInfo] = []
            while paginator.has_next:
                infos.extend(await paginator.next_items())
        desktops = [desktop_from_info(i) for i in infos if (i.metadata or {}).get(MARKER) == "1"]
        return sorted(desktops, key=lambda d: d.started_at, reverse=True)

    async def get(self, desktop_id: str) -> Desktop:
        async with self._translate(desktop_id):
            info = await AsyncSandbox.get_info(desktop_id, **self.config.options())
        if (info.metadata or {}).get(MARKER) != "1":
            raise not_found(desktop_id)
        return desktop_from_info(info)

    async def kill(self, desktop_id: str) -> None:
        await self.get(desktop_id)  # only our desktops, and a clear 404 for the others
        self._live.pop(desktop_id, None)
        async with self._translate(desktop_id):
            killed = await AsyncSandbox.kill(desktop_id, **self.config.options())
        if not killed:
            raise not_found(desktop_id)

    # ----- screen and input ------------------------------------------------------------

    async def screenshot(self, desktop_id: str) -> bytes:
        live = await self._attach(desktop_id)
        started = time.monotonic()
        async with self._translate(desktop_id):
            data = await self._sdk(live.sandbox.screenshot)
        metrics.SCREENSHOT_SECONDS.observe(time.monotonic() - started)
        return bytes(data)

    async def cursor(self, desktop_id: str) -> tuple[int, int]:
        live = await self._attach(desktop_id)
        async with self._translate(desktop_id):
            return await self._pointer(live.sandbox)

    async def act(self, desktop_id: str, actions: list[Any]) -> dict[str, Any]:
        """Run ``actions`` in order (one desktop's actions never interleave); answers the cursor after."""
        desktop = await self.get(desktop_id)
        width, height = parse_resolution(desktop.resolution) if desktop.resolution else (65_536, 65_536)
        for index, action in enumerate(actions):
            for x, y in _points(action):
                if x >= width or y >= height:
                    raise DesktopError(
                        "out_of_screen", f"actions[{index}]: ({x}, {y}) is outside the {width}x{height} screen", 422
                    )
        live = await self._attach(desktop_id)
        done = []
        async with live.lock, self._translate(desktop_id):
            for action in actions:
                await self._run(live, action)
                metrics.ACTIONS.labels(action.type).inc()
                done.append(action.type)
            x, y = await self._pointer(live.sandbox)
        return {"desktop_id": desktop_id, "done": done, "cursor": {"x": x, "y": y}}

    async def _move(self, sandbox: DesktopSandbox, x: int | None, y: int | None) -> None:
        """The SDK's ``move_mouse`` (``xdotool mousemove --sync``) waits ~15 s when the pointer
        is already there (xdotool 3.20160805 waits for a motion that never comes): skip that case."""
        if x is None or y is None:
            return
        if await self._pointer(sandbox) != (x, y):
            await self._sdk(sandbox.move_mouse, x, y)

    async def _pointer(self, sandbox: DesktopSandbox) -> tuple[int, int]:
        """The SDK's ``get_cursor_position`` (``xdotool getmouselocation``). Besides the position, that
        command looks up the window under the pointer (XQueryTree and XGetProperty WM_STATE up its
        parents) and dies of BadWindow when that window is destroyed meanwhile: an app that quits
        under the pointer (``ctrl+q``, the last action of a batch). It only reads, so asking again is safe."""
        for _ in range(POINTER_TRIES - 1):
            try:
                return await self._sdk(sandbox.get_cursor_position)
            except CommandExitException as exc:
                if "BadWindow" not in str(exc):
                    raise
            await asyncio.sleep(0.05)
        return await self._sdk(sandbox.get_cursor_position)

    async def _type(self, live: _Live, text: str) -> None:
        """The SDK's write, each piece's characters outside the keymap bound first (see keymap.py)."""
        for piece in keymap.pieces(text, TYPE_CHUNK):
            if any(keymap.needs_binding(char) for char in piece):
                current = await self._sdk(live.sandbox.commands.run, keymap.READ, envs={"DISPLAY": DISPLAY})
                plan, wait = live.keys.plan(keymap.parse_keymap(current.stdout), piece)
                if plan:
                    await asyncio.sleep(wait)
                    await self._sdk(live.sandbox.commands.run, keymap.bind_command(plan), envs={"DISPLAY": DISPLAY})
            await self._sdk(live.sandbox.write, piece, chunk_size=TYPE_CHUNK, delay_in_ms=12)
            live.keys.sent(piece)

    async def _run(self, live: _Live, action: Any) -> None:
        sandbox = live.sandbox
        match action:
            case Click(x=x, y=y, button=button):
                await self._move(sandbox, x, y)
                click = {"left": sandbox.left_click, "right": sandbox.right_click, "middle": sandbox.middle_click}
                await self._sdk(click[button])
            case DoubleClick(x=x, y=y):
                await self._move(sandbox, x, y)
                await self._sdk(sandbox.double_click)
            case Move(x=x, y=y):
                await self._move(sandbox, x, y)
            case Drag(from_=start, to=end):
                # The SDK's drag() moves with --sync too: same steps, without the stall.
                await self._move(sandbox, *start)
                await self._sdk(sandbox.mouse_press)
                await self._move(sandbox, *end)
                await self._sdk(sandbox.mouse_release)
            case Scroll(x=x, y=y, direction=direction, amount=amount):
                await self._move(sandbox, x, y)
                await self._sdk(sandbox.scroll, direction, amount)
            case Type(text=text):
                await self._type(live, text)
            case Key(keys=keys):
                await self._sdk(sandbox.press, parse_keys(keys))
            case Open(url=url):
                # The SDK puts the argument into a shell command unquoted.
                await self._sdk(sandbox.open, shlex.quote(url))
            case Launch(app=app, uri=uri):
                await self._sdk(sandbox.launch, app, shlex.quote(uri) if uri else None)
            case Wait(ms=ms):
                await asyncio.sleep(ms / 1000)
            case _:
                raise DesktopError("invalid_action", f"unknown action {action!r}", 422)

    # ----- the VNC stream --------------------------------------------------------------

    async def stream(self, desktop_id: str) -> StreamTarget:
        """Start the desktop's VNC stream once (SDK ``stream.start(require_auth=True)``) and say how to reach it."""
        live = await self._attach(desktop_id)
        async with live.lock, self._translate(desktop_id):
            if live.vnc_password is None:
                await self._sdk(_restart_stream, live.sandbox)
                live.vnc_password = live.sandbox.stream.get_auth_key()
            password = live.vnc_password
        url, headers = self.config.port_websocket(
            desktop_id, STREAM_PORT, "/websockify", getattr(live.sandbox, "traffic_access_token", None)
        )
        return StreamTarget(url, headers, password)

    # ----- programs in the desktop (e2b-surf runs its browser this way) ------------------

    async def run(self, desktop_id: str, command: str, background: bool = False, timeout_s: float = 60) -> str:
        """Run a shell command in the desktop (user ``user``, ``DISPLAY`` set); answers its stdout.
        A background command answers at once (empty) and lives until the desktop ends."""
        live = await self._attach(desktop_id)
        envs = {"DISPLAY": DISPLAY, **DESKTOP_ENVS}
        async with self._translate(desktop_id):
            if background:
                await self._sdk(live.sandbox.commands.run, command, background=True, envs=envs, timeout=0)
                return ""
            result = await self._sdk(live.sandbox.commands.run, command, envs=envs, timeout=timeout_s)
        stdout: str = result.stdout
        return stdout

    async def port(self, desktop_id: str, port: int) -> tuple[str, dict[str, str]]:
        """HTTP base URL and headers reaching ``port`` of the desktop through the sandbox proxy
        (with the desktop's traffic token: its ports answer nobody else)."""
        live = await self._attach(desktop_id)
        return self.config.port_http(desktop_id, port, getattr(live.sandbox, "traffic_access_token", None))

    def forget(self, desktop_id: str) -> None:
        """The desktop has ended: drop its SDK object."""
        self._live.pop(desktop_id, None)

    def forget_stream(self, desktop_id: str) -> None:
        """The stream broke (password refused, websockify gone): start it again on the next viewer."""
        live = self._live.get(desktop_id)
        if live is not None:
            live.vnc_password = None

    # ----- helpers ---------------------------------------------------------------------

    async def _attach(self, desktop_id: str) -> _Live:
        live = self._live.get(desktop_id)
        if live is not None:
            return live
        await self.get(desktop_id)
        async with self._translate(desktop_id):
            sandbox = await self._sdk(DesktopSandbox.connect, desktop_id, **self.config.options())
        # A desktop made by another process (or before a restart) needs them to take screenshots and stream.
        _as_sdk_create_leaves_it(sandbox)
        return self._live.setdefault(desktop_id, _Live(sandbox))

    def _translate(self, desktop_id: str | None) -> _Translate:
        return _Translate(self, desktop_id)

    async def is_gone(self, desktop_id: str) -> bool:
        try:
            await AsyncSandbox.get_info(desktop_id, **self.config.options())
        except e2b_errors.NotFoundException:
            return True
        except Exception:  # noqa: BLE001 - backend trouble: not proven gone
            return False
        return False

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def ops_for(settings: Settings, source: str = "e2b-desktop") -> DesktopOps:
    return DesktopOps(
        sdk_config(settings),
        default_resolution=settings.e2b_desktop_resolution,
        max_duration_s=settings.e2b_desktop_max_duration,
        source=source,
        warm=settings.e2b_desktop_warm,
    )


def _new_sandbox(**create: Any) -> DesktopSandbox:
    """The core SDK's create for a desktop object: the sandbox alone, nothing started in it yet."""
    sandbox: DesktopSandbox = super(DesktopSandbox, DesktopSandbox).create(**create)
    return sandbox


def _wait_in_sandbox(sandbox: DesktopSandbox, script: str, limit_s: int, what: str) -> None:
    try:
        sandbox.commands.run(script, timeout=limit_s + 10)
    except CommandExitException:
        raise DesktopError("timeout", f"the desktop's {what} did not start in {limit_s} s", 504) from None


def _start_display(sandbox: DesktopSandbox, width: int, height: int) -> None:
    """Xvfb as the SDK starts it (e2b-wire-protocol.md §10), and the SDK object set as its create leaves it."""
    sandbox.commands.run(xvfb(width, height), background=True, timeout=0).disconnect()
    _wait_in_sandbox(sandbox, until(X_READY, X_START_S), X_START_S, "display (Xvfb)")
    _as_sdk_create_leaves_it(sandbox)


def _as_sdk_create_leaves_it(sandbox: DesktopSandbox) -> None:
    """The SDK sets these only in its create(); our desktops always use DISPLAY."""
    sandbox._display = DISPLAY
    sandbox._Sandbox__vnc_server = _VNCServer(sandbox)


def _start_xfce(sandbox: DesktopSandbox, wait: bool) -> None:
    handle = sandbox.commands.run("startxfce4", background=True, timeout=0)
    sandbox._last_xfce4_pid = str(handle.pid)
    handle.disconnect()
    if wait:
        _wait_in_sandbox(sandbox, SESSION_READY, SESSION_READY_S, "XFCE session")


def _restart_stream(sandbox: DesktopSandbox) -> None:
    """A stream we did not start (other process, before a restart) has a password we do not know."""
    # "[n]ovnc" so that pkill -f does not match this very shell's command line. x11vnc takes
    # about a second to exit and the SDK refuses to start while it runs; port 6080 must be free.
    sandbox.commands.run(
        "pkill -x x11vnc; pkill -f '[n]ovnc_proxy'; pkill -f '[w]ebsockify'; "
        f"for i in $(seq 50); do pgrep -x x11vnc >/dev/null || netstat -tln | grep -q ':{STREAM_PORT} ' || break; "
        "sleep 0.1; done; pkill -9 -x x11vnc; true"
    )
    sandbox.stream.start(require_auth=True)


def _points(action: Any) -> list[tuple[int, int]]:
    if isinstance(action, Drag):
        return [action.from_, action.to]
    x, y = getattr(action, "x", None), getattr(action, "y", None)
    return [(x, y)] if x is not None and y is not None else []


class _Translate:
    """SDK and transport exceptions -> DesktopError; anything on a desktop that has ended is a 404."""

    def __init__(self, ops: DesktopOps, desktop_id: str | None) -> None:
        self.ops, self.desktop_id = ops, desktop_id

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        if exc is None or isinstance(exc, DesktopError) or not isinstance(exc, Exception):
            return
        raise await self._translate(exc) from exc

    async def _translate(self, exc: Exception) -> DesktopError:
        did = self.desktop_id
        failure = classify(exc)
        if did is not None and (failure.gone or await self.ops.is_gone(did)):
            self.ops._live.pop(did, None)
            return not_found(did)
        if isinstance(exc, CommandExitException):
            detail = (exc.stderr or exc.stdout or str(exc)).strip()[:300]
            return DesktopError("desktop_error", f"the desktop could not do it: {detail}", 409)
        if failure is Failure.AUTH:
            return DesktopError(
                "backend_auth", "the sandbox backend rejected E2B_API_KEY; check the configuration", failure.status
            )
        if failure in (Failure.TIMEOUT, Failure.NOT_RUNNING):
            return DesktopError("timeout", f"the desktop did not answer in time: {exc}", failure.status)
        if failure is Failure.LIMIT:
            return DesktopError("limit_reached", f"sandbox limit reached: {exc}; end unused desktops", failure.status)
        if failure is Failure.INVALID:
            return DesktopError("invalid_argument", str(exc), failure.status)
        if failure in (Failure.SANDBOX, Failure.NOT_FOUND) and "template" in str(exc).lower():
            return DesktopError(
                "template_missing",
                f"template {self.ops.template!r} is not available: {exc}; build it with "
                f"`pmoves-e2b template build {self.ops.template}`",
                503,
            )
        if failure is Failure.UNREACHABLE:
            return DesktopError(
                "backend_unreachable",
                "the sandbox backend is unreachable; check e2b-sandbox (pmoves-e2b status)",
                failure.status,
            )
        log.warning("desktop operation failed", exc_info=exc)
        return DesktopError("backend_error", f"sandbox backend error: {type(exc).__name__}: {exc}", 502)


def utcnow() -> datetime:
    return datetime.now(UTC)
