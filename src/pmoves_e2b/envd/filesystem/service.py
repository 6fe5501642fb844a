"""filesystem.Filesystem RPCs. Paths resolve like process cwds: ``~``, relative → user's home."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf import Oneof

from .. import file_metadata
from ..gen.filesystem.filesystem_pb import (
    CreateWatcherRequest,
    CreateWatcherResponse,
    EntryInfo,
    FilesystemEvent,
    FileType,
    GetWatcherEventsRequest,
    GetWatcherEventsResponse,
    ListDirRequest,
    ListDirResponse,
    MakeDirRequest,
    MakeDirResponse,
    MoveRequest,
    MoveResponse,
    RemoveRequest,
    RemoveResponse,
    RemoveWatcherRequest,
    RemoveWatcherResponse,
    StatRequest,
    StatResponse,
    WatchDirRequest,
    WatchDirResponse,
)
from ..rpc import (
    connect_error,
    keepalive_interval,
    on_client_disconnect,
    request_user,
    resolve,
)
from ..users import ensure_dirs
from .entry import entry_info
from .watch import Watcher, is_network_mount

if TYPE_CHECKING:
    from connectrpc.request import RequestContext

    from ..state import EnvdState

MAX_PENDING_WATCH_EVENTS = 10_000


class _PolledWatcher:
    """A watcher whose events wait in a buffer until ``GetWatcherEvents`` collects them."""

    def __init__(self) -> None:
        self.events: list[FilesystemEvent] = []
        self.watcher: Watcher | None = None

    def push(self, event: FilesystemEvent) -> None:
        if len(self.events) < MAX_PENDING_WATCH_EVENTS:
            self.events.append(event)


class FilesystemService:
    def __init__(self, state: EnvdState) -> None:
        self._state = state
        self._watchers: dict[str, _PolledWatcher] = {}

    def _path(self, raw: str, ctx: RequestContext) -> str:
        return resolve(raw, request_user(ctx, self._state), self._state)

    async def stat(self, request: StatRequest, ctx: RequestContext) -> StatResponse:
        path = self._path(request.path, ctx)
        try:
            return StatResponse(entry=entry_info(path))
        except (OSError, ValueError) as exc:
            raise connect_error(exc, f"error getting file info for '{path}'") from exc

    async def make_dir(self, request: MakeDirRequest, ctx: RequestContext) -> MakeDirResponse:
        user = request_user(ctx, self._state)
        path = resolve(request.path, user, self._state)
        if os.path.isdir(path):
            raise ConnectError(Code.ALREADY_EXISTS, f"directory already exists: {path}")
        if os.path.lexists(path):
            raise ConnectError(Code.INVALID_ARGUMENT, f"path already exists but it is not a directory: {path}")
        try:
            ensure_dirs(path, user)
        except NotADirectoryError as exc:
            raise ConnectError(Code.INVALID_ARGUMENT, str(exc)) from exc
        except (OSError, ValueError) as exc:
            raise connect_error(exc, f"error creating directory '{path}'") from exc
        return MakeDirResponse(entry=EntryInfo(name=os.path.basename(path), type=FileType.DIRECTORY, path=path))

    async def move(self, request: MoveRequest, ctx: RequestContext) -> MoveResponse:
        user = request_user(ctx, self._state)
        source = resolve(request.source, user, self._state)
        destination = resolve(request.destination, user, self._state)
        try:
            if not os.path.lexists(source):
                raise ConnectError(Code.NOT_FOUND, f"source file not found: {source}")
            ensure_dirs(os.path.dirname(destination), user)
            with file_metadata.moving(source, destination):
                os.rename(source, destination)
            return MoveResponse(entry=entry_info(destination))
        except NotADirectoryError as exc:
            raise ConnectError(Code.INVALID_ARGUMENT, str(exc)) from exc
        except (OSError, ValueError) as exc:
            raise connect_error(exc, f"error moving '{source}' to '{destination}'") from exc

    async def list_dir(self, request: ListDirRequest, ctx: RequestContext) -> ListDirResponse:
        depth = request.depth or 1
        path = self._path(request.path, ctx)
        try:
            real = os.path.realpath(path, strict=True)
        except (OSError, ValueError) as exc:
            raise connect_error(exc, f"path not found: '{path}'") from exc
        if not os.path.isdir(real):
            raise ConnectError(Code.INVALID_ARGUMENT, f"path is not a directory: {path}")
        try:
            return ListDirResponse(entries=list(_walk(path, real, depth)))
        except OSError as exc:
            raise connect_error(exc, f"error reading directory '{path}'") from exc

    async def remove(self, request: RemoveRequest, ctx: RequestContext) -> RemoveResponse:
        path = self._path(request.path, ctx)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass  # like Go's os.RemoveAll: removing nothing is fine
        except (OSError, ValueError) as exc:
            raise connect_error(exc, f"error removing '{path}'") from exc
        file_metadata.removed(path)
        return RemoveResponse()

    def _watch(
        self, path: str, recursive: bool, include_entry: bool, allow_network: bool, emit: Callable[..., Any]
    ) -> Watcher:
        if not os.path.exists(path):
            raise ConnectError(Code.NOT_FOUND, f"path '{path}' not found")
        if not os.path.isdir(path):
            raise ConnectError(Code.INVALID_ARGUMENT, f"path '{path}' is not a directory")
        if not allow_network and is_network_mount(path):
            raise ConnectError(
                Code.FAILED_PRECONDITION, f"path '{path}' is on a network mount; set allow_network_mounts"
            )
        try:
            return Watcher(path, recursive, include_entry, emit)
        except (OSError, ValueError) as exc:
            raise connect_error(exc, f"error watching '{path}'") from exc

    async def watch_dir(self, request: WatchDirRequest, ctx: RequestContext) -> AsyncIterator[WatchDirResponse]:
        path = self._path(request.path, ctx)
        queue: asyncio.Queue[FilesystemEvent | None] = asyncio.Queue()
        watcher = self._watch(
            path, request.recursive, request.include_entry, request.allow_network_mounts, queue.put_nowait
        )
        on_client_disconnect(lambda: queue.put_nowait(None))
        interval = keepalive_interval(ctx)
        try:
            yield WatchDirResponse(event=Oneof("start", WatchDirResponse.StartEvent()))
            while True:
                try:
                    async with asyncio.timeout(interval):
                        event = await queue.get()
                except TimeoutError:
                    yield WatchDirResponse(event=Oneof("keepalive", WatchDirResponse.KeepAlive()))
                    continue
                if event is None:
                    return
                yield WatchDirResponse(event=Oneof("filesystem", event))
        finally:
            watcher.close()

    async def create_watcher(self, request: CreateWatcherRequest, ctx: RequestContext) -> CreateWatcherResponse:
        path = self._path(request.path, ctx)
        polled = _PolledWatcher()
        polled.watcher = self._watch(
            path, request.recursive, request.include_entry, request.allow_network_mounts, polled.push
        )
        watcher_id = str(uuid.uuid4())
        self._watchers[watcher_id] = polled
        return CreateWatcherResponse(watcher_id=watcher_id)

    async def get_watcher_events(
        self, request: GetWatcherEventsRequest, ctx: RequestContext
    ) -> GetWatcherEventsResponse:
        polled = self._watchers.get(request.watcher_id)
        if polled is None:
            raise ConnectError(Code.NOT_FOUND, f"watcher with id {request.watcher_id} not found")
        events, polled.events = polled.events, []
        return GetWatcherEventsResponse(events=events)

    async def remove_watcher(self, request: RemoveWatcherRequest, ctx: RequestContext) -> RemoveWatcherResponse:
        polled = self._watchers.pop(request.watcher_id, None)
        if polled is None:
            raise ConnectError(Code.NOT_FOUND, f"watcher with id {request.watcher_id} not found")
        if polled.watcher is not None:
            polled.watcher.close()
        return RemoveWatcherResponse()

    def close_all(self) -> None:
        for polled in self._watchers.values():
            if polled.watcher is not None:
                polled.watcher.close()
        self._watchers.clear()


def _walk(requested: str, real: str, depth: int, level: int = 1) -> Iterator[EntryInfo]:
    """Entries below ``real`` down to ``depth`` levels, reported under the requested path, in
    the order of Go's filepath.WalkDir (as E2B's envd): names sorted, each directory followed by
    its own entries before its next sibling."""
    with os.scandir(real) as it:
        children = sorted(it, key=lambda e: e.name)
    for child in children:
        shown_path = os.path.join(requested, child.name)
        try:
            yield entry_info(shown_path, child.stat(follow_symlinks=False))
        except FileNotFoundError:
            continue
        if level < depth and child.is_dir(follow_symlinks=False):
            try:
                yield from _walk(shown_path, child.path, depth, level + 1)
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed while listing
