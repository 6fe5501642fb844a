"""Data-plane proxy: routes sandbox traffic arriving on the e2b-sandbox listener to a sandbox port.

``SandboxProxy`` is pure ASGI middleware placed in front of the control-plane app. A request is
data plane when its ``Host`` is ``{port}-{sandboxId}.{domain}``, or when it carries the
``E2b-Sandbox-Id`` / ``E2b-Sandbox-Port`` headers and its ``Host`` is an IP, ``localhost`` or
``sandbox.{domain}`` (the two ways the stock E2B SDKs address a sandbox); anything else goes to
the wrapped app.

Forwarding is HTTP/1.1 over raw asyncio streams framed by ``h11``, with a keep-alive pool per
sandbox port. Bodies stream both ways as they arrive (chunked uploads, hour-long server streams,
100 MB files); WebSocket upgrades are relayed message by message. The upstream address always
comes from ``resolve()``, never from the request, so clients cannot point the proxy elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import posixpath
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any, cast

import h11
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as websocket_connect

from pmoves_e2b.envd import ENVD_PORT, HOST_ONLY_PATHS
from pmoves_e2b.sandbox.aio import poll_until

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger(__name__)

SANDBOX_ID_RE = re.compile(r"[a-z0-9]{1,64}")
PORT_RE = re.compile(r"[0-9]{1,5}")
# envd paths only the host may call (configuration, pause support); never proxied from clients.
# Paths of the E2B REST API; with header routing they still reach the control plane.
TRAFFIC_TOKEN_HEADER = b"e2b-traffic-access-token"
CONTROL_PLANE_PREFIXES = ("/sandboxes", "/v2/", "/v3/", "/templates", "/snapshots", "/volumes", "/secrets")
# envd's host-only paths, first segment only, as the check below compares them
ENVD_INTERNAL_PATHS = frozenset(path.strip("/") for path in HOST_ONLY_PATHS)
# Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus the ones the
# ASGI server already acted on (Expect) or that we set ourselves (framing).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
    }
)
# The websocket client sets these itself for the upstream handshake.
WEBSOCKET_HANDSHAKE = frozenset(
    {
        b"host",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"origin",
        b"user-agent",
    }
)
READ_LIMIT = 256 * 1024
# Bodies up to this size are read whole before forwarding, so a request can be replayed
# when a pooled connection turns out to have been closed by the sandbox meanwhile.
REPLAY_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Target:
    """Where a sandbox is reachable, as the control plane knows it."""

    address: str  # the sandbox's IP (never a host name)
    state: str = "running"  # running | paused
    traffic_token: str | None = None  # when set, every request must carry it (allowPublicTraffic: false)
    host_mask: str | None = None  # maskRequestHost: the Host its servers see, ${PORT} expanded
    https_ports: frozenset[int] = frozenset()  # httpsPorts: the sandbox's server there speaks TLS

    def host_header(self, port: int) -> bytes | None:
        return self.host_mask.replace("${PORT}", str(port)).encode() if self.host_mask else None


# Where a sandbox is (None: not found); it may raise Refusal to say why a sandbox is gone.
Resolver = Callable[[str], Awaitable[Target | None]]
# Finds the sandbox a signed /files URL belongs to: (method, query string) -> sandbox id.
# It raises Refusal (envd's 401 message) when no live sandbox signed the URL.
SignedFileResolver = Callable[[str, str], Awaitable[str]]


@dataclass(frozen=True)
class Ending:
    """Why the proxy ended a sandbox's exchanges in flight, as each kind of client is told."""

    message: str  # the 502 body of a request not yet answered
    close: tuple[int, str]  # a WebSocket's close code and reason


PAUSED = Ending(
    "The sandbox was paused while this request was in flight; resume it (Sandbox.connect) and retry",
    (1001, "The sandbox was paused"),
)
KILLED = Ending("The sandbox was killed while this request was in flight", (1001, "The sandbox was killed"))


@dataclass(eq=False)
class InFlight:
    """An HTTP exchange or WebSocket with a sandbox, so a pause or a kill can end it at once instead
    of leaving it hanging on frozen processes, or on a gVisor sentry that died without closing its
    connections, until the client gives up."""

    sandbox_id: str
    upstream: Upstream | None = None
    ended: Ending | None = None
    on_end: Callable[[], None] | None = None

    def attach(self, upstream: Upstream) -> None:
        self.upstream = upstream
        if self.ended is not None:
            upstream.abort()


@dataclass(frozen=True)
class Route:
    sandbox_id: str
    port_text: str  # unvalidated: checked by ``parse_port``


class Refusal(Exception):
    """The proxy answers the request itself with a JSON error."""

    def __init__(self, status: int, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.status = status
        self.payload = {**fields, "message": message, "code": status}


def not_found(sandbox_id: str) -> Refusal:
    return Refusal(502, "The sandbox was not found", sandboxId=sandbox_id)


def port_not_open(sandbox_id: str, port: int, detail: str = "") -> Refusal:
    message = "The sandbox is running but port is not open"
    return Refusal(502, f"{message} ({detail})" if detail else message, sandboxId=sandbox_id, port=port)


# ----------------------------------------------------------------------------------------------
# Routing


def split_host(host: str) -> str:
    """The host name of a Host header value, lower-cased, without port or IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def route_request(headers: Iterable[tuple[bytes, bytes]], domain: str, path: str = "/") -> Route | None:
    """The sandbox a request is for, or None for control-plane requests.

    Header routing skips control-plane paths: the API and the sandbox URL are often the same
    origin here, and older SDKs send ``E2b-Sandbox-*`` headers on API calls too.
    """
    host: str | None = None
    sandbox_id: str | None = None
    port: str | None = None
    for name, value in headers:
        if name == b"host" and host is None:
            host = split_host(value.decode("latin-1"))
        elif name == b"e2b-sandbox-id" and sandbox_id is None:
            sandbox_id = value.decode("latin-1").strip()
        elif name == b"e2b-sandbox-port" and port is None:
            port = value.decode("latin-1").strip()
    if host is None:
        return None
    suffix = "." + domain
    if host.endswith(suffix):
        label = host[: -len(suffix)]
        if "." not in label and "-" in label:
            port_text, _, label_id = label.partition("-")
            return Route(label_id, port_text)
    if sandbox_id is not None and port is not None and not path.startswith(CONTROL_PLANE_PREFIXES):
        if host == "localhost" or host == "sandbox" + suffix or is_ip(host):
            return Route(sandbox_id, port)
    return None


def parse_port(text: str) -> int:
    if PORT_RE.fullmatch(text) and 1 <= int(text) <= 65535:
        return int(text)
    raise Refusal(400, f"Invalid sandbox port {text[:32]!r}: expected an integer from 1 to 65535")


def is_internal_envd_path(path: str) -> bool:
    """True for envd's host-only endpoints, however the path is spelled."""
    normal = posixpath.normpath("/" + path.lower()).lstrip("/")
    return normal.split("/", 1)[0] in ENVD_INTERNAL_PATHS


def check_address(address: str) -> str:
    """Refuse resolved addresses a sandbox cannot have (defence against a resolver bug)."""
    ip = ipaddress.ip_address(address)
    if ip.is_loopback or ip.is_unspecified or ip.is_link_local or ip.is_multicast:
        raise ValueError(f"{address} is not a sandbox address")
    return str(ip)


def request_headers(scope: Scope) -> tuple[list[tuple[bytes, bytes]], bool]:
    """Headers to send upstream, and whether the request has a chunked (streamed) body."""
    raw: list[tuple[bytes, bytes]] = scope["headers"]
    drop = set(HOP_BY_HOP)
    chunked = False
    for name, value in raw:
        if name == b"connection":
            drop.update(token.strip().lower() for token in value.split(b","))
        elif name == b"transfer-encoding":
            chunked = True
    headers = [(n, v) for n, v in raw if n not in drop]
    if chunked:
        headers = [(n, v) for n, v in headers if n != b"content-length"]
        headers.append((b"transfer-encoding", b"chunked"))
    return headers, chunked


def canonical(name: bytes) -> bytes:
    """``content-type`` -> ``Content-Type``: the case Go's servers (and E2B's proxy) send."""
    return b"-".join(part[:1].upper() + part[1:].lower() for part in name.split(b"-"))


def for_sandbox(headers: list[tuple[bytes, bytes]], target: Target, port: int) -> list[tuple[bytes, bytes]]:
    """Request headers as the sandbox's server sees them: canonical names and the masked Host."""
    host = target.host_header(port)
    out = []
    for name, value in headers:
        if name == b"host" and host is not None:
            value = host
        out.append((canonical(name), value))
    return out


def response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    raw = list(raw)
    drop = set(HOP_BY_HOP) | {b"date"}  # the ASGI server adds its own Date: one, not two
    for name, value in raw:
        if name == b"connection":
            drop.update(token.strip().lower() for token in value.split(b","))
    return [(n, v) for n, v in raw if n not in drop]


def declared_length(headers: Iterable[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


def request_target(scope: Scope) -> bytes:
    path: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    return path + b"?" + query if query else path


# ----------------------------------------------------------------------------------------------
# Upstream HTTP/1.1 connections


class UpstreamError(Exception):
    """The sandbox's server failed or closed the connection mid-exchange."""


class StaleConnection(Exception):
    """A pooled connection was closed by the sandbox before answering (only small,
    prefetched requests use pooled connections, so they can always be replayed)."""


class Upstream(asyncio.Protocol):
    """One HTTP/1.1 connection to a sandbox port, reusable after a complete exchange.

    A protocol rather than asyncio streams: bytes go from the socket straight into h11's
    buffer, which saves two copies per chunk of a large body. Reading pauses while more
    than READ_LIMIT bytes wait unparsed (backpressure towards the sandbox).
    """

    def __init__(self, key: tuple[asyncio.AbstractEventLoop, str, int]) -> None:
        self.key = key
        self.http = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.idle = False  # in the pool: any byte arriving now is a protocol violation
        self.reused = False
        self.closed = False
        self._eof = False
        self._unparsed = 0
        self._reading_paused = False
        self._writing_paused = False
        # One waiter per direction: the response side waits for data, the body pump for drain.
        self._readable: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None

    # -- asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:  # asyncio sets it too; explicit because latency depends on it
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.idle:
            self.abort()
            return
        self.http.receive_data(data)
        self._unparsed += len(data)
        if self._unparsed > READ_LIMIT and not self._reading_paused and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True
        _wake(self._readable)

    def eof_received(self) -> bool:
        self._feed_eof()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._feed_eof()
        _wake(self._writable)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        _wake(self._writable)

    # -- used by the proxy

    def write(self, *events: h11.Event) -> None:
        """Send events in one write, so a small request leaves as one segment."""
        data = b"".join(self.http.send(event) or b"" for event in events)
        if data and not self.closed and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        while self._writing_paused and not self.closed:
            self._writable = asyncio.get_running_loop().create_future()
            await self._writable
        if self.closed:
            raise ConnectionResetError("the sandbox closed the connection")

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.http.next_event()
            if event is not h11.NEED_DATA:  # `is not` does not narrow h11's sentinel types
                return cast("h11.Event | type[h11.PAUSED]", event)
            self._unparsed = 0
            if self._reading_paused and self.transport is not None:
                self._reading_paused = False
                self.transport.resume_reading()
            self._readable = asyncio.get_running_loop().create_future()
            await self._readable

    def alive(self) -> bool:
        return not self.closed and not self._eof

    def reusable(self) -> bool:
        # Bytes after the end of the response (a second, unasked-for response) would be read as
        # the next request's answer: such a connection is never reused.
        unread, _ = self.http.trailing_data
        return self.http.our_state is h11.DONE and self.http.their_state is h11.DONE and not unread and self.alive()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _feed_eof(self) -> None:
        if not self._eof:
            self._eof = True
            self.http.receive_data(b"")
        _wake(self._readable)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def _sandbox_tls() -> ssl.SSLContext:
    """TLS to a sandbox's httpsPorts: its certificate is its own business (self-signed as a rule),
    the client's hop is what the proxy secures."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def connect_upstream(address: str, port: int, timeout: float, tls: bool = False) -> Upstream:
    loop = asyncio.get_running_loop()
    key = (loop, address, port)
    extra: dict[str, Any] = {"ssl": _sandbox_tls(), "server_hostname": ""} if tls else {}
    _, upstream = await asyncio.wait_for(loop.create_connection(lambda: Upstream(key), address, port, **extra), timeout)
    return upstream


class UpstreamPool:
    """Keep-alive connections per (address, port), so a proxied request usually skips the handshake."""

    def __init__(self, *, connect_timeout: float, max_idle_per_target: int, idle_expiry: float) -> None:
        self.connect_timeout = connect_timeout
        self.max_idle_per_target = max_idle_per_target
        # Below the 5 s keep-alive of uvicorn-based sandbox servers, so that a pooled
        # connection is rarely closed by the other side just as it is reused.
        self.idle_expiry = idle_expiry
        self._idle: dict[tuple[asyncio.AbstractEventLoop, str, int], list[Upstream]] = {}
        self._last_sweep = time.monotonic()

    async def acquire(self, address: str, port: int, *, fresh: bool = False, tls: bool = False) -> Upstream:
        # Keyed by event loop too: one proxy may serve listeners running in different loops.
        key = (asyncio.get_running_loop(), address, port)
        now = time.monotonic()
        idle = self._idle.get(key)
        while idle and not fresh:
            upstream = idle.pop()
            if now - upstream.idle_since < self.idle_expiry and upstream.alive():
                upstream.idle = False
                upstream.reused = True
                return upstream
            upstream.abort()
        return await connect_upstream(address, port, self.connect_timeout, tls)

    def release(self, upstream: Upstream) -> None:
        now = time.monotonic()
        if now - self._last_sweep > self.idle_expiry:
            self._sweep(now)
        idle = self._idle.setdefault(upstream.key, [])
        if not upstream.reusable() or len(idle) >= self.max_idle_per_target:
            upstream.abort()
            return
        upstream.http.start_next_cycle()
        upstream.idle_since = now
        upstream.idle = True
        upstream.reused = False
        idle.append(upstream)

    def _sweep(self, now: float) -> None:
        """Close expired idle connections, e.g. to sandboxes that are gone."""
        self._last_sweep = now
        for key, idle in list(self._idle.items()):
            keep = [u for u in idle if now - u.idle_since < self.idle_expiry]
            for upstream in idle:
                if upstream not in keep:
                    upstream.abort()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def close(self) -> None:
        for idle in self._idle.values():
            for upstream in idle:
                upstream.abort()
        self._idle.clear()


class RequestBody:
    """The client's request body on its way upstream; afterwards, a watch for the client leaving.

    Small bodies of known length are read whole before the request goes out, so that it can
    be replayed on a new connection when a pooled one turns out to be closed. Chunked and
    large bodies go out as they arrive, on a fresh connection (which cannot be stale).
    """

    def __init__(self, receive: Receive, *, streamed: bool) -> None:
        self.receive = receive
        self.streamed = streamed
        self.chunks: list[bytes] = []
        self.complete = False
        self.client_gone = False
        # Set once the response is fully handed to the ASGI server, which from then on
        # answers receive() with http.disconnect although the client is still there.
        self.response_done = False

    async def prefetch(self) -> bool:
        """Read a small body whole; False if the client left meanwhile."""
        while not self.complete:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                return False
            self.complete = not message.get("more_body", False)
            if message.get("body"):
                self.chunks.append(message["body"])
        return True

    def events(self) -> list[h11.Event]:
        """A prefetched body as h11 events, sent right behind the request head."""
        return [*(h11.Data(data=chunk) for chunk in self.chunks), h11.EndOfMessage()]

    async def pump(self, upstream: Upstream) -> None:
        """Stream the body upstream if it was not prefetched, then watch for the client leaving."""
        if self.streamed:
            try:
                while not self.complete:
                    message = await self.receive()
                    if message["type"] == "http.disconnect":
                        self._client_left(upstream)
                        return
                    self.complete = not message.get("more_body", False)
                    if message.get("body"):
                        upstream.write(h11.Data(data=message["body"]))
                        await upstream.drain()
                upstream.write(h11.EndOfMessage())
                await upstream.drain()
            except (OSError, h11.LocalProtocolError):
                # The sandbox stopped reading (it answered early or closed): the response side decides.
                return
        if (await self.receive())["type"] == "http.disconnect":
            self._client_left(upstream)

    def _client_left(self, upstream: Upstream) -> None:
        if not self.response_done:
            self.client_gone = True
            upstream.abort()


# ----------------------------------------------------------------------------------------------
# The middleware


class SandboxProxy:
    """ASGI middleware: data-plane requests go to the sandbox, everything else to ``app``.

    ``resolve(sandbox_id)`` returns the sandbox's ``Target`` (resuming a paused sandbox if the
    control plane wants to) or None when there is no such sandbox.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        resolve: Resolver,
        domain: str,
        resolve_signed_file: SignedFileResolver | None = None,
        connect_timeout: float = 5.0,
        max_idle_per_target: int = 32,
        idle_expiry: float = 3.0,
    ) -> None:
        if not callable(resolve):
            raise TypeError("resolve must be an async callable: resolve(sandbox_id) -> Target | None")
        host = split_host(domain)
        if not host or "/" in host:
            raise ValueError(f"domain {domain!r} is not a host name such as 'e2b.localhost' or 'e2b.localhost:7443'")
        self.app = app
        self.resolve = resolve
        self.resolve_signed_file = resolve_signed_file
        self.domain = host
        self.connect_timeout = connect_timeout
        self.pool = UpstreamPool(
            connect_timeout=connect_timeout, max_idle_per_target=max_idle_per_target, idle_expiry=idle_expiry
        )
        self._inflight: dict[str, set[InFlight]] = {}

    def sandbox_paused(self, sandbox_id: str) -> None:
        """End the sandbox's exchanges in flight: its processes are frozen and would never answer."""
        self._end_flights(sandbox_id, PAUSED)

    def sandbox_killed(self, sandbox_id: str) -> None:
        """End the sandbox's exchanges in flight: a started response ends truncated (the SDKs then
        ask the API and report the sandbox killed), one not yet started answers 502."""
        self._end_flights(sandbox_id, KILLED)

    def _end_flights(self, sandbox_id: str, ending: Ending) -> None:
        for flight in list(self._inflight.get(sandbox_id, ())):
            flight.ended = ending
            if flight.upstream is not None:
                flight.upstream.abort()
            if flight.on_end is not None:
                flight.on_end()

    @contextlib.contextmanager
    def _tracked(self, sandbox_id: str) -> Iterator[InFlight]:
        flight = InFlight(sandbox_id)
        flights = self._inflight.setdefault(sandbox_id, set())
        flights.add(flight)
        try:
            yield flight
        finally:
            flights.discard(flight)
            if not flights:
                self._inflight.pop(sandbox_id, None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self.app(scope, receive, self._closing_on_shutdown(send))
            return
        route = route_request(scope["headers"], self.domain, scope["path"]) if kind in ("http", "websocket") else None
        if route is None and kind == "http":
            try:
                route = await self._signed_file_route(scope)
            except Refusal as refusal:
                await send_json(send, refusal.status, refusal.payload)
                return
        if route is None:
            await self.app(scope, receive, send)
        elif kind == "http":
            await self._proxy_http(scope, receive, send, route)
        else:
            await self._proxy_websocket(scope, receive, send, route)

    async def _signed_file_route(self, scope: Scope) -> Route | None:
        """``download_url()``/``upload_url()`` under E2B_SANDBOX_URL carry no sandbox id: only a signature."""
        query = scope.get("query_string", b"")
        if self.resolve_signed_file is None or scope["path"] != "/files" or b"signature=" not in query:
            return None
        sandbox_id = await self.resolve_signed_file(scope["method"], query.decode("latin-1"))
        return Route(sandbox_id, str(ENVD_PORT))

    def close(self) -> None:
        """Close pooled upstream connections (also done on lifespan shutdown)."""
        self.pool.close()

    def _closing_on_shutdown(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"].startswith("lifespan.shutdown"):
                self.close()
            await send(message)

        return wrapped

    async def _target(self, scope: Scope, route: Route) -> tuple[str, int, Target]:
        port = parse_port(route.port_text)
        if port == ENVD_PORT and is_internal_envd_path(scope["path"]):
            raise Refusal(403, "This envd path is internal to the sandbox host and cannot be reached through the proxy")
        if not SANDBOX_ID_RE.fullmatch(route.sandbox_id):
            raise not_found(route.sandbox_id[:64])
        try:
            target = await self.resolve(route.sandbox_id)
        except Refusal:  # the resolver's own answer (e.g. why a sandbox is gone)
            raise
        except Exception:
            log.exception("resolving sandbox %s failed", route.sandbox_id)
            raise Refusal(502, "The sandbox could not be looked up; try again", sandboxId=route.sandbox_id) from None
        if target is None or target.state != "running":
            raise not_found(route.sandbox_id)
        # envd has its own access token (and the SDK sends the traffic token only to other ports).
        if target.traffic_token is not None and port != ENVD_PORT:
            given = dict(scope["headers"]).get(TRAFFIC_TOKEN_HEADER, b"")
            if not hmac.compare_digest(given, target.traffic_token.encode()):
                message = "This sandbox requires the e2b-traffic-access-token header (allowPublicTraffic is false)"
                raise Refusal(403, message, sandboxId=route.sandbox_id)
        try:
            return check_address(target.address), port, target
        except ValueError:
            log.error("resolver gave address %r for sandbox %s; not connecting", target.address, route.sandbox_id)
            raise not_found(route.sandbox_id) from None

    # -- HTTP ------------------------------------------------------------------------------------

    async def _proxy_http(self, scope: Scope, receive: Receive, send: Send, route: Route) -> None:
        try:
            address, port, target = await self._target(scope, route)
            headers, chunked = request_headers(scope)
            request = h11.Request(
                method=scope["method"], target=request_target(scope), headers=for_sandbox(headers, target, port)
            )
        except Refusal as refusal:
            await send_json(send, refusal.status, refusal.payload)
            return
        except h11.LocalProtocolError as exc:
            await send_json(send, 400, {"message": f"Request cannot be forwarded: {exc}", "code": 400})
            return
        body = RequestBody(receive, streamed=chunked or declared_length(headers) > REPLAY_LIMIT)
        if not body.streamed and not await body.prefetch():
            return  # the client left
        with self._tracked(route.sandbox_id) as flight:
            await self._forward(route, address, port, request, body, send, flight, port in target.https_ports)

    async def _forward(
        self,
        route: Route,
        address: str,
        port: int,
        request: h11.Request,
        body: RequestBody,
        send: Send,
        flight: InFlight,
        tls: bool,
    ) -> None:
        fresh = body.streamed or tls  # TLS upstreams are not pooled: a slot's next sandbox may differ
        while True:
            try:
                upstream = await self.pool.acquire(address, port, fresh=fresh, tls=tls)
            except ConnectionRefusedError:
                await send_json(send, 502, port_not_open(route.sandbox_id, port).payload)
                return
            except (TimeoutError, OSError) as exc:
                detail = "connect timed out" if isinstance(exc, asyncio.TimeoutError) else str(exc.strerror or exc)
                await send_json(send, 502, port_not_open(route.sandbox_id, port, detail).payload)
                return
            flight.attach(upstream)
            try:
                await self._exchange(upstream, request, body, send)
                return
            except StaleConnection:
                if flight.ended is not None:
                    message = flight.ended.message
                    await send_json(send, 502, {"sandboxId": route.sandbox_id, "message": message, "code": 502})
                    return
                fresh = True  # a pooled connection the sandbox had closed: replay on a new one
            except UpstreamError as exc:
                if not body.client_gone:
                    message = (
                        flight.ended.message
                        if flight.ended is not None
                        else f"The sandbox closed the connection without answering ({exc})"
                    )
                    await send_json(send, 502, {"sandboxId": route.sandbox_id, "message": message, "code": 502})
                return

    async def _exchange(self, upstream: Upstream, request: h11.Request, body: RequestBody, send: Send) -> None:
        """One request/response over ``upstream``; the connection goes back to the pool if clean."""
        started = False
        pump: asyncio.Task[None] | None = None
        try:
            upstream.write(request, *([] if body.streamed else body.events()))
            pump = asyncio.create_task(body.pump(upstream))
            while True:
                try:
                    event = await upstream.next_event()
                    if isinstance(event, h11.ConnectionClosed):
                        raise UpstreamError("connection closed before the response ended")
                except (h11.RemoteProtocolError, UpstreamError) as exc:
                    if body.client_gone:
                        return
                    if started:
                        # Returning without ending the response makes the ASGI server drop the
                        # client connection, so the client sees a truncated body, not a short one.
                        log.warning("sandbox %s:%s broke off a response: %s", *upstream.key[1:], exc)
                        return
                    if upstream.reused:
                        raise StaleConnection from exc
                    raise UpstreamError(str(exc)) from exc
                if isinstance(event, h11.Response):
                    started = True
                    headers = response_headers(event.headers)
                    await send({"type": "http.response.start", "status": event.status_code, "headers": headers})
                elif isinstance(event, h11.Data):
                    await send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
                elif isinstance(event, h11.EndOfMessage):
                    body.response_done = True
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                # InformationalResponse (100 Continue): the ASGI server already answered the client.
        finally:
            if pump is not None and not pump.done():
                pump.cancel()
            self.pool.release(upstream)

    # -- WebSocket -------------------------------------------------------------------------------

    async def _proxy_websocket(self, scope: Scope, receive: Receive, send: Send, route: Route) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        try:
            address, port, target = await self._target(scope, route)
            upstream = await self._open_websocket(scope, address, port, route.sandbox_id, target)
        except Refusal as refusal:
            await refuse_websocket(scope, send, refusal)
            return
        except websockets.InvalidStatus as exc:
            await forward_refused_handshake(scope, send, exc.response)
            return
        async with upstream:
            with self._tracked(route.sandbox_id) as flight:
                flight.on_end = upstream.transport.abort
                await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
                await relay_websocket(upstream, receive, send, lambda: flight.ended)

    async def _open_websocket(
        self, scope: Scope, address: str, port: int, sandbox_id: str, target: Target
    ) -> ClientConnection:
        headers = request_headers(scope)[0]
        passed = [
            (n.decode("latin-1"), v.decode("latin-1"))
            for n, v in for_sandbox([h for h in headers if h[0] not in WEBSOCKET_HANDSHAKE], target, port)
        ]
        original = dict(headers)
        host = f"[{address}]" if ":" in address else address
        uri = f"ws://{host}:{port}{request_target(scope).decode('latin-1')}"
        try:
            return await websocket_connect(
                uri,
                additional_headers=passed,
                origin=original[b"origin"].decode("latin-1") if b"origin" in original else None,  # type: ignore
                user_agent_header=original.get(b"user-agent", b"").decode("latin-1") or None,
                subprotocols=scope.get("subprotocols") or None,
                compression=None,  # the client hop negotiates its own compression
                max_size=None,
                ping_interval=None,
                proxy=None,  # never route through an environment-configured proxy
                open_timeout=self.connect_timeout,
            )
        except websockets.InvalidStatus:
            raise  # the sandbox answered, just not with an upgrade: the caller shows its answer
        except ConnectionRefusedError:
            raise port_not_open(sandbox_id, port) from None
        except (TimeoutError, OSError, websockets.InvalidHandshake) as exc:
            raise port_not_open(sandbox_id, port, type(exc).__name__) from None


async def send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def refuse_websocket(scope: Scope, send: Send, refusal: Refusal) -> None:
    if "websocket.http.response" in scope.get("extensions", {}):
        body = json.dumps(refusal.payload).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "websocket.http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
    else:
        await send({"type": "websocket.close", "code": 1011, "reason": refusal.payload["message"][:120]})


async def forward_refused_handshake(scope: Scope, send: Send, response: Any) -> None:
    """The sandbox's server declined the upgrade: show the client its HTTP answer."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1011, "reason": f"upstream answered {response.status_code}"})
        return
    headers = [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in response.headers.raw_items()]
    headers = [(n, v) for n, v in response_headers(headers) if n != b"content-length"]
    await send({"type": "websocket.http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": bytes(response.body or b""), "more_body": False})


async def relay_websocket(
    upstream: ClientConnection, receive: Receive, send: Send, ended: Callable[[], Ending | None] = lambda: None
) -> None:
    """Copy messages both ways until either side closes, then close the other side alike."""

    async def client_to_sandbox() -> bool:
        """Returns True when the client left, False when the sandbox side broke."""
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.receive":
                    data = message.get("bytes")
                    await upstream.send(data if data is not None else message.get("text", ""))
                elif message["type"] == "websocket.disconnect":
                    code = message.get("code", 1000)
                    await upstream.close(code if code not in (1005, 1006) else 1000, message.get("reason") or "")
                    return True
        except websockets.ConnectionClosed:
            return False

    async def sandbox_to_client() -> None:
        try:
            async for data in upstream:
                if isinstance(data, bytes):
                    await send({"type": "websocket.send", "bytes": data})
                else:
                    await send({"type": "websocket.send", "text": data})
        except websockets.ConnectionClosed:
            pass
        code = upstream.close_code if upstream.close_code not in (None, 1005, 1006) else 1000
        reason = upstream.close_reason or ""
        if (ending := ended()) is not None:
            code, reason = ending.close
        await send({"type": "websocket.close", "code": code, "reason": reason})

    to_sandbox = asyncio.create_task(client_to_sandbox())
    to_client = asyncio.create_task(sandbox_to_client())
    try:
        await asyncio.wait((to_sandbox, to_client), return_when=asyncio.FIRST_COMPLETED)
        if to_sandbox.done() and not to_sandbox.result():
            # The sandbox closed while the client was sending: pass its close code on.
            await asyncio.wait((to_client,), timeout=5)
    finally:
        for task in (to_sandbox, to_client):
            task.cancel()
        await asyncio.gather(to_sandbox, to_client, return_exceptions=True)


# ----------------------------------------------------------------------------------------------
# Ready check


async def wait_port(address: str, port: int, path: str = "/health", timeout: float = 10.0) -> bool:
    """Poll ``GET http://address:port/path`` until it answers 2xx; False if ``timeout`` passes first."""

    async def answers() -> bool:
        try:
            return await _probe(address, port, path)
        except h11.ProtocolError:
            return False

    return await poll_until(answers, timeout)


async def _probe(address: str, port: int, path: str) -> bool:
    upstream = await connect_upstream(address, port, 2.0)
    try:
        host = f"[{address}]" if ":" in address else address
        head = h11.Request(method="GET", target=path, headers=[("host", f"{host}:{port}"), ("connection", "close")])
        upstream.write(head, h11.EndOfMessage())
        event = await upstream.next_event()
        return isinstance(event, h11.Response) and 200 <= event.status_code < 300
    finally:
        upstream.abort()
