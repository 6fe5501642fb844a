"""The actions an agent can send to ``POST /desktops/{id}/actions`` (one, or a list run in order).

Field names follow the computer-use tools agents already emit (OpenAI ``computer`` and
Anthropic ``computer_*``): ``click``, ``double_click``, ``move``, ``drag``, ``scroll``, ``type``,
``key``, ``open``, ``launch``, ``wait``. Unknown fields are errors, not silently ignored.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pmoves_e2b.desktop.keys import parse_keys

MAX_WAIT_MS = 30_000
MAX_TEXT = 10_000
APP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
URL = re.compile(r"^(https?|file)://\S+$|^/\S*$")
Coordinate = Annotated[int, Field(ge=0, le=65_535)]


class _Action(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Pointed(_Action):
    """Optional position: both ``x`` and ``y`` or neither (then the pointer stays where it is)."""

    x: Coordinate | None = None
    y: Coordinate | None = None

    @model_validator(mode="after")
    def _both(self) -> _Pointed:
        if (self.x is None) != (self.y is None):
            raise ValueError("give both x and y, or neither")
        return self


class Click(_Pointed):
    type: Literal["click"]
    button: Literal["left", "right", "middle"] = "left"


class DoubleClick(_Pointed):
    type: Literal["double_click"]


class Move(_Action):
    type: Literal["move"]
    x: Coordinate
    y: Coordinate


class Drag(_Action):
    type: Literal["drag"]
    from_: tuple[Coordinate, Coordinate] = Field(alias="from")
    to: tuple[Coordinate, Coordinate]


class Scroll(_Pointed):
    type: Literal["scroll"]
    direction: Literal["up", "down"] = "down"
    amount: int = Field(1, ge=1, le=50)


class Type(_Action):
    type: Literal["type"]
    text: str = Field(min_length=1, max_length=MAX_TEXT)


class Key(_Action):
    type: Literal["key"]
    keys: str | list[str] = Field(description="'enter', 'ctrl+l' or ['ctrl', 'l']; see the key-name table")

    @field_validator("keys")
    @classmethod
    def _known(cls, value: str | list[str]) -> str | list[str]:
        parse_keys(value)  # raises with the list of accepted names
        return value


class Open(_Action):
    type: Literal["open"]
    url: str = Field(min_length=1, max_length=4096)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not URL.match(value):
            raise ValueError("url must be http://, https://, file:// or an absolute path, without spaces")
        return value


class Launch(_Action):
    type: Literal["launch"]
    app: str = Field(description="Desktop entry name, e.g. 'xfce4-terminal', 'chromium', 'org.xfce.mousepad'")
    uri: str | None = Field(None, max_length=4096)

    @field_validator("app")
    @classmethod
    def _app(cls, value: str) -> str:
        if not APP_NAME.match(value):
            raise ValueError("app must be a desktop entry name (letters, digits, . _ + -)")
        return value


class Wait(_Action):
    type: Literal["wait"]
    ms: int = Field(ge=0, le=MAX_WAIT_MS)


Action = Annotated[
    Click | DoubleClick | Move | Drag | Scroll | Type | Key | Open | Launch | Wait, Field(discriminator="type")
]
ACTION_TYPES = ("click", "double_click", "move", "drag", "scroll", "type", "key", "open", "launch", "wait")


class ActionBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    actions: list[Action] = Field(min_length=1, max_length=100)
