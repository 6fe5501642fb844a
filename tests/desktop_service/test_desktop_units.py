"""Credentials, key names, actions and the VNC view-only filter (no service, no sandbox)."""

from __future__ import annotations

import struct
import time

import pytest

from pmoves_e2b.desktop.desktops import DesktopError
from pmoves_e2b.desktop.keys import KeyNameError, parse_keys
from pmoves_e2b.desktop.links import Signer
from pmoves_e2b.desktop.rfb import ViewOnlyFilter, vnc_response
from pmoves_e2b.desktop.routes import parse_actions


def test_signed_link_round_trip_and_scope() -> None:
    signer = Signer("token-1")
    link = signer.sign("link", "sbx123", "view", 60)
    grant = signer.verify("link", link)
    assert grant is not None and grant.view_only and grant.covers("sbx123") and not grant.covers("other")


def test_expired_forged_or_foreign_credentials_are_refused() -> None:
    signer = Signer("token-1")
    expired = signer.sign("link", "sbx123", "control", 10, now=time.time() - 60)
    assert signer.verify("link", expired) is None
    good = signer.sign("link", "sbx123", "control", 60)
    assert signer.verify("ticket", good) is None  # a link is not a WebSocket ticket
    assert Signer("token-2").verify("link", good) is None  # another token (or a rotated one)
    tampered = good.replace(".control.", ".view.").replace("sbx123", "sbx124")
    assert signer.verify("link", tampered) is None
    assert signer.verify("link", "") is None and signer.verify("link", "1.2.3") is None


def test_key_names_map_to_sdk_names_and_unknown_ones_fail() -> None:
    assert parse_keys("ctrl+shift+t") == ["ctrl", "shift", "t"]
    assert parse_keys(["CTRL", "L"]) == ["ctrl", "l"]
    assert parse_keys("Return") == ["enter"]
    assert parse_keys("+") == ["plus"]
    with pytest.raises(KeyNameError, match="unknown key 'ENTERR'"):
        parse_keys("ENTERR")


def test_actions_are_validated_with_clear_messages() -> None:
    actions = parse_actions({"actions": [{"type": "move", "x": 1, "y": 2}, {"type": "key", "keys": "enter"}]})
    assert [a.type for a in actions] == ["move", "key"]
    for body, words in [
        ({"type": "click", "x": 5}, "both x and y"),
        ({"type": "teleport"}, "teleport"),
        ({"type": "move", "x": 1, "y": 2, "speed": 3}, "speed"),
        ({"type": "open", "url": "http://a b"}, "without spaces"),
        ({"type": "launch", "app": "x; rm -rf /"}, "desktop entry name"),
    ]:
        with pytest.raises(DesktopError) as caught:
            parse_actions(body)
        assert caught.value.status == 422 and words in caught.value.message, caught.value.message


def test_vnc_response_uses_the_first_eight_password_characters() -> None:
    # VNC authentication keys DES with at most 8 password bytes (RFC 6143 §7.2.2).
    challenge = bytes(range(16))
    assert vnc_response("password", challenge) == vnc_response("passwordXYZ", challenge)
    assert vnc_response("password", challenge) != vnc_response("Password", challenge)


def test_view_only_filter_drops_input_and_keeps_screen_requests() -> None:
    update = bytes([3, 1]) + struct.pack(">HHHH", 0, 0, 100, 100)
    pointer = bytes([5, 1]) + struct.pack(">HH", 10, 10)
    key = bytes([4, 1, 0, 0]) + struct.pack(">I", 0x61)
    cut = bytes([6, 0, 0, 0]) + struct.pack(">i", 3) + b"abc"
    encodings = bytes([2, 0]) + struct.pack(">H", 2) + struct.pack(">ii", 0, -223)
    stream = update + pointer + key + cut + encodings
    view = ViewOnlyFilter()
    # Split anywhere: messages are reassembled before they are judged.
    out = view.feed(stream[:7]) + view.feed(stream[7:23]) + view.feed(stream[23:])
    assert out == update + encodings
