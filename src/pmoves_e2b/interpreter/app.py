"""The HTTP API the stock ``e2b_code_interpreter`` SDK calls (E2B wire protocol §9)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import envvars
from .access import AccessTokenGuard, EnvdTokenCheck
from .contexts import Context, ContextRegistry
from .execution import Execution
from .kernel import KernelStartError
from .kernelspecs import KernelCatalog, UnknownLanguageError

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass
class Settings:
    default_cwd: str = "/home/user"
    # envd.ENVD_PORT, written out: the interpreter imports nothing outside its package (a boundary test checks they agree)
    envd_url: str = "http://127.0.0.1:49983"
    keepalive_seconds: float = 5.0
    output_buffer_bytes: int = 8 * 1024 * 1024
    # Languages whose default context starts with the server (skipped when no kernel is installed).
    default_languages: tuple[str, ...] = ("python", "javascript")


class ApiError(Exception):
    """An error answered as JSON ``{code, message}`` with its HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status)


async def read_json_object(receive: Receive) -> dict[str, Any]:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError("client disconnected before sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(f"body larger than {MAX_BODY_BYTES} bytes", status=413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(f"body is not valid JSON: {error}") from error
    if not isinstance(body, dict):
        raise ApiError("body must be a JSON object")
    return body


def optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise ApiError(f"{key!r} must be a string or null", status=422)
    return value


def env_vars_field(body: dict[str, Any]) -> dict[str, str]:
    value = body.get("env_vars")
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ApiError("'env_vars' must be an object of string values", status=422)
    bad = [name for name in value if not envvars.is_valid_name(name)]
    if bad:
        raise ApiError(f"invalid env var names: {', '.join(map(repr, bad))}", status=422)
    return value


class ExecuteEndpoint:
    """POST /execute as a plain ASGI app: it streams NDJSON and watches for the client leaving."""

    def __init__(self, registry: ContextRegistry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await read_json_object(receive)
            code = body.get("code")
            if not isinstance(code, str):
                raise ApiError("'code' must be a string", status=422)
            context_id = optional_str(body, "context_id")
            language = optional_str(body, "language")
            env_vars = env_vars_field(body)
            if context_id and language:
                raise ApiError("Only one of context_id or language can be provided")
            context = await self._context(context_id, language)
        except ApiError as error:
            await error_response(error.status, str(error))(scope, receive, send)
            return

        token = dict(scope["headers"]).get(b"x-access-token")
        execution = Execution(
            context,
            code,
            env_vars,
            token.decode("latin-1") if token else None,
            self.settings.envd_url,
            self.settings.output_buffer_bytes,
        )
        execution.start()
        await self._stream(execution, receive, send)

    async def _context(self, context_id: str | None, language: str | None) -> Context:
        if context_id:
            context = self.registry.get(context_id)
            if context is None:
                raise ApiError(f"Context {context_id} not found", status=404)
            return context
        try:
            return await self.registry.default_for(language)
        except UnknownLanguageError as error:
            raise ApiError(str(error)) from error
        except (KernelStartError, NotADirectoryError) as error:
            raise ApiError(str(error), status=503) from error

    async def _stream(self, execution: Execution, receive: Receive, send: Send) -> None:
        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            execution.abandon()

        watcher = asyncio.create_task(watch_disconnect())
        finished = False
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/x-ndjson"), (b"cache-control", b"no-store")],
                }
            )
            while (line := await execution.output.get(self.settings.keepalive_seconds)) is not None:
                await send({"type": "http.response.body", "body": line, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            finished = True
        except OSError:
            pass  # the client went away mid-write
        finally:
            watcher.cancel()
            if not finished:
                execution.abandon()


def build_app(settings: Settings, catalog: KernelCatalog | None = None) -> Starlette:
    registry = ContextRegistry(catalog or KernelCatalog(), settings.default_cwd)

    async def health(request: Request) -> Response:
        return JSONResponse("OK")

    async def list_contexts(request: Request) -> Response:
        return JSONResponse([context.as_json() for context in registry.all()])

    async def create_context(request: Request) -> Response:
        try:
            body = await read_json_object(request.receive)
            context = await registry.create(optional_str(body, "language"), optional_str(body, "cwd"))
        except ApiError as error:
            return error_response(error.status, str(error))
        except (UnknownLanguageError, NotADirectoryError) as error:
            return error_response(400, str(error.args[0]))
        except KernelStartError as error:
            return error_response(503, str(error))
        return JSONResponse(context.as_json())

    async def restart_context(request: Request) -> Response:
        context_id = request.path_params["context_id"]
        try:
            found = await registry.restart(context_id)
        except KernelStartError as error:
            return error_response(503, str(error))
        if not found:
            return error_response(404, f"Context {context_id} not found")
        return JSONResponse(None)

    async def remove_context(request: Request) -> Response:
        context_id = request.path_params["context_id"]
        if not await registry.remove(context_id):
            return error_response(404, f"Context {context_id} not found")
        return JSONResponse(None)

    async def restored(request: Request) -> Response:
        # The host, once it restored this server's VM from a saved image (the microvm tier),
        # before it hands the sandbox out: from here on every context's use waits for its reseed.
        registry.restored()
        return JSONResponse(None)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Started before the server answers /health, so the first run_code finds a warm kernel.
        await registry.start_defaults(list(settings.default_languages))
        try:
            yield
        finally:
            await registry.close_all()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/execute", ExecuteEndpoint(registry, settings), methods=["POST"]),
        Route("/contexts", list_contexts, methods=["GET"]),
        Route("/contexts", create_context, methods=["POST"]),
        Route("/contexts/{context_id}/restart", restart_context, methods=["POST"]),
        Route("/contexts/{context_id}", remove_context, methods=["DELETE"]),
        Route("/restored", restored, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(AccessTokenGuard, check=EnvdTokenCheck(settings.envd_url))
    return app
