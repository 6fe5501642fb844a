"""The envd ASGI app: Connect services and plain HTTP endpoints behind one access check.

Routing is by path prefix: ``/process.Process/*`` and ``/filesystem.Filesystem/*`` go to the
connectrpc applications (generated stubs in ``gen/``), everything else to ``api/``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from connectrpc.code import Code
from connectrpc.compression.gzip import GzipCompression
from connectrpc.errors import ConnectError

from .api import files, routes
from .api.http import HTTPError, Receive, Request, Scope, Send, send_error, send_json
from .api.metrics import MetricsSampler
from .auth import ACCESS_TOKEN_HEADER, TOKEN_EXEMPT, secrets_equal
from .filesystem.service import FilesystemService
from .gen.filesystem.filesystem_connect import FilesystemASGIApplication
from .gen.process.process_connect import ProcessASGIApplication
from .process import cgroup
from .process.service import ProcessService
from .rpc import DISCONNECT_CALLBACKS, codecs
from .state import EnvdState
from .sudo import SudoServer, start_sudo_server
from .users import UnknownUserError, lookup_user, username_from_basic_auth
from .xattr_socket import XattrServer, start_xattr_server

# Largest single Connect message (a SendInput chunk, a request); file bodies go over /files.
RPC_READ_MAX_BYTES = 16 << 20


class EnvdApp:
    def __init__(self, state: EnvdState | None = None) -> None:
        self.state = state or EnvdState.from_environment()
        self.processes = ProcessService(self.state)
        self.filesystem = FilesystemService(self.state)
        self._metrics = MetricsSampler()
        self._sudo: SudoServer | None = None
        self._xattrs: XattrServer | None = None
        # gzip: accepted on requests and used for responses only when a client asks (the SDK does not).
        options: dict[str, Any] = {
            "codecs": codecs(),
            "compressions": (GzipCompression(),),
            "read_max_bytes": RPC_READ_MAX_BYTES,
        }
        self._rpc = {
            "/process.Process/": ProcessASGIApplication(self.processes, **options),  # type: ignore[arg-type]
            "/filesystem.Filesystem/": FilesystemASGIApplication(self.filesystem, **options),  # type: ignore[arg-type]
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if not self._token_ok(scope):
            await send_error(
                send, 401, "unauthorized access, please provide a valid access token or method signing if supported"
            )
            return
        for prefix, rpc_app in self._rpc.items():
            if path.startswith(prefix):
                await self._serve_rpc(rpc_app, scope, receive, send)
                return
        request = Request(scope, receive)
        try:
            await self._route(request, send)
        except HTTPError as exc:
            await send_error(send, exc.status, exc.message)

    @staticmethod
    async def _serve_rpc(rpc_app: Any, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = _basic_auth_refusal(scope)
        if refusal is not None:
            await send_json(send, 401, {"code": "unauthenticated", "message": refusal})
            return
        callbacks: list[Callable[[], None]] = []
        DISCONNECT_CALLBACKS.set(callbacks)

        async def watched_receive() -> Any:
            message = await receive()
            if message["type"] == "http.disconnect":
                for callback in callbacks:
                    callback()
            return message

        try:
            await rpc_app(scope, watched_receive, send)
        except ConnectError as exc:
            # A stream cut by the client or by shutdown: the response is already finished.
            if exc.code != Code.CANCELED:
                raise

    def _token_ok(self, scope: Scope) -> bool:
        token = self.state.access_token
        if token is None or (scope["method"], scope["path"]) in TOKEN_EXEMPT:
            return True
        for key, value in scope.get("headers", ()):
            if key.lower() == ACCESS_TOKEN_HEADER.encode():
                return secrets_equal(token, value.decode("latin-1"))
        return False

    async def _route(self, request: Request, send: Send) -> None:
        match (request.method, request.path):
            case ("GET", "/health"):
                await routes.health(send)
            case ("GET", "/files"):
                await files.download(self.state, request, send)
            case ("POST", "/files"):
                await send_json(send, 200, await files.upload(self.state, request))
            case ("GET", "/envs"):
                await routes.envs(self.state, send)
            case ("GET", "/metrics"):
                await routes.metrics(self._metrics, send)
            case ("POST", "/init"):
                await routes.init(self.state, request, send)
            case (_, "/health" | "/files" | "/envs" | "/metrics" | "/init"):
                raise HTTPError(405, f"method {request.method} not allowed on {request.path}")
            case _:
                raise HTTPError(404, f"no such endpoint: {request.path}")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._sudo = start_sudo_server()  # sudo for sandbox users (sudo.py)
                self._xattrs = start_xattr_server()  # programs' xattrs where the root refuses them
                if self.state.restored:  # the commands of the envd that died run on untracked
                    cgroup.adopt_leftovers()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._sudo is not None:
                    self._sudo.close()
                if self._xattrs is not None:
                    self._xattrs.close()
                self.processes.kill_all()
                self.filesystem.close_all()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _basic_auth_refusal(scope: Scope) -> str | None:
    """Like E2B's authn middleware: a named user must exist, for every RPC."""
    for key, value in scope.get("headers", ()):
        if key.lower() == b"authorization":
            try:
                name = username_from_basic_auth(value.decode("latin-1"))
                if name is not None:
                    lookup_user(name)
            except UnknownUserError as exc:
                return str(exc)
    return None


def create_app() -> EnvdApp:
    return EnvdApp()
