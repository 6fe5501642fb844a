"""What e2b-surf is asked (``SurfRequest``) and what it answers (``Session``, ``Step``, ``PageResult``).

The request is strict: an unknown field, or an option the chosen mode does not use, is a 400
naming it, never silently ignored.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pmoves_e2b.surf.agent.providers import parse_model

Mode = Literal["scrape", "agent"]
State = Literal["queued", "running", "completed", "failed", "stopped", "interrupted"]
LIVE_STATES: tuple[State, ...] = ("queued", "running")
Format = Literal["markdown", "text", "html", "links", "tables", "screenshot"]
DEFAULT_FORMATS: tuple[Format, ...] = ("markdown", "text", "links", "tables", "screenshot")
EventType = Literal["state", "step", "page", "result", "error"]

MAX_URL = 4096
MAX_TASK = 20_000
# Options only one mode uses: sending them with the other mode is an error.
SCRAPE_ONLY = ("depth", "max_pages", "follow_links", "same_origin", "extract_content", "formats")
AGENT_ONLY = ("task", "model", "max_steps")


class SurfError(Exception):
    """A failure with its HTTP status and a stable code (``{"error": code, "detail": message}``)."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


class SurfRequest(BaseModel):
    """``POST /api/surf``. ``timeout`` defaults to, and may not exceed, ``E2B_SURF_TIMEOUT``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    url: str = Field(min_length=1, max_length=MAX_URL)
    mode: Mode = "scrape"
    # scrape
    depth: int = Field(1, ge=0, le=10)
    max_pages: int = Field(10, ge=1, le=500)
    follow_links: bool = False
    same_origin: bool = True
    extract_content: bool = True
    formats: list[Format] = Field(default_factory=lambda: list(DEFAULT_FORMATS), min_length=1)
    # agent
    task: str | None = Field(None, min_length=1, max_length=MAX_TASK)
    model: str | None = Field(None, min_length=1, max_length=256)
    max_steps: int | None = Field(None, ge=1, le=500)
    # both
    timeout: int | None = Field(None, ge=1)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http:// or https:// URL")
        return value

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        if value is not None:
            parse_model(value)  # 'provider:model' with a provider we have
        return value

    @field_validator("formats")
    @classmethod
    def _unique(cls, value: list[Format]) -> list[Format]:
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _mode_options(self) -> SurfRequest:
        sent = self.model_fields_set
        other = AGENT_ONLY if self.mode == "scrape" else SCRAPE_ONLY
        wrong = [name for name in other if name in sent]
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: not an option of mode {self.mode!r}")
        if self.mode == "agent" and not self.task:
            raise ValueError("mode 'agent' needs a task")
        return self

    def effective_timeout(self, maximum: int) -> int:
        if self.timeout is not None and self.timeout > maximum:
            raise SurfError("invalid_request", f"timeout {self.timeout} s exceeds E2B_SURF_TIMEOUT={maximum} s")
        return self.timeout or maximum


def parse_request(body: Any) -> SurfRequest:
    """A ``SurfRequest`` from a decoded JSON body, or a ``SurfError`` (400) naming what is wrong."""
    if not isinstance(body, dict):
        raise SurfError("invalid_request", "the body must be a JSON object")
    try:
        return SurfRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            message = "unknown field"
        raise SurfError("invalid_request", f"{where}: {message}" if where else message) from None


class Step(BaseModel):
    """A recorded step: ``kind`` (``action``, ``navigate``, ``note``, …) and its data.

    Agent steps carry ``action``, ``reasoning`` and ``screenshot`` (a result file name) in ``data``.
    """

    index: int
    ts: datetime
    kind: str
    data: dict[str, Any]


class PageResult(BaseModel):
    """A page a run visited. ``data`` holds what was extracted: ``final_url``, ``title``, ``depth``,
    ``status``, ``markdown``, ``text``, ``html``, ``links``, ``tables``, ``screenshot`` (as asked by
    ``formats``); a value too large to inline is a file, ``{"file": name, "url": signed, "bytes": n}``."""

    index: int
    ts: datetime
    url: str
    data: dict[str, Any]


class Session(BaseModel):
    session_id: str
    mode: Mode
    state: State
    request: dict[str, Any]
    created_by: str
    created_at: datetime
    started_at: datetime | None = None
    ended_at: datetime | None = None
    desktop_id: str | None = None
    taken_over: bool = False
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    steps: list[Step] | None = None
    pages: list[PageResult] | None = None
