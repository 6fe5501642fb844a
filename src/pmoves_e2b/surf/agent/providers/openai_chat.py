"""Any OpenAI-compatible vision chat model (vLLM, Ollama, LM Studio, ...) given a base URL.

Such models have no computer-use tool, so the system prompt asks for one JSON object per answer
(``reasoning``, ``actions`` in e2b-desktop's action format, ``done``, ``message``). Requests are
``POST {base}/chat/completions`` with the newest screenshot as an ``image_url`` data URL; older
turns keep only their text. An answer that is not that JSON is told back to the model.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel

from pmoves_e2b.surf.agent.providers.base import (
    AgentAction,
    Click,
    DoubleClick,
    Drag,
    Key,
    Move,
    Navigate,
    Provider,
    ProviderError,
    Scroll,
    Turn,
    Type,
    Wait,
    build,
    data_url,
)

MAX_TOKENS = 1024
MAX_ACTIONS = 10
KINDS: dict[str, type[BaseModel]] = {
    "click": Click,
    "double_click": DoubleClick,
    "move": Move,
    "drag": Drag,
    "scroll": Scroll,
    "type": Type,
    "key": Key,
    "wait": Wait,
    "navigate": Navigate,
}
PROTOCOL = """Answer with exactly one JSON object and nothing else:
{"reasoning": "what you see and why you act", "actions": [ACTION, ...], "done": false, "message": ""}
ACTION is one of
  {"type": "click", "x": X, "y": Y, "button": "left"|"right"|"middle"}
  {"type": "double_click", "x": X, "y": Y}
  {"type": "move", "x": X, "y": Y}
  {"type": "drag", "from": [X, Y], "to": [X, Y]}
  {"type": "scroll", "x": X, "y": Y, "direction": "up"|"down", "amount": 1-50}
  {"type": "type", "text": "..."}
  {"type": "key", "keys": "enter" | "ctrl+l" | ["ctrl", "a"]}
  {"type": "wait", "ms": 0-30000}
  {"type": "navigate", "url": "https://..."}
X and Y are pixels of the screenshot. After your actions you get a new screenshot.
When the task is finished, answer {"reasoning": "...", "actions": [], "done": true, "message": "what you did"}."""
JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


class OpenAIChat(Provider):
    name = "openai-compatible"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._messages: list[dict[str, Any]] = [{"role": "system", "content": self.system_prompt() + "\n" + PROTOCOL}]
        self._feedback = ""

    async def step(self, screenshot: bytes, *, acknowledge: bool = False) -> Turn:
        for message in self._messages:  # only the newest screenshot travels
            if message["role"] == "user" and isinstance(message["content"], list):
                message["content"] = [part for part in message["content"] if part.get("type") == "text"]
        text = f"Task: {self.task}" if len(self._messages) == 1 else "The screen after your actions."
        if self._feedback:
            text += f"\nProblems with your last answer: {self._feedback}"
        self._messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": text},
                    {"type": "image_url", "image_url": {"url": data_url(screenshot)}},
                ],
            }
        )
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        body = {"model": self.model, "messages": self._messages, "temperature": 0, "max_tokens": MAX_TOKENS}
        data = await self.post("/chat/completions", headers, body)
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ProviderError("model_bad_answer", "chat answer has no choices[0].message.content") from None
        if isinstance(content, list):  # some servers answer content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise ProviderError("model_bad_answer", "chat answer content is not text")
        self._messages.append({"role": "assistant", "content": content})
        turn = self._parse(content)
        self._feedback = "; ".join(turn.rejected)
        return turn

    def _parse(self, content: str) -> Turn:
        match = JSON_OBJECT.search(content)
        try:
            answer = json.loads(match.group(0)) if match else None
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            return Turn(reasoning=content.strip()[:2000], rejected=["the answer was not one JSON object"])
        turn = Turn(reasoning=str(answer.get("reasoning") or ""), message=str(answer.get("message") or ""))
        raw_actions = answer.get("actions") or []
        if not isinstance(raw_actions, list):
            raw_actions, turn.rejected = [], ["actions must be a list"]
        for raw in raw_actions[:MAX_ACTIONS]:
            try:
                turn.actions.append(self._map(raw))
            except ValueError as exc:
                turn.rejected.append(str(exc))
        turn.done = answer.get("done") is True and not turn.actions
        return turn

    def _map(self, raw: Any) -> AgentAction:
        if not isinstance(raw, dict) or raw.get("type") not in KINDS:
            raise ValueError(f"action {raw!r} has no known type ({', '.join(KINDS)})")
        fields = dict(raw)
        if "x" in fields or "y" in fields:
            fields["x"], fields["y"] = self.point(fields.get("x"), fields.get("y"))
        for end in ("from", "to"):
            if isinstance(fields.get(end), list) and len(fields[end]) == 2:
                fields[end] = self.point(*fields[end])
        return build(KINDS[fields["type"]], **fields)
