"""process.Process RPCs over the table of live processes (``ProcessHandle`` per process)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf import Oneof

from ..gen.process.process_pb import (
    CloseStdinRequest,
    CloseStdinResponse,
    ConnectRequest,
    ConnectResponse,
    ListRequest,
    ListResponse,
    ProcessEvent,
    ProcessInfo,
    ProcessInput,
    ProcessSelector,
    SendInputRequest,
    SendInputResponse,
    SendSignalRequest,
    SendSignalResponse,
    Signal,
    StartRequest,
    StartResponse,
    StreamInputRequest,
    StreamInputResponse,
    UpdateRequest,
    UpdateResponse,
)
from ..rpc import (
    connect_error,
    keepalive_interval,
    on_client_disconnect,
    request_user,
    resolve,
)
from . import cgroup
from .handle import InputError, ProcessHandle, SpawnSpec, build_env

if TYPE_CHECKING:
    from connectrpc.request import RequestContext

    from ..state import EnvdState

_KEEPALIVE = ProcessEvent.KeepAlive()
_SIGNALS = {Signal.SIGKILL: signal.SIGKILL, Signal.SIGTERM: signal.SIGTERM}


class ProcessService:
    def __init__(self, state: EnvdState) -> None:
        self._state = state
        self._processes: dict[int, ProcessHandle] = {}

    # --- helpers -------------------------------------------------------------------------

    def _find(self, selector: ProcessSelector | None) -> ProcessHandle:
        chosen = selector.selector if selector is not None else None
        if chosen is not None and chosen.field == "tag":
            for handle in self._processes.values():
                if handle.tag == chosen.value:
                    return handle
            raise ConnectError(Code.NOT_FOUND, f"process with tag {chosen.value} not found")
        pid = chosen.value if chosen is not None else 0
        found = self._processes.get(pid)
        if found is None:
            raise ConnectError(Code.NOT_FOUND, f"process with pid {pid} not found")
        return found

    def _spawn(self, request: StartRequest, ctx: RequestContext) -> ProcessHandle:
        config = request.process
        if config is None or not config.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is required")
        user = request_user(ctx, self._state)
        if os.geteuid() != 0 and not user.is_current():
            raise ConnectError(
                Code.PERMISSION_DENIED, f"envd runs as uid {os.geteuid()} and cannot run processes as '{user.name}'"
            )
        cwd = resolve(config.cwd if config.has_field("cwd") else "", user, self._state)
        if not os.path.exists(cwd):
            raise ConnectError(Code.INVALID_ARGUMENT, f"cwd '{cwd}' does not exist")
        pty_size = None
        if request.pty is not None:
            size = request.pty.size
            pty_size = (size.cols or 80, size.rows or 24) if size is not None else (80, 24)
        spec = SpawnSpec(
            cmd=config.cmd,
            args=list(config.args),
            env=build_env(user, self._state.env_vars, dict(config.envs)),
            cwd=cwd,
            user=user,
            pty_size=pty_size,
            stdin=request.stdin if request.has_field("stdin") else True,
        )
        tag = request.tag if request.has_field("tag") else None
        try:
            try:
                handle = ProcessHandle(spec, config, tag)
            except BlockingIOError:  # EAGAIN: the sandbox's pids.max is taken
                if not cgroup.reclaim_pids():
                    raise
                handle = ProcessHandle(spec, config, tag)
        except (OSError, ValueError) as exc:
            raise connect_error(exc, f"error starting process '{config.cmd}'") from exc
        self._processes[handle.pid] = handle
        handle.on_end(lambda done: self._forget(done.pid))
        return handle

    def _forget(self, pid: int) -> None:
        self._processes.pop(pid, None)

    @staticmethod
    async def _events(
        handle: ProcessHandle, queue: asyncio.Queue[ProcessEvent | None], interval: float
    ) -> AsyncIterator[ProcessEvent]:
        """Yield the start event, then data/keepalive until the end event or the client leaves."""
        on_client_disconnect(lambda: queue.put_nowait(None))
        yield ProcessEvent(event=Oneof("start", ProcessEvent.StartEvent(pid=handle.pid)))
        try:
            while True:
                try:
                    event = queue.get_nowait()
                except asyncio.QueueEmpty:
                    try:
                        async with asyncio.timeout(interval):
                            event = await queue.get()
                    except TimeoutError:
                        yield ProcessEvent(event=Oneof("keepalive", _KEEPALIVE))
                        continue
                if event is None:
                    return
                handle.resume_if_drained()
                yield event
                if event.event is not None and event.event.field == "end":
                    return
        finally:
            handle.unsubscribe(queue)

    # --- RPCs ----------------------------------------------------------------------------

    async def list(self, request: ListRequest, ctx: RequestContext) -> ListResponse:
        return ListResponse(
            processes=[ProcessInfo(config=h.config, pid=h.pid, tag=h.tag) for h in self._processes.values()]
        )

    async def start(self, request: StartRequest, ctx: RequestContext) -> AsyncIterator[StartResponse]:
        handle = self._spawn(request, ctx)
        queue = handle.subscribe()
        remaining_ms = ctx.timeout_ms
        if remaining_ms is not None:
            handle.kill_after(max(remaining_ms, 0) / 1000)
        async for event in self._events(handle, queue, keepalive_interval(ctx)):
            if handle.deadline_exceeded and event.event is not None and event.event.field == "end":
                # What Go's envd does: the stream ends with deadline_exceeded, so the SDK raises its
                # timeout error instead of reporting a "signal: killed" exit.
                raise ConnectError(Code.DEADLINE_EXCEEDED, "context deadline exceeded: the process was killed")
            yield StartResponse(event=event)

    async def connect(self, request: ConnectRequest, ctx: RequestContext) -> AsyncIterator[ConnectResponse]:
        handle = self._find(request.process)
        queue = handle.subscribe()
        async for event in self._events(handle, queue, keepalive_interval(ctx)):
            yield ConnectResponse(event=event)

    async def update(self, request: UpdateRequest, ctx: RequestContext) -> UpdateResponse:
        handle = self._find(request.process)
        if request.pty is not None and request.pty.size is not None:
            try:
                handle.resize(request.pty.size.cols, request.pty.size.rows)
            except InputError as exc:
                raise ConnectError(Code.FAILED_PRECONDITION, str(exc)) from exc
        return UpdateResponse()

    async def send_input(self, request: SendInputRequest, ctx: RequestContext) -> SendInputResponse:
        await self._deliver(self._find(request.process), request.input)
        return SendInputResponse()

    async def stream_input(
        self, request: AsyncIterator[StreamInputRequest], ctx: RequestContext
    ) -> StreamInputResponse:
        handle: ProcessHandle | None = None
        async for message in request:
            match message.event:
                case Oneof(field="start", value=start):
                    handle = self._find(start.process)
                case Oneof(field="data", value=data):
                    if handle is None:
                        raise ConnectError(Code.FAILED_PRECONDITION, "first message must be a start event")
                    await self._deliver(handle, data.input)
        return StreamInputResponse()

    async def send_signal(self, request: SendSignalRequest, ctx: RequestContext) -> SendSignalResponse:
        handle = self._find(request.process)
        sig = _SIGNALS.get(request.signal)
        if sig is None:
            raise ConnectError(Code.INVALID_ARGUMENT, f"unsupported signal: {request.signal}")
        try:
            handle.signal(sig)
        except ProcessLookupError as exc:
            raise ConnectError(Code.NOT_FOUND, f"process with pid {handle.pid} not found") from exc
        return SendSignalResponse()

    async def close_stdin(self, request: CloseStdinRequest, ctx: RequestContext) -> CloseStdinResponse:
        handle = self._find(request.process)
        try:
            handle.close_stdin()
        except InputError as exc:
            raise ConnectError(Code.FAILED_PRECONDITION, str(exc)) from exc
        return CloseStdinResponse()

    @staticmethod
    async def _deliver(handle: ProcessHandle, data: ProcessInput | None) -> None:
        try:
            match data.input if data is not None else None:
                case Oneof(field="pty", value=chunk):
                    await handle.write_pty(chunk)
                case Oneof(field="stdin", value=chunk):
                    await handle.write_stdin(chunk)
        except InputError as exc:
            raise ConnectError(Code.FAILED_PRECONDITION, str(exc)) from exc

    def kill_all(self) -> None:
        """SIGKILL every process envd started, with its process group (daemon shutdown)."""
        for handle in list(self._processes.values()):
            handle.kill_group()
