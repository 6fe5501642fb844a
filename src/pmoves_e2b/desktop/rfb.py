"""The VNC (RFB 3.8) relay between a browser's WebSocket and a desktop's VNC over WebSocket.

The desktop's x11vnc has a password (the SDK's ``stream.start(require_auth=True)``) so that
nobody who merely knows the sandbox id can watch it through the sandbox proxy. The relay
answers the password challenge itself and offers the browser "no authentication": the
browser was already checked against ``E2B_DESKTOP_AUTH_TOKEN``. After the handshake bytes
pass through unchanged, except in view-only mode, where the client's messages are parsed
and keyboard, pointer, clipboard and resize messages are dropped (enforced here, not left
to the viewer's goodwill).
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

VERSION = b"RFB 003.008\n"
SEC_NONE, SEC_VNC = 1, 2

# Client message type -> (fixed length, how to find the variable rest) for view-only parsing.
SET_PIXEL_FORMAT, SET_ENCODINGS, FB_UPDATE_REQUEST = 0, 2, 3
KEY_EVENT, POINTER_EVENT, CLIENT_CUT_TEXT = 4, 5, 6
ENABLE_CONTINUOUS_UPDATES, CLIENT_FENCE, XVP, SET_DESKTOP_SIZE, GII, QEMU = 150, 248, 250, 251, 253, 255
VIEW_ONLY_ALLOWED = frozenset(
    {SET_PIXEL_FORMAT, SET_ENCODINGS, FB_UPDATE_REQUEST, ENABLE_CONTINUOUS_UPDATES, CLIENT_FENCE}
)


class RfbError(Exception):
    """The handshake failed; the text is shown to the viewer."""


Receive = Callable[[], Awaitable[bytes]]
Send = Callable[[bytes], Awaitable[None]]


class Reader:
    """Exact-length reads over a message stream (WebSocket messages split RFB data anywhere)."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.buffer = bytearray()

    async def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = await self._receive()
            if not chunk:
                raise RfbError("the connection closed during the VNC handshake")
            self.buffer.extend(chunk)
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


def vnc_response(password: str, challenge: bytes) -> bytes:
    """VNC authentication: DES of the challenge with the password (8 bytes, bits mirrored) as key."""
    key = bytes(int(f"{b:08b}"[::-1], 2) for b in password.encode()[:8].ljust(8, b"\0"))
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()  # noqa: S305 - RFB mandates DES-ECB
    return encryptor.update(challenge) + encryptor.finalize()


async def upstream_handshake(reader: Reader, send: Send, password: str) -> None:
    """Log in to the desktop's x11vnc (server side of the relay) up to, not including, ClientInit."""
    version = await reader.read(12)
    if not version.startswith(b"RFB 003."):
        raise RfbError(f"the desktop did not answer as a VNC server ({version!r})")
    await send(VERSION)
    count = (await reader.read(1))[0]
    if count == 0:
        length = struct.unpack(">I", await reader.read(4))[0]
        raise RfbError("the desktop refused the connection: " + (await reader.read(length)).decode(errors="replace"))
    types = set(await reader.read(count))
    if SEC_VNC in types:
        await send(bytes([SEC_VNC]))
        await send(vnc_response(password, await reader.read(16)))
    elif SEC_NONE in types:
        await send(bytes([SEC_NONE]))
    else:
        raise RfbError(f"the desktop offers no usable VNC security type ({sorted(types)})")
    result = struct.unpack(">I", await reader.read(4))[0]
    if result != 0:
        raise RfbError("the desktop refused the VNC password")


async def client_handshake(reader: Reader, send: Send) -> None:
    """Greet the browser as a VNC server with security "none" (it authenticated with our token)."""
    await send(VERSION)
    version = await reader.read(12)
    if version not in (b"RFB 003.008\n", b"RFB 003.007\n"):
        raise RfbError(f"unsupported VNC client version {version!r}; use noVNC (RFB 3.8)")
    await send(bytes([1, SEC_NONE]))
    if (await reader.read(1))[0] != SEC_NONE:
        raise RfbError("the viewer chose a security type that was not offered")
    if version == VERSION:
        await send(struct.pack(">I", 0))


class ViewOnlyFilter:
    """Splits the client's byte stream into RFB messages and keeps only the non-input ones."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> bytes:
        self.buffer.extend(data)
        out = bytearray()
        while self.buffer:
            length = self._length()
            if length is None or len(self.buffer) < length:
                break
            message = bytes(self.buffer[:length])
            del self.buffer[:length]
            if message[0] in VIEW_ONLY_ALLOWED:
                out.extend(message)
        return bytes(out)

    def _length(self) -> int | None:
        """Length of the message at the buffer's head, None when more bytes are needed."""
        buf = self.buffer
        kind = buf[0]
        fixed = {SET_PIXEL_FORMAT: 20, FB_UPDATE_REQUEST: 10, KEY_EVENT: 8, POINTER_EVENT: 6}
        fixed.update({ENABLE_CONTINUOUS_UPDATES: 10, XVP: 4, QEMU: 12})
        if kind in fixed:
            return fixed[kind]
        if kind == SET_ENCODINGS:
            return None if len(buf) < 4 else 4 + 4 * struct.unpack(">H", buf[2:4])[0]
        if kind == CLIENT_CUT_TEXT:
            return None if len(buf) < 8 else 8 + abs(struct.unpack(">i", buf[4:8])[0])
        if kind == CLIENT_FENCE:
            return None if len(buf) < 9 else 9 + buf[8]
        if kind == SET_DESKTOP_SIZE:
            return None if len(buf) < 8 else 8 + 16 * buf[6]
        if kind == GII:
            return None if len(buf) < 4 else 4 + struct.unpack(">H", buf[2:4])[0]
        raise RfbError(f"unknown VNC client message type {kind}")
