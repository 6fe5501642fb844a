"""Surf sessions: start in the background, cap, time limit, stop, events, restart safety.

``SessionManager.start`` stores a ``queued`` session and answers it at once; a task then makes the
session's desktop and browser (``browser.Browsers``), marks it ``running`` and hands a
``RunContext`` to the runner registered for its mode. The run ends ``completed`` (the runner's
result), ``failed`` (error code + message), ``stopped`` (``stop``: DELETE) or, when e2b-surf stops
or dies meanwhile, ``interrupted`` (a restarted service marks what it finds queued or running).
Whatever the end, the session's desktop is killed before the final state is published.

Live sessions (queued or running) are capped by ``E2B_SURF_CONCURRENT`` (more: 429) and each is
bounded by its ``timeout`` (default and maximum ``E2B_SURF_TIMEOUT``; desktop start included).

Every change is an event ``{"type": "state"|"step"|"page"|"result"|"error", "session_id", …}``
(shapes in SURF events below); ``events(id)`` replays what happened so far and follows the run
until its final state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pmoves_e2b.store import surf as store
from pmoves_e2b.store.db import Database
from pmoves_e2b.store.models import SurfPageRow, SurfSessionRow, SurfStepRow
from pmoves_e2b.surf import metrics
from pmoves_e2b.surf.browser import Browsers, SurfBrowser
from pmoves_e2b.surf.files import ResultFiles
from pmoves_e2b.surf.models import LIVE_STATES, PageResult, Session, Step, SurfError, SurfRequest
from pmoves_e2b.surf.run import DeadlineExceeded, Recorder, RunContext, Runner, Stopped

log = logging.getLogger(__name__)

STOP_WAIT_S = 30.0  # DELETE waits this long for the run to end and its desktop to go
FINAL_STATES = ("completed", "failed", "stopped", "interrupted")
EndListener = Callable[[Session], Any]


def new_session_id() -> str:
    return "surf_" + secrets.token_hex(8)


@dataclass
class _Live:
    """A session this process runs."""

    session_id: str
    request: SurfRequest
    task: asyncio.Task[None] | None = None
    ctx: RunContext | None = None
    desktop_id: str | None = None
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    history: list[dict[str, Any]] = field(default_factory=list)
    listeners: set[asyncio.Queue[dict[str, Any] | None]] = field(default_factory=set)
    finished: bool = False
    # Records get their index from the rows so far: one at a time per session.
    record_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class SessionManager(Recorder):
    def __init__(
        self,
        db: Database,
        browsers: Browsers,
        files: ResultFiles,
        *,
        concurrent: int,
        timeout_s: int,
        runners: Mapping[str, Runner] | None = None,
    ) -> None:
        self.db = db
        self.browsers = browsers
        self.files = files
        self.concurrent = concurrent
        self.timeout_s = timeout_s
        self.runners: dict[str, Runner] = dict(runners or {})
        self._end_listeners: list[EndListener] = []
        self._live: dict[str, _Live] = {}
        self._closing = False

    def register(self, mode: str, runner: Runner) -> None:
        """The runner of ``mode`` (``scrape``, ``agent``); a mode without one answers 501."""
        self.runners[mode] = runner

    def on_end(self, listener: EndListener) -> None:
        """Call ``listener(session)`` (awaited when it is a coroutine) whenever a run ends, with the
        final session (no steps/pages); its errors are logged and never affect the session."""
        self._end_listeners.append(listener)

    # ----- start-up and shut-down --------------------------------------------------------

    async def open(self) -> None:
        """Mark what a previous process left queued or running as interrupted; kill their desktops."""
        rows = await asyncio.to_thread(store.interrupt_live_sessions, self.db)
        for row in rows:
            log.info("surf session %s was %s when e2b-surf stopped: interrupted", row.session_id, row.state)
            if row.desktop_id:
                await self.browsers.remove(row.desktop_id)

    async def close(self) -> None:
        """Service shutdown: end every run as interrupted and remove its desktop."""
        self._closing = True
        for live in list(self._live.values()):
            live.stop_requested.set()
            if live.task is not None:
                live.task.cancel()
        tasks = [live.task for live in self._live.values() if live.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_WAIT_S)
        await self.browsers.drain(STOP_WAIT_S)

    # ----- the API -----------------------------------------------------------------------

    async def start(self, request: SurfRequest, created_by: str) -> Session:
        if request.mode not in self.runners:
            raise SurfError("not_implemented", f"mode {request.mode!r} is not available in this e2b-surf", 501)
        timeout_s = request.effective_timeout(self.timeout_s)
        if self._closing:
            raise SurfError("unavailable", "e2b-surf is shutting down", 503)
        # Counted synchronously (no await before the insert into _live): no two starts pass at once.
        running = sum(1 for live in self._live.values() if not live.finished)
        if running >= self.concurrent:
            metrics.SESSIONS_REFUSED.inc()
            raise SurfError(
                "too_many_sessions", f"{running} sessions are running (E2B_SURF_CONCURRENT={self.concurrent})", 429
            )
        session_id = new_session_id()
        live = _Live(session_id, request)
        self._live[session_id] = live
        metrics.SESSIONS_RUNNING.inc()
        row = SurfSessionRow(
            session_id=session_id,
            mode=request.mode,
            state="queued",
            request=request.model_dump(mode="json", exclude_unset=False),
            created_by=created_by[:128],
            created_at=store.utcnow(),
        )
        try:
            await asyncio.to_thread(store.add_session, self.db, row)
        except BaseException:
            self._live.pop(session_id, None)
            metrics.SESSIONS_RUNNING.dec()
            raise
        session = self._session(row)
        self._emit(live, {"type": "state", "state": "queued", "session": session.model_dump(mode="json")})
        live.task = asyncio.create_task(self._run(live, timeout_s), name=f"surf-{session_id}")
        return session

    async def list_sessions(self, limit: int = 100, state: str | None = None) -> list[Session]:
        rows = await asyncio.to_thread(store.list_sessions, self.db, limit, state)
        return [self._session(row) for row in rows]

    async def get(self, session_id: str, detail: bool = True) -> Session:
        row = await asyncio.to_thread(store.get_session, self.db, session_id)
        if row is None:
            raise SurfError("not_found", f"no surf session {session_id}", 404)
        if not detail:
            return self._session(row)
        steps, pages = await asyncio.gather(
            asyncio.to_thread(store.steps, self.db, session_id), asyncio.to_thread(store.pages, self.db, session_id)
        )
        return self._session(row, steps, pages)

    async def stop(self, session_id: str) -> Session:
        """Stop a run (its desktop is killed before this answers); a finished session is left as it is."""
        live = self._live.get(session_id)
        if live is None or live.finished:
            session = await self.get(session_id, detail=False)
            if session.desktop_id and session.state in FINAL_STATES:
                await self.browsers.remove(session.desktop_id)  # a leftover after a crash: make sure
            return session
        live.stop_requested.set()
        if live.task is not None:
            live.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(live.task), STOP_WAIT_S)
        return await self.get(session_id, detail=False)

    def take_over(self, session_id: str, person: bool) -> None:
        """A person takes the desktop (``person``) or hands it back; the agent loop waits meanwhile."""
        live = self._live.get(session_id)
        if live is None or live.finished or live.ctx is None:
            raise SurfError("not_running", f"surf session {session_id} is not running", 409)
        if person:
            live.ctx.taken_over.set()
        else:
            live.ctx.taken_over.clear()
            live.ctx.handed_back.set()
        self._emit(live, {"type": "state", "state": "running", "taken_over": person})

    def running(self) -> int:
        return sum(1 for live in self._live.values() if not live.finished)

    async def events(self, session_id: str) -> AsyncIterator[dict[str, Any]]:
        """Everything so far, then live events until the final state (an ended session: its record)."""
        live = self._live.get(session_id)
        if live is None:
            async for event in self._replay(session_id):
                yield event
            return
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        backlog = list(live.history)
        if not live.finished:
            live.listeners.add(queue)
        try:
            for event in backlog:
                yield event
            if live.finished:
                return
            while (item := await queue.get()) is not None:
                yield item
        finally:
            live.listeners.discard(queue)

    # ----- Recorder (what RunContext calls) ----------------------------------------------

    async def step(self, session_id: str, kind: str, data: dict[str, Any]) -> Step:
        async with self._live[session_id].record_lock:
            index, ts = await asyncio.to_thread(store.add_step, self.db, session_id, kind, data)
        metrics.STEPS.labels(kind).inc()
        step = Step(index=index, ts=ts, kind=kind, data=self.files.with_urls(session_id, data))
        self._emit(self._live[session_id], {"type": "step", "step": step.model_dump(mode="json")})
        return step

    async def page(self, session_id: str, url: str, data: dict[str, Any]) -> PageResult:
        async with self._live[session_id].record_lock:
            index, ts = await asyncio.to_thread(store.add_page, self.db, session_id, url, data)
        metrics.PAGES.labels("error" if "error" in data else "loaded").inc()
        page = PageResult(index=index, ts=ts, url=url, data=self.files.with_urls(session_id, data))
        self._emit(self._live[session_id], {"type": "page", "page": page.model_dump(mode="json")})
        return page

    async def save_file(self, session_id: str, name: str, data: bytes) -> dict[str, Any]:
        return await self.files.save(session_id, name, data)

    async def spill(self, session_id: str, name: str, text: str) -> str | dict[str, Any]:
        return await self.files.spill(session_id, name, text)

    # ----- one run -------------------------------------------------------------------------

    async def _run(self, live: _Live, timeout_s: int) -> None:
        session_id = live.session_id
        deadline = time.monotonic() + timeout_s
        browser: SurfBrowser | None = None
        state = "failed"
        result: dict[str, Any] | None = None
        error: dict[str, Any] | None = None
        try:
            async with asyncio.timeout_at(asyncio.get_running_loop().time() + timeout_s):
                # A scrape drives the page only: its run need not wait for XFCE (agent mode sees the screen).
                live.desktop_id = await self.browsers.create_desktop(
                    session_id, timeout_s, wait_for_session=live.request.mode != "scrape"
                )
                await self._update(session_id, desktop_id=live.desktop_id)
                browser = await self.browsers.open(live.desktop_id)
                metrics.BROWSER_READY_SECONDS.observe(time.monotonic() - (deadline - timeout_s))
                ctx = RunContext(
                    session_id, live.request, browser, deadline, timeout_s, self, stop_requested=live.stop_requested
                )
                live.ctx = ctx
                started = store.utcnow()
                await self._update(session_id, state="running", started_at=started)
                self._emit(
                    live,
                    {
                        "type": "state",
                        "state": "running",
                        "desktop_id": live.desktop_id,
                        "started_at": started.isoformat(),
                    },
                )
                result = await self.runners[live.request.mode](ctx)
            state = "completed"
        except (Stopped, asyncio.CancelledError):
            state = "interrupted" if self._closing else "stopped"
            reason = "e2b-surf shut down" if self._closing else "stopped by request"
            error = {"code": state, "message": reason}
        except TimeoutError:
            error = {"code": "timeout", "message": DeadlineExceeded(timeout_s).message}
        except SurfError as exc:
            error = {"code": exc.code, "message": exc.message}
        except Exception as exc:  # a runner bug fails its session, never the service
            log.exception("surf session %s failed", session_id)
            error = {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}
        finally:
            await self._finish(live, browser, state, result, error)

    async def _finish(
        self,
        live: _Live,
        browser: SurfBrowser | None,
        state: str,
        result: dict[str, Any] | None,
        error: dict[str, Any] | None,
    ) -> None:
        session_id = live.session_id
        # Shielded: a second cancel (shutdown during a stop) must not leave the desktop behind.
        try:
            await asyncio.shield(self._teardown(live, browser))
        except asyncio.CancelledError:
            pass
        if error is not None:
            self._emit(live, {"type": "error", "error": error})
        elif result is not None:
            self._emit(live, {"type": "result", "result": self.files.with_urls(session_id, result)})
        ended = store.utcnow()
        with contextlib.suppress(Exception):
            await asyncio.shield(
                asyncio.to_thread(
                    store.update_session, self.db, session_id, state=state, ended_at=ended, result=result, error=error
                )
            )
        self._emit(live, {"type": "state", "state": state, "ended_at": ended.isoformat()})
        live.finished = True
        metrics.SESSIONS_RUNNING.dec()
        metrics.SESSIONS_ENDED.labels(live.request.mode, state).inc()
        for queue in list(live.listeners):
            queue.put_nowait(None)
        live.listeners.clear()
        if self._end_listeners:
            session = await self.get(session_id, detail=False)
            for listener in self._end_listeners:
                try:
                    outcome = listener(session)
                    if asyncio.iscoroutine(outcome):
                        await outcome
                except Exception:  # a listener's trouble (NATS down) is its own
                    log.exception("surf end listener failed for %s", session_id)
        # The history stays for late SSE listeners of a finished run only briefly; the store has it all.
        asyncio.get_running_loop().call_later(60, self._live.pop, session_id, None)

    async def _teardown(self, live: _Live, browser: SurfBrowser | None) -> None:
        if browser is not None:
            await browser.close()
        if live.desktop_id is not None:
            await self.browsers.remove(live.desktop_id)

    async def _update(self, session_id: str, **changes: Any) -> None:
        await asyncio.to_thread(store.update_session, self.db, session_id, **changes)

    # ----- events and answers -------------------------------------------------------------

    def _emit(self, live: _Live, event: dict[str, Any]) -> None:
        event = {"session_id": live.session_id, "ts": store.utcnow().isoformat(), **event}
        live.history.append(event)
        for queue in live.listeners:
            queue.put_nowait(event)

    async def _replay(self, session_id: str) -> AsyncIterator[dict[str, Any]]:
        session = await self.get(session_id)
        base = {"session_id": session_id}
        yield {**base, "type": "state", "state": session.state, "session": session.model_dump(mode="json")}
        for step in session.steps or []:
            yield {**base, "type": "step", "step": step.model_dump(mode="json")}
        for page in session.pages or []:
            yield {**base, "type": "page", "page": page.model_dump(mode="json")}
        if session.state in LIVE_STATES:
            return  # run by another process (should not happen: one e2b-surf per database)
        if session.error is not None:
            yield {**base, "type": "error", "error": session.error}
        elif session.result is not None:
            yield {**base, "type": "result", "result": session.result}
        yield {**base, "type": "state", "state": session.state}

    def _session(
        self, row: SurfSessionRow, steps: list[SurfStepRow] | None = None, pages: list[SurfPageRow] | None = None
    ) -> Session:
        sid = row.session_id
        live = self._live.get(sid)
        return Session(
            session_id=sid,
            mode=row.mode,  # type: ignore[arg-type]
            state=row.state,  # type: ignore[arg-type]
            request=row.request,
            created_by=row.created_by,
            created_at=row.created_at,
            started_at=row.started_at,
            ended_at=row.ended_at,
            desktop_id=row.desktop_id,
            taken_over=bool(live and live.ctx and live.ctx.taken_over.is_set()),
            result=self.files.with_urls(sid, row.result) if row.result is not None else None,
            error=row.error,
            steps=None
            if steps is None
            else [Step(index=s.index, ts=s.ts, kind=s.kind, data=self.files.with_urls(sid, s.data)) for s in steps],
            pages=None
            if pages is None
            else [PageResult(index=p.index, ts=p.ts, url=p.url, data=self.files.with_urls(sid, p.data)) for p in pages],
        )
