"""Credentials, key names, actions and the VNC view-only filter (no service, no sandbox)."""

from __future__ import annotations

import struct
import time

import pytest

from pmoves_e2b.desktop import keymap
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


XMODMAP_PK = """There are 7 KeySyms per KeyCode; KeyCodes range from 8 to 255.

    KeyCode\tKeysym (Keysym)\t...
    Value  \tValue   (Name) \t...

      8    \t
      9    \t0xff1b (Escape)\t0x0000 (NoSymbol)\t0xff1b (Escape)\t
     10    \t0x0031 (1)\t0x0021 (exclam)\t0x0031 (1)\t0x0021 (exclam)\t
     93    \t
     97    \t0x00e9 (eacute)\t0x00c9 (Eacute)\t0x00e9 (eacute)\t0x00c9 (Eacute)\t
    120    \t
    149    \t
    255    \t0x1008ffb5 (XF86RFKill)\t0x0000 (NoSymbol)\t0x1008ffb5 (XF86RFKill)\t
"""


def test_keymap_rows_parse_to_keysym_values() -> None:
    parsed = keymap.parse_keymap(XMODMAP_PK)
    assert parsed[8] == set() and parsed[9] == {0xFF1B} and parsed[10] == {0x31, 0x21}
    assert parsed[97] == {0xE9, 0xC9} and parsed[255] == {0x1008FFB5} and len(parsed) == 8


def test_characters_outside_the_keymap_are_bound_before_typing_and_stay_bound() -> None:
    assert keymap.keysym("é") == 0xE9 and keymap.keysym("—") == 0x1002014 and keymap.keysym("😀") == 0x101F600
    assert not keymap.needs_binding("a") and not keymap.needs_binding("\n") and keymap.needs_binding("ö")
    slots = keymap.Slots()
    # é is in the map already; ö and — get the empty keycodes but the last (left to xdotool)
    plan, wait = slots.plan(keymap.parse_keymap(XMODMAP_PK), "héllo wörld —", now=100.0)
    assert plan == {8: 0xF6, 93: 0x1002014} and wait == 0
    assert keymap.bind_command(plan) == "xmodmap -e 'keycode 8 = 0xf6' -e 'keycode 93 = 0x1002014'"
    slots.sent("héllo wörld —", now=100.0)
    bound = XMODMAP_PK.replace("      8    \t\n", "      8    \t0x00f6 (odiaeresis)\t0x00d6 (Odiaeresis)\n")
    bound = bound.replace("     93    \t\n", "     93    \t0x1002014 (emdash)\n")
    # typed again: nothing to bind; a new character takes the slot still empty
    assert slots.plan(keymap.parse_keymap(bound), "wörld —", now=100.5) == ({}, 0)
    plan, _ = slots.plan(keymap.parse_keymap(bound), "λ", now=100.5)
    assert plan == {120: 0x10003BB}
    slots.sent("λ", now=100.5)
    full = bound.replace("    120    \t\n", "    120    \t0x10003bb (Greek_lambda)\n")
    # a slot another client bound meanwhile is no longer ours; all ours hold a character: the least
    # recently used are rebound (ö's first), once the keys sent with them have settled (λ's, at 100.5)
    taken = full.replace("     93    \t0x1002014 (emdash)\n", "     93    \t0x0041 (A)\n")
    plan, wait = slots.plan(keymap.parse_keymap(taken), "—∑", now=101.0)
    assert plan == {8: 0x1002014, 120: 0x1002211} and wait == pytest.approx(0.5)
    assert list(slots.bound) == [8, 120]


def test_text_is_cut_into_pieces_of_few_characters_to_bind() -> None:
    assert keymap.pieces("a" * 120, 50) == ["a" * 50, "a" * 50, "a" * 20]
    greek = "αβγδεζηθικλμ"
    assert keymap.pieces(greek + "αβ", 50) == ["αβγδεζηθ", "ικλμαβ"]
    assert keymap.pieces("ééé" * 30, 50) == ["ééé" * 16 + "éé", "é" + "ééé" * 13]
    assert keymap.pieces("", 50) == []
