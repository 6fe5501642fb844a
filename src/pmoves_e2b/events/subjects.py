"""NATS subjects owned by pmoves-e2b (versioned: a new payload shape gets a new ``.v2``)."""

from __future__ import annotations

from typing import Literal

SERVICES_ANNOUNCE = "services.announce.v1"

LifecycleKind = Literal["created", "paused", "resumed", "killed", "timeout", "failed"]
LIFECYCLE_KINDS: tuple[LifecycleKind, ...] = ("created", "paused", "resumed", "killed", "timeout", "failed")


def sandbox_lifecycle(kind: LifecycleKind) -> str:
    if kind not in LIFECYCLE_KINDS:
        raise ValueError(f"unknown sandbox lifecycle event {kind!r}; expected one of {', '.join(LIFECYCLE_KINDS)}")
    return f"e2b.sandbox.{kind}.v1"
