"""How a desktop boots: the stock e2b-desktop SDK's commands (e2b-wire-protocol.md §10), each
waited for by one shell loop inside the sandbox.

Shared by e2b-desktop's create (``desktop/desktops.py``, which runs the steps one by one) and the
``desktop-warm`` template's start command (``sandbox/templates/definitions.py``, the same steps in
one script), so a desktop booted ahead by the warm pool is the same as one booted on demand.
"""

from __future__ import annotations

DISPLAY = ":0"
# Booted ahead by its start command at this resolution only (E2B_DESKTOP_RESOLUTION's default).
WARM_TEMPLATE = "desktop-warm"
WARM_RESOLUTION = (1920, 1080)

POLL_S = 0.05
X_START_S = 10  # the SDK's limits
XFCE_START_S = 60
BACKDROP_S = 10  # a session set up to draw no backdrop is ready this long after its processes

X_READY = f"xdpyinfo -display {DISPLAY} >/dev/null 2>&1"
# The SDK's check (xfce4-session, xfwm4 and xfdesktop run), with shell builtins only: its three
# pgreps cost ~14 ms of CPU per poll, a quarter of a core taken from the booting XFCE.
XFCE_READY = (
    "_s=; _w=; _d=; for _c in /proc/[0-9]*/comm; do read -r _p 2>/dev/null < $_c || continue; "
    'case $_p in xfce4-session) _s=1;; xfwm4) _w=1;; xfdesktop) _d=1;; esac; done; [ "$_s$_w$_d" = 111 ]'
)
# The SDK calls XFCE ready when its processes exist, before xfdesktop drew anything (a screenshot
# then is black): the drawn backdrop sets _XROOTPMAP_ID on the root window.
BACKDROP_DRAWN = f'case "$(xprop -display {DISPLAY} -root _XROOTPMAP_ID 2>/dev/null)" in *pixmap*) ;; *) false;; esac'


def xvfb(width: int, height: int) -> str:
    """Xvfb as the SDK starts it."""
    return f"Xvfb {DISPLAY} -ac -screen 0 {width}x{height}x24 -retro -dpi 96 -nolisten tcp -nolisten unix"


def until(check: str, limit_s: int) -> str:
    """A subshell: ``check`` every POLL_S until it succeeds (exit 0) or ``limit_s`` passed (exit 1;
    the clock is read every tenth poll: each read is a process)."""
    return (
        f"(end=$(($(date +%s) + {limit_s} + 1)); n=0; until {check}; do n=$((n + 1)); "
        f'[ $((n % 10)) = 0 ] && [ "$(date +%s)" -ge "$end" ] && exit 1; sleep {POLL_S}; done)'
    )


# Once startxfce4 runs: its processes, then (best effort) the drawn backdrop.
SESSION_READY = f"{until(XFCE_READY, XFCE_START_S)} && {{ {until(BACKDROP_DRAWN, BACKDROP_S)}; true; }}"
SESSION_READY_S = XFCE_START_S + BACKDROP_S
