"""Desktops on NATS: ``e2b.desktop.request.v1`` and the desktop lifecycle events.

A request (PMOVES' flat fields ``duration``, ``memory_mb``, ``resolution``, optional
``cpu_limit``, ``agent_id``) is answered with ``e2b.desktop.ready.v1`` (id and viewer URL)
once the desktop's screen is up, or ``e2b.desktop.failed.v1`` when it cannot be made. When
that desktop later ends, the request gets ``e2b.desktop.completed.v1`` (killed, timeout) or
``e2b.desktop.failed.v1`` (crashed), correlated by the request's id. Every desktop, however
it was made, also has ``e2b.desktop.created|killed|timeout.v1`` events.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pmoves_e2b.desktop.desktops import Desktop, DesktopError, DesktopOps, utcnow
from pmoves_e2b.desktop.lifecycle import DesktopWatcher, EndKind
from pmoves_e2b.events.envelope import Envelope
from pmoves_e2b.events.handlers import RequestFailed, RequestHandler, RequestRoute, request_id_of
from pmoves_e2b.events.publisher import EventPublisher

REQUEST_SUBJECT = "e2b.desktop.request.v1"
# The request's first answer is "ready" (the desktop runs); completed/failed follow when it ends.
DESKTOP_ROUTE = RequestRoute(
    request=REQUEST_SUBJECT,
    completed="e2b.desktop.ready.v1",
    failed="e2b.desktop.failed.v1",
    queue="e2b-desktop",
)
REQUEST_ID_KEY = "pmoves_request_id"


# desktop id -> the viewer URL handed out (a signed link when the token is known).
ViewerUrls = Callable[[str], str]


def ready_payload(desktop: Desktop, viewer_url: str) -> dict[str, Any]:
    return {
        "desktop_id": desktop.desktop_id,
        "viewer_url": viewer_url,
        "resolution": desktop.resolution,
        "end_at": desktop.end_at.isoformat(),
        "memory_mb": desktop.memory_mb,
        "cpu_count": desktop.cpu_count,
    }


def desktop_request_handler(ops: DesktopOps, watcher: DesktopWatcher, viewer_url: ViewerUrls) -> RequestHandler:
    async def handle(request: Envelope) -> dict[str, Any]:
        payload = request.payload  # already checked against contracts/ (desktop.request.v1)
        metadata = {REQUEST_ID_KEY: request_id_of(request)}
        if isinstance(payload.get("agent_id"), str):
            metadata["pmoves_agent_id"] = payload["agent_id"][:128]
        try:
            desktop = await ops.create(
                resolution=payload.get("resolution"),
                duration_s=payload.get("duration"),
                memory_mb=payload.get("memory_mb"),
                cpu_count=payload.get("cpu_limit"),
                created_by="nats",
                extra_metadata=metadata,
            )
        except DesktopError as exc:
            raise RequestFailed(exc.code, exc.message) from None
        await watcher.created(desktop)
        return ready_payload(desktop, viewer_url(desktop.desktop_id))

    return handle


class DesktopEvents:
    """Publishes the watcher's findings (the watcher's ``emit``)."""

    def __init__(self, publisher: EventPublisher) -> None:
        self.publisher = publisher

    async def __call__(self, kind: EndKind, desktop: Desktop, reason: str) -> None:
        request_id = desktop.request_id
        base: dict[str, Any] = {"desktop_id": desktop.desktop_id}
        if request_id:
            base["request_id"] = request_id
        if kind == "failed":
            payload = {**base, "code": "desktop_crashed", "reason": reason}
            if request_id:
                payload["request_subject"] = REQUEST_SUBJECT
            await self.publisher.publish(DESKTOP_ROUTE.failed, payload, correlation_id=request_id)
            return
        lifecycle = {
            **base,
            "resolution": desktop.resolution,
            "created_by": desktop.created_by,
            "metadata": desktop.metadata,
            "end_at": desktop.end_at.isoformat(),
            "reason": reason,
        }
        await self.publisher.publish(f"e2b.desktop.{kind}.v1", lifecycle, correlation_id=request_id)
        if kind in ("killed", "timeout") and request_id:
            lived = max(0.0, (utcnow() - desktop.started_at).total_seconds())
            completed = {**base, "reason": kind, "duration_seconds": round(lived, 3)}
            await self.publisher.publish("e2b.desktop.completed.v1", completed, correlation_id=request_id)
