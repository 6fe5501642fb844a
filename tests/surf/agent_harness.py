"""Agent-mode test parts: a site with a form, a scripted computer-use policy that reads the
screen, and two model services speaking the real wire formats (OpenAI Responses computer use,
Anthropic Messages computer use) on loopback.

The policy sees only the screenshot it is sent: it finds the page's parts by their colours
(the site paints them in colours nothing else on the desktop has), sees whether a field already
holds text (dark pixels inside it), and decides the next action like a computer-use model would.
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image, ImageChops

# Colours of the site's parts (RGB); a pixel within TOLERANCE of one belongs to that part.
LINK_BLUE = (20, 40, 230)
NAME_FIELD = (250, 210, 250)
EMAIL_FIELD = (200, 250, 250)
SUBMIT_ORANGE = (250, 130, 10)
THANKS_GREEN = (10, 190, 60)
TOLERANCE = 14
NAME, EMAIL = "Ada Lovelace", "ada@example.test"
FORM_TASK = f"Open the contact form, fill in name {NAME} and email {EMAIL}, and send it."

LANDING = f"""<!doctype html><title>pmoves agent site</title>
<body style="margin:40px;font:20px sans-serif;background:#fff">
<h1>Welcome</h1><p>Please fill in our contact form.</p>
<a href="/form" style="display:inline-block;padding:30px 60px;background:rgb{LINK_BLUE};color:#fff;
text-decoration:none">Contact form</a></body>"""
FORM = f"""<!doctype html><title>pmoves contact form</title>
<body style="margin:40px;font:24px sans-serif;background:#fff">
<form method="post" action="/submit">
<p>Name<br><input name="name" autocomplete="off" style="width:420px;height:56px;font:28px sans-serif;
border:0;background:rgb{NAME_FIELD};color:#000"></p>
<p>Email<br><input name="email" autocomplete="off" style="width:420px;height:56px;font:28px sans-serif;
border:0;background:rgb{EMAIL_FIELD};color:#000"></p>
<p><button type="submit" style="width:220px;height:70px;border:0;background:rgb{SUBMIT_ORANGE};
color:#fff;font:28px sans-serif">Send</button></p></form></body>"""
THANKS = f"""<!doctype html><title>thanks</title><body style="margin:0;background:#fff">
<div style="height:300px;background:rgb{THANKS_GREEN};color:#fff;font:40px sans-serif">Thank you!</div></body>"""


class FormSite:
    """The site (on a socket made by the caller, e.g. inside the fake internet's netns)."""

    def __init__(self, sock: socket.socket) -> None:
        self.submissions: list[dict[str, str]] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                page = {"/": LANDING, "/form": FORM}.get(self.path.split("?")[0])
                self._send(200 if page else 404, page or "not found")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                fields = urllib.parse.parse_qs(self.rfile.read(length).decode())
                site.submissions.append({k: v[0] for k, v in fields.items()})
                self._send(200, THANKS)

            def _send(self, status: int, text: str) -> None:
                body = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(sock.getsockname()[:2], Handler, bind_and_activate=False)
        self.server.socket.close()
        self.server.socket = sock
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


# ----- the policy: looks at the screen, answers the next step ------------------------------


@dataclass(frozen=True)
class Box:
    left: int
    top: int
    right: int
    bottom: int

    @property
    def centre(self) -> tuple[int, int]:
        return (self.left + self.right) // 2, (self.top + self.bottom) // 2


def find(image: Image.Image, colour: tuple[int, int, int], min_pixels: int = 400) -> Box | None:
    """The bounding box of the pixels of ``colour`` (None if there are too few to be a widget)."""
    bands = [
        band.point(lambda v, c=c: 255 if abs(v - c) <= TOLERANCE else 0)
        for band, c in zip(image.convert("RGB").split(), colour, strict=True)
    ]
    hit = ImageChops.multiply(ImageChops.multiply(bands[0], bands[1]), bands[2])
    box = hit.getbbox()
    if box is None or hit.histogram()[255] < min_pixels:
        return None
    return Box(*box)


def has_text(image: Image.Image, box: Box) -> bool:
    """Dark glyph pixels inside a (light) field: something was typed there."""
    inner = image.convert("L").crop((box.left + 4, box.top + 4, box.right - 4, box.bottom - 4))
    return sum(inner.histogram()[:90]) > 30


@dataclass
class Decision:
    reasoning: str
    action: dict[str, Any] | None  # in the policy's own words: click/type/wait; None = done
    target: str = ""  # what it acts on: link, name, email, send


@dataclass
class FormPolicy:
    """Fills NAME and EMAIL and presses Send; remembers only which field it clicked last."""

    typing_into: str | None = None
    seen: list[str] = field(default_factory=list)

    def decide(self, screen: Image.Image) -> Decision:
        if find(screen, THANKS_GREEN, min_pixels=5000):
            self.seen.append("thanks")
            return Decision("The page thanks me: the form was sent.", None)
        if self.typing_into is not None:
            value, self.typing_into = (NAME if self.typing_into == "name" else EMAIL), None
            return Decision("The field has the focus: type the value.", {"type": "type", "text": value})
        name, email = find(screen, NAME_FIELD), find(screen, EMAIL_FIELD)
        if name and email:
            self.seen.append("form")
            if not has_text(screen, name):
                self.typing_into = "name"
                return Decision("The name field is empty: click it.", {"type": "click", "at": name.centre})
            if not has_text(screen, email):
                self.typing_into = "email"
                return Decision("The email field is empty: click it.", {"type": "click", "at": email.centre})
            submit = find(screen, SUBMIT_ORANGE)
            if submit:
                return Decision("Both fields are filled: press Send.", {"type": "click", "at": submit.centre}, "send")
        link = find(screen, LINK_BLUE)
        if link:
            self.seen.append("landing")
            return Decision("The landing page links to the form: open it.", {"type": "click", "at": link.centre})
        self.seen.append("nothing")
        return Decision("Nothing I know is on the screen yet: wait.", {"type": "wait"})


def decode_png(url_or_b64: str) -> Image.Image:
    data = url_or_b64.split(",", 1)[1] if url_or_b64.startswith("data:") else url_or_b64
    return png_image(base64.b64decode(data, validate=True))


def png_image(raw: bytes) -> Image.Image:
    if not raw.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("not a PNG")
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image.convert("RGB")


# ----- the model services -------------------------------------------------------------------


class WireError(Exception):
    """The client broke the wire format: answered as the real service would (400)."""


class ModelDouble:
    """A local HTTP server; ``fail`` = (status, JSON body) answers every request with that error."""

    path = ""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.policy = FormPolicy()
        self.requests: list[dict[str, Any]] = []
        self.fail: tuple[int, dict[str, Any]] | None = None
        # (request received, answer sent) on time.monotonic(): the gaps are the client's time per turn
        self.timeline: list[tuple[float, float]] = []
        self._ids = itertools.count(1)
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                received = time.monotonic()
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, answer = double.answer(self.path, headers, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                double.timeline.append((received, time.monotonic()))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def next_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids):04d}"

    def answer(self, path: str, headers: dict[str, str], body: Any) -> tuple[int, dict[str, Any]]:
        if self.fail is not None:
            return self.fail
        if path != self.path:
            return 404, self.error_body("not_found_error", f"no route {path}")
        denied = self.auth_error(headers)
        if denied is not None:
            return denied
        self.requests.append(body)
        try:
            return 200, self.respond(headers, body)
        except (WireError, ValueError, KeyError, TypeError, IndexError) as exc:
            return 400, self.error_body("invalid_request_error", f"wire format: {exc}")

    def auth_error(self, headers: dict[str, str]) -> tuple[int, dict[str, Any]] | None:
        raise NotImplementedError

    def error_body(self, kind: str, message: str) -> dict[str, Any]:
        raise NotImplementedError

    def respond(self, headers: dict[str, str], body: Any) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


def _need(condition: bool, what: str) -> None:
    if not condition:
        raise WireError(what)


class OpenAIResponsesDouble(ModelDouble):
    """``POST /v1/responses`` with the ``computer_use_preview`` tool: one ``computer_call`` per
    response, chained by ``previous_response_id``, answered by ``computer_call_output``."""

    path = "/v1/responses"

    SAFETY_CHECK = {"id": "cu_sc_0001", "code": "irrelevant_domain", "message": "Sending a form to an unknown site."}

    def __init__(self, api_key: str) -> None:
        super().__init__(api_key)
        self._last: tuple[str, str] | None = None  # (response id, call id) awaiting its output
        self.display: tuple[int, int] | None = None
        self.check_before_send = False  # the call that presses Send carries a pending safety check
        self._awaiting_ack = False
        self.acknowledged: list[dict[str, Any]] = []

    def auth_error(self, headers: dict[str, str]) -> tuple[int, dict[str, Any]] | None:
        if headers.get("authorization") != f"Bearer {self.api_key}":
            return 401, {
                "error": {
                    "message": "Incorrect API key provided.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            }
        return None

    def error_body(self, kind: str, message: str) -> dict[str, Any]:
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}

    def respond(self, headers: dict[str, str], body: Any) -> dict[str, Any]:
        _need(isinstance(body.get("model"), str), "model is required")
        tools = body["tools"]
        _need(len(tools) == 1 and tools[0]["type"] == "computer_use_preview", "one computer_use_preview tool")
        _need(tools[0]["environment"] in ("browser", "mac", "windows", "ubuntu", "linux"), "environment")
        self.display = (int(tools[0]["display_width"]), int(tools[0]["display_height"]))
        items = body["input"]
        if self._last is None:
            _need("previous_response_id" not in body, "no previous response yet")
            content = items[0]["content"]
            _need(items[0]["role"] == "user", "first input is the user's message")
            _need(any(c["type"] == "input_text" and c["text"] for c in content), "input_text with the task")
            images = [c["image_url"] for c in content if c["type"] == "input_image"]
            _need(len(images) == 1, "one input_image")
            screen = decode_png(images[0])
        else:
            _need(body.get("previous_response_id") == self._last[0], "previous_response_id of the last response")
            _need(len(items) == 1 and items[0]["type"] == "computer_call_output", "one computer_call_output")
            _need(items[0]["call_id"] == self._last[1], "call_id of the last computer_call")
            output = items[0]["output"]
            _need(output["type"] in ("computer_screenshot", "input_image"), "output is a screenshot")
            acks = items[0].get("acknowledged_safety_checks") or []
            if self._awaiting_ack:
                _need(acks == [self.SAFETY_CHECK], "the pending safety check is acknowledged")
                self.acknowledged += acks
                self._awaiting_ack = False
            screen = decode_png(output["image_url"])
        _need(screen.size == self.display, f"screenshot {screen.size} is the declared display {self.display}")
        decision = self.policy.decide(screen)
        response_id = self.next_id("resp")
        output_items: list[dict[str, Any]] = [
            {
                "type": "reasoning",
                "id": self.next_id("rs"),
                "summary": [{"type": "summary_text", "text": decision.reasoning}],
            }
        ]
        if decision.action is None:
            self._last = None
            output_items.append(
                {
                    "type": "message",
                    "id": self.next_id("msg"),
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": decision.reasoning, "annotations": []}],
                }
            )
        else:
            call_id = self.next_id("call")
            self._last = (response_id, call_id)
            self._awaiting_ack = self.check_before_send and decision.target == "send"
            output_items.append(
                {
                    "type": "computer_call",
                    "id": self.next_id("cu"),
                    "call_id": call_id,
                    "action": self._action(decision.action),
                    "pending_safety_checks": [self.SAFETY_CHECK] if self._awaiting_ack else [],
                    "status": "completed",
                }
            )
        return {
            "id": response_id,
            "object": "response",
            "created_at": 1_765_000_000,
            "status": "completed",
            "error": None,
            "incomplete_details": None,
            "model": body["model"],
            "output": output_items,
            "previous_response_id": body.get("previous_response_id"),
            "truncation": body.get("truncation", "disabled"),
            "usage": {"input_tokens": 1000, "output_tokens": 20, "total_tokens": 1020},
        }

    @staticmethod
    def _action(action: dict[str, Any]) -> dict[str, Any]:
        if action["type"] == "click":
            x, y = action["at"]
            return {"type": "click", "button": "left", "x": x, "y": y}
        if action["type"] == "type":
            return {"type": "type", "text": action["text"]}
        return {"type": "wait"}


class AnthropicDouble(ModelDouble):
    """``POST /v1/messages`` with the ``computer_20250124`` tool (beta ``computer-use-2025-01-24``):
    stateless, the whole conversation each time; a click on a field comes with the typing as a
    second ``tool_use`` in the same message."""

    path = "/v1/messages"

    def __init__(self, api_key: str) -> None:
        super().__init__(api_key)
        self.display: tuple[int, int] | None = None

    def auth_error(self, headers: dict[str, str]) -> tuple[int, dict[str, Any]] | None:
        if headers.get("x-api-key") != self.api_key:
            return 401, self.error_body("authentication_error", "invalid x-api-key")
        return None

    def error_body(self, kind: str, message: str) -> dict[str, Any]:
        return {"type": "error", "error": {"type": kind, "message": message}}

    def respond(self, headers: dict[str, str], body: Any) -> dict[str, Any]:
        _need(headers.get("anthropic-version") == "2023-06-01", "anthropic-version header")
        _need("computer-use-2025-01-24" in headers.get("anthropic-beta", ""), "computer-use beta header")
        _need(isinstance(body["max_tokens"], int) and body["max_tokens"] > 0, "max_tokens")
        tools = body["tools"]
        _need(len(tools) == 1 and tools[0]["type"] == "computer_20250124" and tools[0]["name"] == "computer", "tool")
        self.display = (int(tools[0]["display_width_px"]), int(tools[0]["display_height_px"]))
        messages = body["messages"]
        _need(messages[0]["role"] == "user" and messages[-1]["role"] == "user", "starts and ends with the user")
        for a, b in itertools.pairwise(messages):
            _need(a["role"] != b["role"], "roles alternate")
        last = messages[-1]["content"]
        if len(messages) > 1:
            asked = [b["id"] for b in messages[-2]["content"] if b["type"] == "tool_use"]
            answered = [b["tool_use_id"] for b in last if b["type"] == "tool_result"]
            _need(asked == answered, f"a tool_result for every tool_use ({asked} vs {answered})")
            images = [c for b in last for c in b.get("content", []) if c["type"] == "image"]
        else:
            images = [b for b in last if b["type"] == "image"]
        _need(len(images) == 1, "one screenshot in the last message")
        source = images[0]["source"]
        _need(source["type"] == "base64" and source["media_type"] == "image/png", "base64 PNG image source")
        screen = decode_png(source["data"])
        _need(screen.size == self.display, f"screenshot {screen.size} is the declared display {self.display}")
        decision = self.policy.decide(screen)
        content: list[dict[str, Any]] = [{"type": "text", "text": decision.reasoning}]
        action = decision.action
        if action is not None:
            if action["type"] == "click":
                content.append(self._tool({"action": "left_click", "coordinate": list(action["at"])}))
                if self.policy.typing_into is not None:  # click and type in one message
                    typed = self.policy.decide(screen).action
                    assert typed is not None
                    content.append(self._tool({"action": "type", "text": typed["text"]}))
            elif action["type"] == "type":
                content.append(self._tool({"action": "type", "text": action["text"]}))
            else:
                content.append(self._tool({"action": "wait", "duration": 1}))
        return {
            "id": self.next_id("msg"),
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": content,
            "stop_reason": "tool_use" if action is not None else "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 1000, "output_tokens": 20},
        }

    def _tool(self, tool_input: dict[str, Any]) -> dict[str, Any]:
        return {"type": "tool_use", "id": self.next_id("toolu"), "name": "computer", "input": tool_input}


class ChatDouble(ModelDouble):
    """An OpenAI-compatible vision chat server (``POST /v1/chat/completions``, as vLLM, Ollama or
    LM Studio serve it) whose answers follow the JSON action protocol of ``openai_chat.py``."""

    path = "/v1/chat/completions"

    def auth_error(self, headers: dict[str, str]) -> tuple[int, dict[str, Any]] | None:
        if headers.get("authorization") != f"Bearer {self.api_key}":
            return 401, self.error_body("invalid_request_error", "Invalid API key")
        return None

    def error_body(self, kind: str, message: str) -> dict[str, Any]:
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}

    def respond(self, headers: dict[str, str], body: Any) -> dict[str, Any]:
        _need(isinstance(body.get("model"), str), "model is required")
        messages = body["messages"]
        _need(messages[0]["role"] == "system" and messages[-1]["role"] == "user", "system first, user last")
        images = [
            part["image_url"]["url"]
            for message in messages
            if isinstance(message["content"], list)
            for part in message["content"]
            if part["type"] == "image_url"
        ]
        _need(len(images) == 1, "one image in the conversation")
        screen = decode_png(images[0])
        decision = self.policy.decide(screen)
        actions: list[dict[str, Any]] = []
        if decision.action is not None:
            if decision.action["type"] == "click":
                x, y = decision.action["at"]
                actions.append({"type": "click", "x": x, "y": y})
                if self.policy.typing_into is not None:  # click and type in one answer
                    typed = self.policy.decide(screen).action
                    assert typed is not None
                    actions.append({"type": "type", "text": typed["text"]})
            elif decision.action["type"] == "type":
                actions.append({"type": "type", "text": decision.action["text"]})
            else:
                actions.append({"type": "wait", "ms": 1000})
        answer = {
            "reasoning": decision.reasoning,
            "actions": actions,
            "done": decision.action is None,
            "message": decision.reasoning if decision.action is None else "",
        }
        return {
            "id": self.next_id("chatcmpl"),
            "object": "chat.completion",
            "created": 1_765_000_000,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "```json\n" + json.dumps(answer) + "\n```"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 40, "total_tokens": 1040},
        }


@contextlib.contextmanager
def serving(double_cls: Callable[[str], ModelDouble], api_key: str) -> Iterator[Any]:
    double = double_cls(api_key)
    try:
        yield double
    finally:
        double.close()


MODEL_KEY = "sk-test-" + "m" * 24


@dataclass
class ModelDoubles:
    """The model services an e2b-surf under test uses for agent mode (its settings in ``env``)."""

    openai: OpenAIResponsesDouble
    anthropic: AnthropicDouble
    chat: ChatDouble

    @property
    def env(self) -> dict[str, str]:
        return {
            "OPENAI_API_KEY": MODEL_KEY,
            "ANTHROPIC_API_KEY": MODEL_KEY,
            "E2B_SURF_CHAT_API_KEY": MODEL_KEY,
            "E2B_SURF_OPENAI_BASE_URL": self.openai.url + "/v1",
            "E2B_SURF_ANTHROPIC_BASE_URL": self.anthropic.url,
            "E2B_SURF_CHAT_BASE_URL": self.chat.url + "/v1",
        }

    def reset(self) -> None:
        """For a new run: policies that remember nothing, no scripted failure, no safety check."""
        for double in (self.openai, self.anthropic, self.chat):
            double.policy = FormPolicy()
            double.fail = None
            double.requests.clear()
            double.timeline.clear()
        self.openai.check_before_send = False


@contextlib.contextmanager
def model_services() -> Iterator[ModelDoubles]:
    with (
        serving(OpenAIResponsesDouble, MODEL_KEY) as openai,
        serving(AnthropicDouble, MODEL_KEY) as anthropic,
        serving(ChatDouble, MODEL_KEY) as chat,
    ):
        yield ModelDoubles(openai, anthropic, chat)
