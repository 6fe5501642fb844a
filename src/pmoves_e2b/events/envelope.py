"""The PMOVES contract envelope (pmoves/contracts/schemas/common/envelope.schema.json).

Every message we publish is ``{id, topic, ts, version, source, payload}`` plus optional
``correlation_id`` (the request's ``request_id``), ``parent_id``, ``actor`` and ``labels``.
``parse`` also accepts the flat legacy requests PMOVES documents (a bare JSON object,
e.g. ``{"request_id": ..., "agent_id": ..., "duration": ...}``) and wraps them.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

VERSION = "v1"
_REQUIRED = ("id", "topic", "ts", "version", "source", "payload")
_OPTIONAL = ("correlation_id", "parent_id", "actor", "labels")


class EnvelopeError(ValueError):
    """A message is not valid JSON, not an object, or a malformed envelope."""


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Envelope:
    id: str
    topic: str
    ts: str
    version: str
    source: str
    payload: dict[str, Any]
    correlation_id: str | None = None
    parent_id: str | None = None
    actor: str | None = None
    labels: tuple[str, ...] = field(default=())
    # True when parsed from a flat legacy message (never serialised).
    legacy: bool = field(default=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("legacy")
        data["labels"] = list(self.labels)
        # The schema has no nulls for optional fields: omit them.
        return {k: v for k, v in data.items() if v is not None and not (k == "labels" and not v)}

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), default=str).encode()


def build(
    topic: str,
    payload: dict[str, Any],
    source: str,
    *,
    correlation_id: str | None = None,
    parent_id: str | None = None,
    actor: str | None = None,
    labels: tuple[str, ...] | list[str] = (),
) -> Envelope:
    if not isinstance(payload, dict):
        raise EnvelopeError(f"payload must be a JSON object, got {type(payload).__name__}")
    return Envelope(
        id=str(uuid.uuid4()),
        topic=topic,
        ts=utc_now_iso(),
        version=VERSION,
        source=source,
        payload=payload,
        correlation_id=correlation_id,
        parent_id=parent_id,
        actor=actor,
        labels=tuple(labels),
    )


def _is_envelope(data: dict[str, Any]) -> bool:
    return "payload" in data and "topic" in data and "version" in data


def _optional_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise EnvelopeError(f"envelope field {key!r} must be a string")
    return value


def _parse_envelope(data: dict[str, Any]) -> Envelope:
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise EnvelopeError(f"envelope is missing {', '.join(missing)}")
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise EnvelopeError(f"envelope has unknown field(s) {', '.join(unknown)}")
    for key in ("id", "topic", "ts", "version", "source"):
        if not isinstance(data[key], str) or not data[key]:
            raise EnvelopeError(f"envelope field {key!r} must be a non-empty string")
    if data["version"] != VERSION:
        raise EnvelopeError(f"unsupported envelope version {data['version']!r}; expected {VERSION!r}")
    if not isinstance(data["payload"], dict):
        raise EnvelopeError("envelope field 'payload' must be a JSON object")
    labels = data.get("labels") or []
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise EnvelopeError("envelope field 'labels' must be a list of strings")
    return Envelope(
        id=data["id"],
        topic=data["topic"],
        ts=data["ts"],
        version=data["version"],
        source=data["source"],
        payload=data["payload"],
        correlation_id=_optional_str(data, "correlation_id"),
        parent_id=_optional_str(data, "parent_id"),
        actor=_optional_str(data, "actor"),
        labels=tuple(labels),
    )


def _wrap_legacy(data: dict[str, Any], subject: str) -> Envelope:
    request_id = data.get("request_id") or data.get("correlation_id")
    source = data.get("source") or data.get("agent_id") or "legacy"
    return Envelope(
        id=str(uuid.uuid4()),
        topic=subject,
        ts=str(data.get("timestamp") or data.get("ts") or utc_now_iso()),
        version=VERSION,
        source=str(source),
        payload=data,
        correlation_id=str(request_id) if request_id is not None else None,
        actor=str(data["agent_id"]) if data.get("agent_id") is not None else None,
        legacy=True,
    )


def parse(raw: bytes | str, subject: str) -> Envelope:
    """Parse a received message: a contract envelope, or a flat legacy object wrapped as one."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EnvelopeError(f"message is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise EnvelopeError(f"message must be a JSON object, got {type(data).__name__}")
    return _parse_envelope(data) if _is_envelope(data) else _wrap_legacy(data, subject)
