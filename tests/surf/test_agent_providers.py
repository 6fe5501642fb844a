"""Agent-mode model providers against local services speaking the real wire formats.

The screens are drawn here (the site's widgets in their colours); the scripted policy in each
service reads them. No desktop needed: this is the provider <-> wire half of the agent loop.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image, ImageDraw
from surf.agent_harness import (
    EMAIL,
    EMAIL_FIELD,
    LINK_BLUE,
    NAME,
    NAME_FIELD,
    SUBMIT_ORANGE,
    THANKS_GREEN,
    AnthropicDouble,
    ModelDouble,
    OpenAIResponsesDouble,
    serving,
)

from pmoves_e2b.config import Settings
from pmoves_e2b.desktop.actions import Click, Key, Scroll, Type, Wait
from pmoves_e2b.surf.agent.providers import Display, ProviderError, make_provider, parse_model
from pmoves_e2b.surf.agent.providers.anthropic import AnthropicComputerUse
from pmoves_e2b.surf.agent.providers.base import Navigate, Provider
from pmoves_e2b.surf.agent.providers.openai_chat import OpenAIChat
from pmoves_e2b.surf.agent.providers.openai_responses import OpenAIResponses

DISPLAY = Display(1024, 768)
KEY = "sk-test-" + "k" * 24
NAME_BOX, EMAIL_BOX, SEND_BOX = (100, 100, 520, 156), (100, 220, 520, 276), (100, 340, 320, 410)


def screen(*, form: bool = False, name: str = "", email: str = "", link: bool = False, thanks: bool = False) -> bytes:
    image = Image.new("RGB", (DISPLAY.width, DISPLAY.height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    if link:
        draw.rectangle((300, 300, 500, 360), fill=LINK_BLUE)
    if form:
        draw.rectangle(NAME_BOX, fill=NAME_FIELD)
        draw.rectangle(EMAIL_BOX, fill=EMAIL_FIELD)
        draw.rectangle(SEND_BOX, fill=SUBMIT_ORANGE)
        for text, box in ((name, NAME_BOX), (email, EMAIL_BOX)):
            if text:  # typed text: dark glyph-like strokes inside the field
                draw.rectangle((box[0] + 10, box[1] + 15, box[0] + 10 + 12 * len(text), box[1] + 40), fill=(0, 0, 0))
    if thanks:
        draw.rectangle((0, 0, DISPLAY.width, 300), fill=THANKS_GREEN)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def provider_for(cls: type[Provider], double: ModelDouble, key: str = KEY) -> Provider:
    base = double.url + ("/v1" if cls is OpenAIResponses else "")
    return cls(
        model="test-model",
        task="Fill in the contact form and send it.",
        display=DISPLAY,
        base_url=base,
        api_key=key,
        timeout_s=10,
    )


def centre(box: tuple[int, int, int, int]) -> tuple[int, int]:
    return (box[0] + box[2] + 1) // 2, (box[1] + box[3] + 1) // 2


@pytest.fixture()
def openai_double() -> Iterator[OpenAIResponsesDouble]:
    with serving(OpenAIResponsesDouble, KEY) as double:
        yield double


@pytest.fixture()
def anthropic_double() -> Iterator[AnthropicDouble]:
    with serving(AnthropicDouble, KEY) as double:
        yield double


def test_openai_responses_turns_fill_the_form(openai_double: OpenAIResponsesDouble) -> None:
    async def run() -> list[Any]:
        provider = provider_for(OpenAIResponses, openai_double)
        try:
            turns = [await provider.step(screen(link=True))]
            turns.append(await provider.step(screen(form=True)))
            turns.append(await provider.step(screen(form=True)))  # focus: type
            turns.append(await provider.step(screen(form=True, name=NAME)))
            turns.append(await provider.step(screen(form=True, name=NAME)))
            turns.append(await provider.step(screen(form=True, name=NAME, email=EMAIL)))
            turns.append(await provider.step(screen(thanks=True)))
            return turns
        finally:
            await provider.aclose()

    turns = asyncio.run(run())
    assert [t.actions for t in turns[:-1]] == [
        [Click(type="click", x=400, y=330)],
        [Click(type="click", x=centre(NAME_BOX)[0], y=centre(NAME_BOX)[1])],
        [Type(type="type", text=NAME)],
        [Click(type="click", x=centre(EMAIL_BOX)[0], y=centre(EMAIL_BOX)[1])],
        [Type(type="type", text=EMAIL)],
        [Click(type="click", x=centre(SEND_BOX)[0], y=centre(SEND_BOX)[1])],
    ]
    assert turns[0].reasoning == "The landing page links to the form: open it."
    assert not any(t.done for t in turns[:-1])
    assert turns[-1].done and turns[-1].message == "The page thanks me: the form was sent." and not turns[-1].actions
    first, second = openai_double.requests[0], openai_double.requests[1]
    assert "previous_response_id" not in first and first["tools"][0]["display_width"] == 1024
    assert second["previous_response_id"] == "resp_0001"
    assert second["input"][0]["type"] == "computer_call_output"


def test_anthropic_turns_fill_the_form(anthropic_double: AnthropicDouble) -> None:
    async def run() -> list[Any]:
        provider = provider_for(AnthropicComputerUse, anthropic_double)
        try:
            turns = [await provider.step(screen(link=True))]
            turns.append(await provider.step(screen(form=True)))
            turns.append(await provider.step(screen(form=True, name=NAME)))
            turns.append(await provider.step(screen(form=True, name=NAME, email=EMAIL)))
            for _ in range(4):  # more turns than screenshots kept: old ones leave the history
                turns.append(await provider.step(screen(form=True, name=NAME, email=EMAIL)))
            turns.append(await provider.step(screen(thanks=True)))
            return turns
        finally:
            await provider.aclose()

    turns = asyncio.run(run())
    nx, ny = centre(NAME_BOX)
    assert turns[1].actions == [Click(type="click", x=nx, y=ny), Type(type="type", text=NAME)]
    assert turns[2].actions[1] == Type(type="type", text=EMAIL)
    assert turns[-1].done and "sent" in turns[-1].message
    last = anthropic_double.requests[-1]["messages"]
    images = json.dumps(last).count('"media_type": "image/png"')
    assert images == 3  # KEEP_SCREENSHOTS


def test_anthropic_action_vocabulary_maps_onto_desktop_actions() -> None:
    provider = AnthropicComputerUse(
        model="m", task="t", display=DISPLAY, base_url="http://127.0.0.1:9", api_key=None, timeout_s=1
    )
    assert provider._map({"action": "key", "text": "ctrl+l"}) == [Key(type="key", keys="ctrl+l")]
    assert provider._map({"action": "key", "text": "Return"}) == [Key(type="key", keys="Return")]
    assert provider._map(
        {"action": "scroll", "coordinate": [10, 20], "scroll_direction": "down", "scroll_amount": 5}
    ) == [Scroll(type="scroll", x=10, y=20, direction="down", amount=5)]
    assert provider._map({"action": "wait", "duration": 2}) == [Wait(type="wait", ms=2000)]
    drag = provider._map({"action": "left_click_drag", "start_coordinate": [1, 2], "coordinate": [30, 40]})[0]
    assert drag.model_dump(by_alias=True) == {"type": "drag", "from": (1, 2), "to": (30, 40)}
    for bad in (
        {"action": "left_click", "coordinate": [2000, 10]},
        {"action": "scroll", "coordinate": [1, 1], "scroll_direction": "left", "scroll_amount": 1},
        {"action": "key", "text": "NoSuchKey"},
        {"action": "hold_key", "text": "shift", "duration": 1},
    ):
        with pytest.raises(ValueError):
            provider._map(bad)
    asyncio.run(provider.aclose())


def test_openai_action_vocabulary_maps_onto_desktop_actions() -> None:
    provider = OpenAIResponses(
        model="m", task="t", display=DISPLAY, base_url="http://127.0.0.1:9", api_key=None, timeout_s=1
    )
    assert provider._map({"type": "keypress", "keys": ["CTRL", "L"]}) == [Key(type="key", keys=["CTRL", "L"])]
    assert provider._map({"type": "scroll", "x": 5, "y": 6, "scroll_x": 0, "scroll_y": -300}) == [
        Scroll(type="scroll", x=5, y=6, direction="up", amount=3)
    ]
    assert provider._map({"type": "click", "button": "back", "x": 1, "y": 1}) == [Key(type="key", keys=["alt", "left"])]
    assert provider._map({"type": "screenshot"}) == []
    with pytest.raises(ValueError, match="outside the 1024x768 screen"):
        provider._map({"type": "click", "button": "left", "x": 1024, "y": 5})
    asyncio.run(provider.aclose())


@pytest.mark.parametrize("failure", ["wrong key", "server error"])
@pytest.mark.parametrize("cls", [OpenAIResponses, AnthropicComputerUse])
def test_a_model_service_error_is_a_clear_provider_error(
    cls: type[Provider], failure: str, openai_double: OpenAIResponsesDouble, anthropic_double: AnthropicDouble
) -> None:
    double: ModelDouble = openai_double if cls is OpenAIResponses else anthropic_double
    if failure == "server error":
        double.fail = (500, double.error_body("api_error", "The server had an error processing your request."))
    provider = provider_for(cls, double, key="sk-wrong" if failure == "wrong key" else KEY)
    with pytest.raises(ProviderError) as caught:
        asyncio.run(provider.step(screen(link=True)))
    asyncio.run(provider.aclose())
    if failure == "wrong key":
        assert caught.value.code == "model_auth"
        assert "HTTP 401" in caught.value.message and "sk-wrong" not in caught.value.message
    else:
        assert caught.value.code == "model_error"
        assert "HTTP 500" in caught.value.message and "had an error processing" in caught.value.message


def test_an_unreachable_model_is_a_clear_provider_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = OpenAIResponses(
        model="m", task="t", display=DISPLAY, base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, timeout_s=5
    )
    with pytest.raises(ProviderError) as caught:
        asyncio.run(provider.step(screen()))
    asyncio.run(provider.aclose())
    assert caught.value.code == "model_unreachable"


def test_openai_compatible_chat_reads_json_actions() -> None:
    """The chat provider against a server answering chat completions with the JSON protocol."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[dict[str, Any]] = []
    answers = iter(
        [
            'Sure! ```json\n{"reasoning": "open the form", "actions": [{"type": "navigate", "url": '
            '"http://198.51.100.80/form"}, {"type": "click", "x": 310, "y": 128}], "done": false}\n```',
            "I cannot decide.",
            '{"reasoning": "sent", "actions": [], "done": true, "message": "form sent"}',
        ]
    )

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            data = json.dumps(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": next(answers)},
                            "finish_reason": "stop",
                        }
                    ],
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    async def run() -> list[Any]:
        provider = OpenAIChat(
            model="qwen2.5-vl",
            task="Send the form",
            display=DISPLAY,
            base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
            api_key=None,
            timeout_s=5,
        )
        try:
            return [await provider.step(screen(form=True)) for _ in range(3)]
        finally:
            await provider.aclose()

    try:
        turns = asyncio.run(run())
    finally:
        server.shutdown()
        server.server_close()
    assert turns[0].actions == [Navigate(url="http://198.51.100.80/form"), Click(type="click", x=310, y=128)]
    assert turns[1].rejected == ["the answer was not one JSON object"] and not turns[1].done
    assert turns[2].done and turns[2].message == "form sent"
    # only the newest screenshot travels; the model is told what was wrong with its last answer
    last = seen[-1]["messages"]
    assert json.dumps(last).count("data:image/png;base64,") == 1
    assert "not one JSON object" in last[-1]["content"][0]["text"]


def test_model_setting_chooses_the_provider() -> None:
    assert str(parse_model("anthropic:claude-sonnet-4-5")) == "anthropic:claude-sonnet-4-5"
    for bad in ("gpt-4o", "google:gemini", "openai:"):
        with pytest.raises(ValueError, match="provider:model"):
            parse_model(bad)
    settings = Settings(anthropic_api_key=KEY, e2b_surf_anthropic_base_url="http://127.0.0.1:9")
    provider = make_provider(parse_model("anthropic:claude-x"), settings, task="t", display=DISPLAY)
    assert isinstance(provider, AnthropicComputerUse) and provider.base_url == "http://127.0.0.1:9"
    asyncio.run(provider.aclose())
    with pytest.raises(ValueError, match="E2B_SURF_CHAT_BASE_URL"):
        make_provider(parse_model("openai-compatible:llava"), Settings(), task="t", display=DISPLAY)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        make_provider(
            parse_model("openai:computer-use-preview"), Settings(openai_api_key=None), task="t", display=DISPLAY
        )
