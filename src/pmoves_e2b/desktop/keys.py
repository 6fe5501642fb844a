"""Key names accepted by the ``key`` action, and their translation for the e2b-desktop SDK.

xdotool silently ignores key names it does not know (exit 0), so every name is checked here
first and an unknown one is a 422 that lists what is accepted. A key is one name or a
combination joined by ``+`` (``ctrl+shift+t``) or given as a list (``["ctrl", "l"]``); names
are case-insensitive. The SDK's ``press`` maps its own aliases (``enter`` -> ``Return``) and
lower-cases anything else, so the table's values are SDK aliases or lower-case X keysyms.
"""

from __future__ import annotations

import string

# Named keys: accepted name -> what the SDK's press() expects. Documented in README (e2b-desktop).
NAMED_KEYS: dict[str, str] = {
    **{name: name for name in ("enter", "tab", "space", "backspace", "delete", "escape", "insert", "home", "end")},
    "return": "enter",
    "esc": "escape",
    "del": "delete",
    "page_up": "page_up",
    "pageup": "page_up",
    "page_down": "page_down",
    "pagedown": "page_down",
    **{name: name for name in ("up", "down", "left", "right")},
    "arrowup": "up",
    "arrowdown": "down",
    "arrowleft": "left",
    "arrowright": "right",
    **{f"f{n}": f"f{n}" for n in range(1, 13)},
    "ctrl": "ctrl",
    "control": "ctrl",
    "shift": "shift",
    "alt": "alt",
    "super": "super",
    "meta": "super",
    "cmd": "super",
    "win": "super",
    "menu": "menu",
    "caps_lock": "caps_lock",
    "print": "print",
    "pause": "pause",
    # Printable characters that are not valid keysym names on their own.
    "plus": "plus",
    "minus": "minus",
    "-": "minus",
    "=": "equal",
    "/": "slash",
    "\\": "backslash",
    ".": "period",
    ",": "comma",
    ";": "semicolon",
    "'": "apostrophe",
    "`": "grave",
    "[": "bracketleft",
    "]": "bracketright",
}
SINGLE_CHARS = frozenset(string.ascii_lowercase + string.digits)
MAX_KEYS_IN_COMBO = 5


class KeyNameError(ValueError):
    """A key name that cannot be pressed; the message lists the accepted names."""


def accepted_names() -> list[str]:
    return sorted(set(NAMED_KEYS) | {"a-z", "0-9"})


def parse_keys(keys: str | list[str]) -> list[str]:
    """``"ctrl+l"`` or ``["ctrl", "l"]`` -> SDK key names; raises KeyNameError for unknown names."""
    if isinstance(keys, str):
        # A lone "+" is the plus key, not an empty combination.
        parts = ["plus"] if keys.strip() == "+" else keys.split("+")
    else:
        parts = list(keys)
    if not parts or len(parts) > MAX_KEYS_IN_COMBO:
        raise KeyNameError(f"give 1 to {MAX_KEYS_IN_COMBO} keys, e.g. 'enter' or 'ctrl+l'")
    mapped = []
    for part in parts:
        name = part.strip().lower() if part.strip() else part
        if name in NAMED_KEYS:
            mapped.append(NAMED_KEYS[name])
        elif name in SINGLE_CHARS:
            mapped.append(name)
        else:
            raise KeyNameError(
                f"unknown key {part!r}; use one of {', '.join(accepted_names())} or a combination like 'ctrl+shift+t'"
            )
    return mapped
