"""The one small interface every model provider implements, and what they share.

A provider holds its own conversation with the model. The loop hands it a screenshot and gets
back a :class:`Turn`: the actions to run (``pmoves_e2b.desktop.actions`` models, plus
:class:`Navigate`), the model's reasoning, and whether the model says it is done.
"""

from __future__ import annotations

import base64
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pmoves_e2b.desktop.actions import URL, Click, DoubleClick, Drag, Key, Move, Scroll, Type, Wait

# What a model may ask for. ``open``/``launch`` are left out on purpose: the agent works in the
# session's browser, and navigation goes through it.
DesktopAction = Click | DoubleClick | Move | Drag | Scroll | Type | Key | Wait


class Navigate(BaseModel):
    """Go to a URL in the session's browser (not a desktop action: the loop's computer does it)."""

    model_config = ConfigDict(extra="forbid")
    type: str = Field("navigate", pattern="^navigate$")
    url: str = Field(min_length=1, max_length=4096)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not URL.match(value) or value.startswith("/"):
            raise ValueError("url must be http://, https:// or file://, without spaces")
        return value


AgentAction = DesktopAction | Navigate


@dataclass(frozen=True)
class Display:
    width: int
    height: int


@dataclass
class Turn:
    """One answer of the model."""

    actions: list[AgentAction] = field(default_factory=list)
    reasoning: str = ""
    done: bool = False  # the model says the task is finished (or it gives up): no more actions
    message: str = ""  # the model's final words when done
    # Safety checks the model's service wants a person to acknowledge before these actions run.
    safety_checks: list[str] = field(default_factory=list)
    # Actions the model asked for that we could not map (e.g. a coordinate off the screen): recorded.
    rejected: list[str] = field(default_factory=list)


class ProviderError(Exception):
    """The model could not be used: ``code`` for programs, ``message`` says what to do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Provider(ABC):
    """One agent run's conversation with a model."""

    name: str = ""

    def __init__(
        self,
        *,
        model: str,
        task: str,
        display: Display,
        base_url: str,
        api_key: str | None,
        timeout_s: float,
    ) -> None:
        self.model = model
        self.task = task
        self.display = display
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)))

    @abstractmethod
    async def step(self, screenshot: bytes, *, acknowledge: bool = False) -> Turn:
        """The screen now (after the previous turn's actions) -> the model's next turn.
        ``acknowledge``: a person accepted the previous turn's safety checks."""

    async def aclose(self) -> None:
        await self._http.aclose()

    def system_prompt(self) -> str:
        return (
            "You operate a Linux desktop with a web browser through screenshots and mouse and "
            f"keyboard actions. The screen is {self.display.width}x{self.display.height} pixels. "
            "Do the user's task, then stop and say what you did."
        )

    async def post(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        """POST JSON to the model's service; every failure becomes a ProviderError that says why."""
        url = f"{self.base_url}{path}"
        try:
            response = await self._http.post(url, headers=headers, json=body)
        except httpx.TimeoutException:
            raise ProviderError(
                "model_timeout", f"{self.name} model at {self.base_url} did not answer in time"
            ) from None
        except httpx.TransportError as exc:
            raise ProviderError(
                "model_unreachable", f"{self.name} model at {self.base_url} is unreachable ({type(exc).__name__})"
            ) from None
        except httpx.HTTPError as exc:  # e.g. a body that does not decode
            raise ProviderError(
                "model_bad_answer", f"{self.name} model answer unreadable ({type(exc).__name__})"
            ) from None
        if response.status_code >= 400:
            detail = _error_detail(response)
            if response.status_code in (401, 403):
                raise ProviderError(
                    "model_auth",
                    f"{self.name} model at {self.base_url} refused the API key (HTTP {response.status_code}: {detail}); "
                    "check the key in the environment",
                )
            if response.status_code == 429:
                raise ProviderError("model_rate_limited", f"{self.name} model is rate limited (HTTP 429: {detail})")
            raise ProviderError(
                "model_error", f"{self.name} model at {self.base_url} answered HTTP {response.status_code}: {detail}"
            )
        try:
            data = response.json()
        except ValueError:
            raise ProviderError("model_bad_answer", f"{self.name} model answered something that is not JSON") from None
        if not isinstance(data, dict):
            raise ProviderError("model_bad_answer", f"{self.name} model answered JSON that is not an object")
        return data

    # ----- helpers for the providers ----------------------------------------------------

    def point(self, x: Any, y: Any) -> tuple[int, int]:
        """A model's coordinate, checked against the screen (ValueError otherwise)."""
        if (
            isinstance(x, bool)
            or isinstance(y, bool)
            or not isinstance(x, int | float)
            or not isinstance(y, int | float)
        ):
            raise ValueError(f"coordinate ({x!r}, {y!r}) is not a pair of numbers")
        px, py = round(x), round(y)
        if not (0 <= px < self.display.width and 0 <= py < self.display.height):
            raise ValueError(f"({px}, {py}) is outside the {self.display.width}x{self.display.height} screen")
        return px, py


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def build(model: type[BaseModel], **fields: Any) -> AgentAction:
    """A desktop action model from a provider's fields; ValueError with the model's words otherwise."""
    try:
        action = model.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ValueError(f"{fields.get('type')}: {first['msg']}") from None
    if not isinstance(action, AgentAction):
        raise TypeError(f"{model.__name__} is not an agent action")
    return action


def _error_detail(response: httpx.Response) -> str:
    """The service's own error message (OpenAI and Anthropic both use {"error": {"message": ...}})."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip() or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"][:300]
    if isinstance(error, str):
        return error[:300]
    return json.dumps(body)[:200]
