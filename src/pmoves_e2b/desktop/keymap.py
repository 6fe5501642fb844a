"""Typing characters the desktop's keyboard map lacks (é, —, λ, ...) without losing any.

``xdotool type`` binds such a character to an empty keycode for its key press alone and unbinds
it right after (XChangeKeyboardMapping before and after the press). An app translates a key press
with the keymap it fetches once it reads the press: an app that reads late (a busy machine, an
editor just started) fetches the map after the unbinding and the character is lost ("hllo wrld"
in CI; 13 of 25 lines under load, none with the characters bound beforehand). So the characters
a piece of text needs are bound before xdotool starts, and stay bound: xdotool finds them in the
map and binds nothing. The slots are the keycodes that were empty when this process first typed
into the desktop (one is left empty for xdotool); once all hold a character, the least recently
used one is bound anew, and not before ``SETTLE_S`` after the keys that used it were sent.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field

READ = "xmodmap -pk"  # the core keyboard map, keysyms as hex values
KEEP_EMPTY = 1  # keycodes left empty for xdotool's own binding (a character we had no slot for)
PIECE_NEW = 8  # at most this many distinct bound characters per xdotool call: half the slots or less
SETTLE_S = 1.0  # an app has read the keys sent this long ago (only bounds a rebinding's wait)

_ROW = re.compile(r"^\s*(\d+)\s*(.*)$")
_KEYSYM = re.compile(r"0x[0-9a-fA-F]+")


def keysym(char: str) -> int:
    """The keysym xdotool would bind ``char`` to: Latin-1 keysyms are the code point, others Unicode keysyms."""
    point = ord(char)
    return point if point < 0x100 else 0x01000000 | point


def needs_binding(char: str) -> bool:
    """US keymaps have printable ASCII; control characters have no keysym (xdotool skips them)."""
    return ord(char) >= 0xA0


def parse_keymap(text: str) -> dict[int, set[int]]:
    """``xmodmap -pk`` -> keycode: its keysyms (an empty set for an empty keycode)."""
    keymap: dict[int, set[int]] = {}
    for line in text.splitlines():
        row = _ROW.match(line)
        if row:
            keymap[int(row[1])] = {value for value in (int(v, 16) for v in _KEYSYM.findall(row[2])) if value}
    return keymap


def pieces(text: str, limit: int) -> list[str]:
    """``text`` cut into pieces of at most ``limit`` characters and ``PIECE_NEW`` distinct characters to bind."""
    out: list[str] = []
    start = 0
    bound: set[str] = set()
    for index, char in enumerate(text):
        if (needs_binding(char) and char not in bound and len(bound) == PIECE_NEW) or index - start == limit:
            out.append(text[start:index])
            start = index
            bound = set()
        if needs_binding(char):
            bound.add(char)
    if start < len(text):
        out.append(text[start:])
    return out


@dataclass
class Slots:
    """The keycodes one process binds characters to on one desktop, least recently used first."""

    bound: OrderedDict[int, int] = field(default_factory=OrderedDict)  # keycode -> keysym (0: none yet)
    used_at: dict[int, float] = field(default_factory=dict)  # keycode -> when keys using it were last sent
    started: bool = False

    def plan(self, keymap: dict[int, set[int]], text: str, now: float | None = None) -> tuple[dict[int, int], float]:
        """The bindings ``text`` needs (keycode -> keysym) and how long to wait before making them."""
        now = time.monotonic() if now is None else now
        if not self.started:
            empty = sorted(code for code, syms in keymap.items() if not syms)
            for code in empty[: max(0, len(empty) - KEEP_EMPTY)]:
                self.bound[code] = 0
            self.started = True
        for code, sym in list(self.bound.items()):
            syms = keymap.get(code, set())
            if syms and sym not in syms:
                del self.bound[code]  # someone else bound it since
        present = set().union(*keymap.values()) if keymap else set()
        wanted = list(dict.fromkeys(keysym(c) for c in text if needs_binding(c)))
        free = [code for code, sym in self.bound.items() if sym not in wanted]
        plan: dict[int, int] = {}
        for sym in (s for s in wanted if s not in present):
            if not free:
                break  # no slot left: xdotool binds it for the press alone, as before
            plan[free.pop(0)] = sym
        wait = max((self.used_at.get(code, 0.0) + SETTLE_S - now for code in plan), default=0.0)
        for code, sym in plan.items():
            self.bound[code] = sym
        for code, sym in list(self.bound.items()):
            if sym in wanted:
                self.bound.move_to_end(code)
        return plan, max(0.0, wait)

    def sent(self, text: str, now: float | None = None) -> None:
        """The keys of ``text`` were sent: its slots were used now."""
        now = time.monotonic() if now is None else now
        wanted = {keysym(c) for c in text if needs_binding(c)}
        for code, sym in self.bound.items():
            if sym in wanted:
                self.used_at[code] = now


def bind_command(plan: dict[int, int]) -> str:
    return "xmodmap " + " ".join(f"-e 'keycode {code} = {hex(sym)}'" for code, sym in sorted(plan.items()))
