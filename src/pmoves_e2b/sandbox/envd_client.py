"""The control plane's own calls to a sandbox's envd: /init, starting the template's
start command, and waiting for a port to answer.

These go straight to the sandbox address from the host (never through the public proxy,
which refuses /init).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import struct
import time
from typing import Any

import httpx

from pmoves_e2b.sandbox.aio import poll_until
from pmoves_e2b.sandbox.backends.base import ENVD_PORT, BackendError, TemplateImage

_CONNECT_JSON = "application/connect+json"


class EnvdClient:
    def __init__(self) -> None:
        # One pooled client for every sandbox; sandboxes are on host-routed addresses.
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(10.0), trust_env=False)

    async def close(self) -> None:
        await self._http.aclose()

    async def init(self, address: str, init_secret: str, body: dict[str, Any], wait_s: float = 0.0) -> None:
        """POST /init; with ``wait_s``, retried while envd does not answer yet (it may be starting)."""
        headers = {"Content-Type": "application/json", "X-Envd-Init-Secret": init_secret}
        payload = json.dumps(body).encode()
        deadline, delay = time.monotonic() + wait_s, 0.001
        while True:
            try:
                status, answer = await _request(address, ENVD_PORT, "POST", "/init", headers, payload, 10.0)
                break
            except (OSError, TimeoutError, BackendError):  # /init sets state: sending it again is harmless
                if time.monotonic() + delay >= deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.02)
        if status >= 300:
            raise BackendError(f"envd /init answered {status}: {answer[:200].decode(errors='replace')}")

    async def start_background(
        self,
        address: str,
        access_token: str | None,
        cmd: str,
        user: str,
        tag: str = "template-start",
        envs: dict[str, str] | None = None,
    ) -> int:
        """Start ``cmd`` under bash as ``user``; return its pid once envd reports the start.

        The process outlives this request (envd keeps processes whose client went away).
        """
        message = {
            "process": {"cmd": "/bin/bash", "args": ["-l", "-c", cmd], "envs": envs or {}},
            "tag": tag,
            "stdin": False,
        }
        start = await self._process_event(address, access_token, user, message, "start", self._http.timeout)
        return int(start.get("pid", 0))

    async def start_template(self, address: str, template: TemplateImage, timeout_s: float) -> None:
        """Start the template's start command and wait for its ready checks (port, command)."""
        if template.start_cmd:
            await self.start_background(address, None, template.start_cmd, template.start_user)
        if template.ready_port:
            await self.wait_http_ok(address, template.ready_port, "/health", timeout_s)
        if template.ready_cmd:  # custom templates (E2B's set_start_cmd(start, ready))
            await self.wait_command_ok(address, template.ready_cmd, template.start_user, timeout_s)

    async def wait_command_ok(self, address: str, cmd: str, user: str, timeout_s: float) -> None:
        """Run ``cmd`` (bash) as ``user`` until it exits 0 (a template's ready command)."""
        last = "never ran"
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    code = await self._run_to_exit(address, cmd, user)
                    if code == 0:
                        return
                    last = f"exit {code}"
                    await asyncio.sleep(0.2)
        except TimeoutError:
            raise BackendError(f"ready command {cmd!r} did not succeed in {timeout_s:.0f} s (last: {last})") from None

    async def _run_to_exit(self, address: str, cmd: str, user: str) -> int:
        message = {"process": {"cmd": "/bin/bash", "args": ["-l", "-c", cmd], "envs": {}}, "stdin": False}
        end = await self._process_event(address, None, user, message, "end", None)
        return int(end.get("exitCode", 0))  # proto3 JSON leaves out a zero

    async def _process_event(
        self,
        address: str,
        access_token: str | None,
        user: str,
        message: dict[str, Any],
        kind: str,
        timeout: httpx.Timeout | None,
    ) -> dict[str, Any]:
        """Call envd's process.Process/Start (Connect streaming, JSON) and return the first event
        of ``kind`` ("start" or "end") from its stream; ``timeout`` None waits as long as the command runs."""
        payload = json.dumps(message).encode()
        headers = {
            "Content-Type": _CONNECT_JSON,
            "Connect-Protocol-Version": "1",
            # Basic auth with an empty password selects the user, as the SDK does.
            "Authorization": "Basic " + base64.b64encode(f"{user}:".encode()).decode(),
        }
        if access_token:
            headers["X-Access-Token"] = access_token
        url = f"http://{address}:{ENVD_PORT}/process.Process/Start"
        body = struct.pack(">BI", 0, len(payload)) + payload
        cmd = message["process"]["args"][-1]
        async with self._http.stream("POST", url, content=body, headers=headers, timeout=timeout) as res:
            if res.status_code != 200:
                raise BackendError(f"envd Start answered {res.status_code}: {(await res.aread())[:200]!r}")
            buf = b""
            async for chunk in res.aiter_bytes():
                buf += chunk
                while len(buf) >= 5:
                    flags, size = struct.unpack(">BI", buf[:5])
                    if len(buf) < 5 + size:
                        break
                    frame, buf = json.loads(buf[5 : 5 + size] or b"{}"), buf[5 + size :]
                    if flags & 0x02:
                        raise BackendError(f"envd refused to run {cmd!r}: {frame.get('error')}")
                    event = frame.get("event", {}).get(kind)
                    if event is not None:
                        return dict(event)
        raise BackendError(f"envd closed the stream of {cmd!r} without its {kind} event")

    async def listening(self, address: str, timeout_s: float = 2.0) -> bool | None:
        """True when envd accepts a connection; False when the sandbox refuses it (nothing listens
        on envd's port: envd is gone); None when there is no answer in time (busy, not dead)."""
        try:
            async with asyncio.timeout(timeout_s):
                _, writer = await asyncio.open_connection(address, ENVD_PORT)
        except ConnectionRefusedError:
            return False
        except (OSError, TimeoutError):
            return None
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def wait_http_ok(self, address: str, port: int, path: str, timeout_s: float) -> None:
        """Poll ``GET http://address:port/path`` until it answers 2xx."""
        last = "no answer"

        async def answers() -> bool:
            nonlocal last
            try:
                status, _ = await _request(address, port, "GET", path, {}, b"", 2.0)
            except (OSError, TimeoutError, BackendError) as exc:
                last = type(exc).__name__
                return False
            last = f"HTTP {status}"
            return status < 300

        if not await poll_until(answers, timeout_s, max_delay_s=0.02):
            raise BackendError(f"port {port} of the sandbox did not become ready in {timeout_s:.0f} s ({last})")


ANSWER_LIMIT = 64 * 1024  # what we read of an answer: only its status and the start of an error matter


async def _request(
    address: str, port: int, method: str, path: str, headers: dict[str, str], body: bytes, timeout_s: float
) -> tuple[int, bytes]:
    """One small HTTP/1.1 request on its own connection: (status, start of the body). The control
    plane's own calls at create (readiness, /init) are a few tiny requests per sandbox, where
    httpx's layers cost a few ms of CPU each; this costs a connect. The answer comes from inside a
    sandbox: it is read up to ANSWER_LIMIT and within ``timeout_s``, no more."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {address}:{port}", "Connection: close"]
    lines += [f"Content-Length: {len(body)}", *(f"{name}: {value}" for name, value in headers.items())]
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(address, port, limit=ANSWER_LIMIT)
        try:
            writer.write("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                raise BackendError(f"no HTTP answer from {address}:{port}{path}") from exc
            status_line, *fields = head.decode("latin-1").split("\r\n")
            version, _, code = status_line.partition(" ")
            if not version.startswith("HTTP/1.") or not code[:3].isdigit():
                raise BackendError(f"no HTTP answer from {address}:{port}{path}")
            length = next((v for k, _, v in (f.partition(":") for f in fields) if k.lower() == "content-length"), None)
            if length is not None and length.strip().isdigit():
                content = await reader.read(min(int(length), ANSWER_LIMIT))
            else:  # chunked or until the end: as much as fits (only error texts are shown)
                content = await reader.read(ANSWER_LIMIT)
        finally:
            writer.close()
    return int(code[:3]), content
