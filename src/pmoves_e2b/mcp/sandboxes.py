"""Sandbox operations shared by the MCP tools and the REST routes.

Everything goes through the stock async E2B SDK classes (the event loop is never blocked),
configured only by :mod:`pmoves_e2b.sdk.config`. Failures become :class:`SandboxOpError` with a
message an agent can act on and the HTTP status the REST routes answer with.
"""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from e2b import exceptions as e2b_errors
from e2b.sandbox.commands.command_handle import CommandExitException
from e2b.sandbox.sandbox_api import SandboxInfo
from e2b_code_interpreter import AsyncSandbox
from e2b_code_interpreter.models import Execution, Result

from pmoves_e2b.observability.executions import EXECUTION_DURATION, EXECUTIONS, EXECUTIONS_FAILED
from pmoves_e2b.sdk.config import SdkConfig
from pmoves_e2b.sdk.errors import Failure, classify

CODE_INTERPRETER_TEMPLATE = "code-interpreter-v1"
BASE_TEMPLATE = "base"
# Sandboxes created implicitly by run_code/run_command (no sandbox_id given) live this long.
IMPLICIT_SANDBOX_TIMEOUT_S = 600
# Result formats copied from the code interpreter into our JSON (images stay base64).
RESULT_FORMATS = ("text", "html", "markdown", "svg", "png", "jpeg", "pdf", "latex", "json", "javascript")
IMAGE_FORMATS = {"png": "image/png", "jpeg": "image/jpeg"}
# Metadata on every sandbox this service creates (visible in sandbox_list and the E2B API).
CREATED_BY = {"created_by": "e2b-mcp-server"}
# Connected SDK objects kept for reuse.
MAX_CONNECTED = 256

OutputCallback = Callable[[str], Awaitable[None] | None]


class SandboxOpError(Exception):
    """A sandbox operation failed; ``str(self)`` tells the caller what to do next."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def not_found(sandbox_id: str) -> SandboxOpError:
    return SandboxOpError(f"sandbox {sandbox_id} was not found or has expired; create one with sandbox_create", 404)


@dataclass
class _Connected:
    sandbox: AsyncSandbox
    template: str


@dataclass
class SandboxOps:
    config: SdkConfig
    # Connected SDK objects by sandbox id, so repeated tool calls skip the connect round trip.
    _connected: dict[str, _Connected] = field(default_factory=dict)

    # ----- lifecycle -------------------------------------------------------------------

    async def create(self, template: str = CODE_INTERPRETER_TEMPLATE, timeout_s: int = 3600) -> dict[str, Any]:
        async with self._translate(None):
            sandbox = await AsyncSandbox.create(
                template=template, timeout=timeout_s, metadata=dict(CREATED_BY), **self.config.options()
            )
        self._remember(sandbox.sandbox_id, _Connected(sandbox, template))
        return {"sandbox_id": sandbox.sandbox_id, "template": template, "timeout_seconds": timeout_s}

    async def list_all(self) -> list[dict[str, Any]]:
        async with self._translate(None):
            paginator = AsyncSandbox.list(**self.config.options())
            infos = []
            while paginator.has_next:
                infos.extend(await paginator.next_items())
        return [info_to_dict(info) for info in infos]

    async def info(self, sandbox_id: str) -> dict[str, Any]:
        async with self._translate(sandbox_id):
            info = await AsyncSandbox.get_info(sandbox_id, **self.config.options())
        return info_to_dict(info)

    async def kill(self, sandbox_id: str) -> None:
        self._connected.pop(sandbox_id, None)
        async with self._translate(sandbox_id):
            killed = await AsyncSandbox.kill(sandbox_id, **self.config.options())
        if not killed:
            raise not_found(sandbox_id)

    async def set_timeout(self, sandbox_id: str, timeout_s: int) -> None:
        async with self._translate(sandbox_id):
            await AsyncSandbox.set_timeout(sandbox_id, timeout_s, **self.config.options())

    # ----- execution -------------------------------------------------------------------

    async def run_code(
        self,
        sandbox_id: str,
        code: str,
        language: str | None = None,
        timeout_s: float = 300,
        on_output: OutputCallback | None = None,
    ) -> dict[str, Any]:
        async with _measured("code") as outcome:
            result = await self._run_code(sandbox_id, code, language, timeout_s, on_output)
            outcome["failed"] = result["error"] is not None
        return result

    async def _run_code(
        self, sandbox_id: str, code: str, language: str | None, timeout_s: float, on_output: OutputCallback | None
    ) -> dict[str, Any]:
        connected = await self._connect(sandbox_id)
        if connected.template == BASE_TEMPLATE:
            raise SandboxOpError(
                f"sandbox {sandbox_id} uses template 'base', which has no code interpreter; "
                f"use run_command there, or create a code sandbox with sandbox_create",
                400,
            )

        async def forward(message: Any) -> None:
            if on_output is not None:
                outcome = on_output(str(message))
                if outcome is not None:
                    await outcome

        async with self._translate(sandbox_id):
            execution = await connected.sandbox.run_code(
                code,
                language=None if language in (None, "", "python") else language,
                on_stdout=forward,
                on_stderr=forward,
                timeout=timeout_s,
            )
        return execution_to_dict(execution)

    async def run_command(
        self,
        sandbox_id: str,
        command: str,
        timeout_s: float = 60,
        background: bool = False,
        cwd: str | None = None,
        user: str | None = None,
    ) -> dict[str, Any]:
        async with _measured("command") as outcome:
            result = await self._run_command(sandbox_id, command, timeout_s, background, cwd, user)
            outcome["failed"] = bool(result.get("exit_code"))
        return result

    async def _run_command(
        self, sandbox_id: str, command: str, timeout_s: float, background: bool, cwd: str | None, user: str | None
    ) -> dict[str, Any]:
        connected = await self._connect(sandbox_id)
        async with self._translate(sandbox_id):
            if background:
                handle = await connected.sandbox.commands.run(command, background=True, cwd=cwd, user=user, timeout=0)
                # The process keeps running in the sandbox; only our output stream is closed.
                await handle.disconnect()
                return {"pid": handle.pid, "background": True}
            try:
                result = await connected.sandbox.commands.run(command, cwd=cwd, user=user, timeout=timeout_s)
            except CommandExitException as exited:
                result = exited
        return {
            "exit_code": result.exit_code,
            "stdout": result.stdout,
            "stderr": result.stderr,
            "error": result.error,
        }

    # ----- files -----------------------------------------------------------------------

    async def read_file(self, sandbox_id: str, path: str) -> dict[str, Any]:
        connected = await self._connect(sandbox_id)
        async with self._translate(sandbox_id, path):
            data = bytes(await connected.sandbox.files.read(path, format="bytes"))
        try:
            return {"path": path, "encoding": "utf-8", "content": data.decode("utf-8"), "size": len(data)}
        except UnicodeDecodeError:
            return {"path": path, "encoding": "base64", "content": base64.b64encode(data).decode(), "size": len(data)}

    async def write_file(self, sandbox_id: str, path: str, content: str, encoding: str = "utf-8") -> dict[str, Any]:
        if encoding == "base64":
            try:
                data: bytes = base64.b64decode(content, validate=True)
            except ValueError:
                raise SandboxOpError("content is not valid base64; send encoding 'utf-8' for text", 422) from None
        elif encoding == "utf-8":
            data = content.encode("utf-8")
        else:
            raise SandboxOpError("encoding must be 'utf-8' or 'base64'", 422)
        connected = await self._connect(sandbox_id)
        async with self._translate(sandbox_id, path):
            info = await connected.sandbox.files.write(path, data)
        return {"path": info.path, "size": len(data)}

    async def list_files(self, sandbox_id: str, path: str, depth: int = 1) -> list[dict[str, Any]]:
        connected = await self._connect(sandbox_id)
        async with self._translate(sandbox_id, path):
            entries = await connected.sandbox.files.list(path, depth=depth)
        return [
            {"name": e.name, "path": e.path, "type": str(getattr(e.type, "value", e.type)), "size": e.size}
            for e in entries
        ]

    async def file_url(self, sandbox_id: str, path: str, direction: str, expires_s: int) -> dict[str, Any]:
        connected = await self._connect(sandbox_id)
        sandbox = connected.sandbox
        make_url = sandbox.upload_url if direction == "upload" else sandbox.download_url
        async with self._translate(sandbox_id, path):
            url = make_url(path, use_signature_expiration=expires_s if sandbox._envd_access_token else None)
        public_base = self.config.public_sandbox_url(sandbox_id)
        if public_base:
            # Same signed path and query, on a host e2b-sandbox routes without SDK headers.
            parts = urlsplit(url)
            url = public_base + parts.path + (f"?{parts.query}" if parts.query else "")
        how = (
            "POST the file as multipart/form-data (field 'file') to this URL"
            if direction == "upload"
            else "GET this URL to download the file"
        )
        return {"url": url, "path": path, "expires_in_seconds": expires_s, "how": how}

    # ----- helpers ---------------------------------------------------------------------

    async def _connect(self, sandbox_id: str) -> _Connected:
        cached = self._connected.get(sandbox_id)
        if cached is not None:
            return cached
        async with self._translate(sandbox_id):
            info = await AsyncSandbox.get_info(sandbox_id, **self.config.options())
            sandbox = await AsyncSandbox.connect(sandbox_id, **self.config.options())
        connected = _Connected(sandbox, info.name or info.template_id)
        self._remember(sandbox_id, connected)
        return connected

    def _remember(self, sandbox_id: str, connected: _Connected) -> None:
        if len(self._connected) >= MAX_CONNECTED:  # forget the oldest; it reconnects on use
            self._connected.pop(next(iter(self._connected)))
        self._connected[sandbox_id] = connected

    def _translate(self, sandbox_id: str | None, path: str | None = None) -> _Translate:
        return _Translate(self, sandbox_id, path)

    async def is_gone(self, sandbox_id: str) -> bool:
        """True when the backend no longer knows the sandbox (killed or expired)."""
        try:
            await AsyncSandbox.get_info(sandbox_id, **self.config.options())
        except e2b_errors.NotFoundException:
            return True
        except Exception:  # noqa: BLE001 - unreachable or erroring is not 'gone'
            return False
        return False


class _Translate:
    """Turns SDK and transport exceptions into :class:`SandboxOpError` with actionable text."""

    def __init__(self, ops: SandboxOps, sandbox_id: str | None, path: str | None) -> None:
        self.ops, self.sandbox_id, self.path = ops, sandbox_id, path

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, SandboxOpError) or not isinstance(exc, Exception):
            return False
        raise await self._translate(exc) from exc

    async def _translate(self, exc: Exception) -> SandboxOpError:
        sid = self.sandbox_id
        failure = classify(exc)
        if isinstance(exc, e2b_errors.FileNotFoundException) or (
            self.path and failure is Failure.NOT_FOUND and not await self._gone()
        ):
            return SandboxOpError(f"path {self.path} does not exist in sandbox {sid}; check it with list_files", 404)
        if sid is not None and (failure.gone or await self._gone()):
            return not_found(sid)
        if failure is Failure.AUTH:
            return SandboxOpError(
                "the sandbox backend rejected E2B_API_KEY; check the server's configuration", failure.status
            )
        if failure in (Failure.TIMEOUT, Failure.NOT_RUNNING):
            return SandboxOpError(
                f"timed out: {exc}; raise the timeout or split the work into smaller steps", failure.status
            )
        if failure is Failure.INVALID:
            return SandboxOpError(f"invalid argument: {exc}", failure.status)
        if failure is Failure.LIMIT:
            return SandboxOpError(
                f"sandbox limit reached: {exc}; kill unused sandboxes with sandbox_kill", failure.status
            )
        if failure is Failure.UNREACHABLE:
            return SandboxOpError(
                "the sandbox backend is unreachable; check that e2b-sandbox is running (pmoves-e2b status)",
                failure.status,
            )
        if failure in (Failure.SANDBOX, Failure.NOT_FOUND):
            return SandboxOpError(str(exc) or type(exc).__name__, Failure.SANDBOX.status)
        return SandboxOpError(f"sandbox backend error: {type(exc).__name__}: {exc}", failure.status)

    async def _gone(self) -> bool:
        if self.sandbox_id is None:
            return False
        gone = await self.ops.is_gone(self.sandbox_id)
        if gone:
            self.ops._connected.pop(self.sandbox_id, None)
        return gone


def info_to_dict(info: SandboxInfo) -> dict[str, Any]:
    return {
        "sandbox_id": info.sandbox_id,
        "template": info.name or info.template_id,
        "state": str(getattr(info.state, "value", info.state)),
        "started_at": info.started_at.isoformat(),
        "end_at": info.end_at.isoformat(),
        "cpu_count": info.cpu_count,
        "memory_mb": info.memory_mb,
        "metadata": info.metadata,
    }


def result_to_dict(result: Result) -> dict[str, Any]:
    data: dict[str, Any] = {fmt: getattr(result, fmt) for fmt in RESULT_FORMATS if getattr(result, fmt, None)}
    data["is_main_result"] = bool(result.is_main_result)
    return data


def execution_to_dict(execution: Execution) -> dict[str, Any]:
    error = execution.error
    return {
        "stdout": "".join(execution.logs.stdout),
        "stderr": "".join(execution.logs.stderr),
        "results": [result_to_dict(r) for r in execution.results],
        "error": None if error is None else {"name": error.name, "value": error.value, "traceback": error.traceback},
        "execution_count": execution.execution_count,
    }


@contextlib.asynccontextmanager
async def _measured(kind: str) -> AsyncIterator[dict[str, bool]]:
    """Counts one execution; the body sets ``outcome["failed"]`` when it ran but failed."""
    outcome = {"failed": False}
    started = time.monotonic()
    EXECUTIONS.labels(kind).inc()
    try:
        yield outcome
    except BaseException:
        outcome["failed"] = True
        raise
    finally:
        EXECUTION_DURATION.labels(kind).observe(time.monotonic() - started)
        if outcome["failed"]:
            EXECUTIONS_FAILED.labels(kind).inc()
