"""Anthropic's Messages API with the computer-use tool (``computer_20250124``, beta header
``computer-use-2025-01-24``).

The API keeps no state: every request carries the whole conversation. The model answers
``content`` blocks (``text``, ``thinking``, ``tool_use`` with ``input.action``); each
``tool_use`` is answered in the next user message by a ``tool_result`` — the last one with the
screenshot as a base64 PNG ``image`` block, an action we could not run as ``is_error``. No
``tool_use`` means the model is done. Only the newest screenshots are kept in the history.
"""

from __future__ import annotations

import base64
from typing import Any

from pmoves_e2b.surf.agent.providers.base import (
    AgentAction,
    Click,
    DoubleClick,
    Drag,
    Key,
    Move,
    Provider,
    ProviderError,
    Scroll,
    Turn,
    Type,
    Wait,
    build,
)

DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"
BETA = "computer-use-2025-01-24"
TOOL_TYPE = "computer_20250124"
MAX_TOKENS = 4096
KEEP_SCREENSHOTS = 3


def _image(png: bytes) -> dict[str, Any]:
    return {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(png).decode()},
    }


class AnthropicComputerUse(Provider):
    name = "anthropic"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._messages: list[dict[str, Any]] = []
        self._pending: list[tuple[str, str | None]] = []  # (tool_use id, error) of the last answer

    async def step(self, screenshot: bytes, *, acknowledge: bool = False) -> Turn:
        if not self._messages:
            content: list[dict[str, Any]] = [{"type": "text", "text": self.task}, _image(screenshot)]
        else:
            content = []
            for index, (tool_id, error) in enumerate(self._pending):
                last = index == len(self._pending) - 1
                result: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_id}
                if error:
                    result["is_error"] = True
                    result["content"] = [{"type": "text", "text": error}] + ([_image(screenshot)] if last else [])
                else:
                    result["content"] = [_image(screenshot)] if last else [{"type": "text", "text": "done"}]
                content.append(result)
        self._messages.append({"role": "user", "content": content})
        self._trim()
        body = {
            "model": self.model,
            "max_tokens": MAX_TOKENS,
            "system": self.system_prompt(),
            "tools": [
                {
                    "type": TOOL_TYPE,
                    "name": "computer",
                    "display_width_px": self.display.width,
                    "display_height_px": self.display.height,
                    "display_number": 0,
                }
            ],
            "messages": self._messages,
        }
        headers = {"anthropic-version": API_VERSION, "anthropic-beta": BETA}
        if self._api_key:
            headers["x-api-key"] = self._api_key
        return self._turn(await self.post("/v1/messages", headers, body))

    def _trim(self) -> None:
        """Old screenshots cost tokens and say nothing new: keep the newest few."""
        seen = 0
        for message in reversed(self._messages):
            if message["role"] != "user":
                continue
            for block in message["content"]:
                holders = [block] if block.get("type") == "image" else []
                if block.get("type") == "tool_result":
                    holders = [b for b in block.get("content", []) if b.get("type") == "image"]
                for image in holders:
                    seen += 1
                    if seen > KEEP_SCREENSHOTS:
                        image.clear()
                        image.update({"type": "text", "text": "(older screenshot omitted)"})

    def _turn(self, data: dict[str, Any]) -> Turn:
        if data.get("type") == "error":
            raise ProviderError("model_error", f"anthropic model failed: {data.get('error')}")
        content = data.get("content")
        if data.get("role") != "assistant" or not isinstance(content, list):
            raise ProviderError("model_bad_answer", "anthropic answer is not an assistant message with content")
        self._messages.append({"role": "assistant", "content": content})
        turn = Turn()
        texts: list[str] = []
        self._pending = []
        for block in content:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text":
                texts.append(str(block.get("text", "")))
            elif block.get("type") == "thinking":
                turn.reasoning += str(block.get("thinking", ""))
            elif block.get("type") == "tool_use":
                tool_id = block.get("id")
                if not isinstance(tool_id, str):
                    raise ProviderError("model_bad_answer", "anthropic tool_use has no id")
                error = None
                try:
                    if block.get("name") != "computer":
                        raise ValueError(f"unknown tool {block.get('name')!r}")
                    turn.actions += self._map(block.get("input"))
                except ValueError as exc:
                    error = str(exc)
                    turn.rejected.append(error)
                self._pending.append((tool_id, error))
        text = "\n".join(t for t in texts if t).strip()
        turn.reasoning = "\n".join(t for t in (turn.reasoning.strip(), text) if t)
        if not self._pending:
            turn.done, turn.message = True, text
        return turn

    def _map(self, raw: Any) -> list[AgentAction]:
        if not isinstance(raw, dict):
            raise ValueError("tool input is not an object")
        action = raw.get("action")
        if action in ("screenshot", "cursor_position"):
            return []
        if action == "type":
            return [build(Type, type="type", text=raw.get("text"))]
        if action == "key":
            return [build(Key, type="key", keys=str(raw.get("text", "")))]
        if action == "wait":
            seconds = raw.get("duration", 1)
            if not isinstance(seconds, int | float) or seconds < 0:
                raise ValueError("wait: duration must be a number of seconds")
            return [build(Wait, type="wait", ms=min(round(seconds * 1000), 30_000))]
        if action == "left_click_drag":
            start = self._coordinate(raw.get("start_coordinate"))
            return [build(Drag, type="drag", **{"from": start, "to": self._coordinate(raw.get("coordinate"))})]
        at: dict[str, int] = {}
        if raw.get("coordinate") is not None:
            at["x"], at["y"] = self._coordinate(raw.get("coordinate"))
        if action in ("left_click", "right_click", "middle_click"):
            if raw.get("text"):
                raise ValueError(f"{action}: holding keys while clicking is not supported")
            return [build(Click, type="click", button=action.split("_")[0], **at)]
        if action == "double_click":
            return [build(DoubleClick, type="double_click", **at)]
        if action == "triple_click":
            return [build(DoubleClick, type="double_click", **at), build(Click, type="click")]
        if action == "mouse_move":
            if not at:
                raise ValueError("mouse_move: coordinate is required")
            return [build(Move, type="move", **at)]
        if action == "scroll":
            direction = raw.get("scroll_direction")
            if direction not in ("up", "down"):
                raise ValueError(f"scroll: direction {direction!r} is not supported (up or down)")
            amount = raw.get("scroll_amount", 3)
            if not isinstance(amount, int) or not 1 <= amount <= 50:
                raise ValueError("scroll: scroll_amount must be 1..50")
            return [build(Scroll, type="scroll", direction=direction, amount=amount, **at)]
        raise ValueError(f"action {action!r} is not supported")

    def _coordinate(self, value: Any) -> tuple[int, int]:
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise ValueError(f"coordinate {value!r} is not [x, y]")
        return self.point(value[0], value[1])
