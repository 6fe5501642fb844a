"""OpenAI's Responses API with the computer-use tool (``computer_use_preview``).

First request: the task and a screenshot as ``input_text`` + ``input_image``. The model answers
``output`` items: ``reasoning`` (summaries), at most one ``computer_call`` (``call_id``,
``action`` — or the batched ``actions`` of the GA tool — and ``pending_safety_checks``), and a
``message`` when it is done. Every next request chains with ``previous_response_id`` and carries
one ``computer_call_output`` whose ``output`` is the screenshot after the actions, with the
safety checks a person acknowledged.
"""

from __future__ import annotations

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
    data_url,
)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
SCROLL_PIXELS_PER_NOTCH = 100


class OpenAIResponses(Provider):
    name = "openai"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._previous: str | None = None
        self._call_id: str | None = None
        self._checks: list[dict[str, Any]] = []

    def _tool(self) -> dict[str, Any]:
        return {
            "type": "computer_use_preview",
            "display_width": self.display.width,
            "display_height": self.display.height,
            "environment": "browser",
        }

    async def step(self, screenshot: bytes, *, acknowledge: bool = False) -> Turn:
        body: dict[str, Any] = {
            "model": self.model,
            "tools": [self._tool()],
            "truncation": "auto",
            "reasoning": {"summary": "concise"},
            # Not carried over by previous_response_id: sent with every request.
            "instructions": self.system_prompt(),
        }
        if self._previous is None:
            body["input"] = [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": self.task},
                        {"type": "input_image", "image_url": data_url(screenshot)},
                    ],
                }
            ]
        else:
            output: dict[str, Any] = {
                "type": "computer_call_output",
                "call_id": self._call_id,
                "output": {"type": "computer_screenshot", "image_url": data_url(screenshot)},
            }
            if acknowledge and self._checks:
                output["acknowledged_safety_checks"] = self._checks
            body["previous_response_id"] = self._previous
            body["input"] = [output]
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        return self._turn(await self.post("/responses", headers, body))

    def _turn(self, data: dict[str, Any]) -> Turn:
        if data.get("error"):
            error = data["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise ProviderError("model_error", f"openai model failed: {message}")
        response_id = data.get("id")
        output = data.get("output")
        if not isinstance(response_id, str) or not isinstance(output, list):
            raise ProviderError("model_bad_answer", "openai answer has no response id or output list")
        self._previous = response_id
        turn = Turn()
        texts: list[str] = []
        calls = [item for item in output if isinstance(item, dict) and item.get("type") == "computer_call"]
        for item in output:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "reasoning":
                turn.reasoning += " ".join(
                    s.get("text", "") for s in item.get("summary") or [] if isinstance(s, dict)
                ).strip()
            elif item.get("type") == "message":
                texts += [
                    c.get("text", "")
                    for c in item.get("content") or []
                    if isinstance(c, dict) and c.get("type") == "output_text"
                ]
        if len(calls) > 1:
            raise ProviderError("model_bad_answer", "openai answer has more than one computer_call")
        if not calls:
            turn.done = True
            turn.message = "\n".join(t for t in texts if t).strip()
            return turn
        call = calls[0]
        if not isinstance(call.get("call_id"), str):
            raise ProviderError("model_bad_answer", "openai computer_call has no call_id")
        self._call_id = call["call_id"]
        self._checks = [c for c in call.get("pending_safety_checks") or [] if isinstance(c, dict)]
        turn.safety_checks = [str(c.get("message") or c.get("code") or c.get("id")) for c in self._checks]
        if texts and not turn.reasoning:
            turn.reasoning = "\n".join(texts)
        batched = call.get("actions")
        actions: list[Any] = batched if isinstance(batched, list) else [call.get("action")]
        for raw in actions:
            try:
                turn.actions += self._map(raw)
            except ValueError as exc:
                turn.rejected.append(str(exc))
        return turn

    def _map(self, raw: Any) -> list[AgentAction]:
        if not isinstance(raw, dict):
            raise ValueError(f"action {raw!r} is not an object")
        kind = raw.get("type")
        if kind == "screenshot":
            return []  # the loop sends a fresh screenshot after every turn anyway
        if kind == "wait":
            return [build(Wait, type="wait", ms=min(int(raw.get("ms") or 1000), 30_000))]
        if kind == "type":
            return [build(Type, type="type", text=raw.get("text"))]
        if kind == "keypress":
            return [build(Key, type="key", keys=list(raw.get("keys") or []))]
        if kind == "drag":
            path = raw.get("path") or []
            if len(path) < 2 or not all(isinstance(p, dict) for p in path):
                raise ValueError("drag: path needs at least two points")
            start, end = (
                self.point(path[0].get("x"), path[0].get("y")),
                self.point(path[-1].get("x"), path[-1].get("y")),
            )
            return [build(Drag, type="drag", **{"from": start, "to": end})]
        x, y = self.point(raw.get("x"), raw.get("y"))
        if kind == "click":
            button = raw.get("button", "left")
            if button in ("back", "forward"):
                return [build(Key, type="key", keys=["alt", "left" if button == "back" else "right"])]
            mapped = {"left": "left", "right": "right", "wheel": "middle", "middle": "middle"}.get(button)
            if mapped is None:
                raise ValueError(f"click: unknown button {button!r}")
            return [build(Click, type="click", x=x, y=y, button=mapped)]
        if kind == "double_click":
            return [build(DoubleClick, type="double_click", x=x, y=y)]
        if kind == "move":
            return [build(Move, type="move", x=x, y=y)]
        if kind == "scroll":
            dy = raw.get("scroll_y") or 0
            if not isinstance(dy, int | float) or dy == 0:
                raise ValueError("scroll: only vertical scrolling (scroll_y) is supported")
            amount = max(1, min(50, round(abs(dy) / SCROLL_PIXELS_PER_NOTCH)))
            return [build(Scroll, type="scroll", x=x, y=y, direction="down" if dy > 0 else "up", amount=amount)]
        raise ValueError(f"unknown action type {kind!r}")
