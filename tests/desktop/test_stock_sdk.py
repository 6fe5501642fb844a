"""Issue 13 item 2: the stock e2b-desktop SDK (pinned in the test extra), unmodified, against the
stack — every call with its effect checked, and the stream URL opened in real headless Chromium
through the TLS host routing. One desktop serves the module."""

from __future__ import annotations

import base64
import hashlib
import io
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from desktop_service.desktop_harness import (
    CHROMIUM,
    CHROMIUM_ARGS,
    changed_fraction,
    is_blank,
    mean_difference,
    save_shot,
)
from e2b import CommandExitException
from e2b_desktop import Sandbox
from PIL import Image
from playwright.sync_api import Page, sync_playwright
from stack.harness import RunningStack

pytestmark = pytest.mark.stack

SIZE = (1024, 768)


def _shot(desktop: Sandbox) -> Image.Image:
    return Image.open(io.BytesIO(bytes(desktop.screenshot()))).convert("RGB")


def _wait(condition: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def desktop(running_stack: RunningStack) -> Iterator[Sandbox]:
    box = Sandbox.create(
        resolution=SIZE,
        timeout=600,
        api_key=running_stack.api_key,
        api_url=running_stack.sandbox_url,
        sandbox_url=running_stack.sandbox_url,
        envs={"LANG": "C.UTF-8"},
    )
    try:
        yield box
    finally:
        box.kill()


def test_screen_size_screenshot_and_pointer(desktop: Sandbox, tier: str) -> None:
    assert desktop.get_screen_size() == SIZE
    first = _shot(desktop)
    assert first.size == SIZE and not is_blank(first)
    desktop.move_mouse(300, 200)
    assert desktop.get_cursor_position() == (300, 200)
    _wait(lambda: desktop.commands.run("pgrep -x xfdesktop || true").stdout.strip(), "xfdesktop to run", 60)
    time.sleep(1)  # xfdesktop paints its background after it starts
    before = _shot(desktop)
    desktop.right_click(600, 400)  # xfdesktop's menu opens, its corner at the pointer
    desktop.wait(500)
    menu = _wait(lambda: _menu_shown(desktop, before), "the desktop menu")
    save_shot(f"sdk-right-click-{tier}.png", _png(menu))
    desktop.press("escape")
    desktop.left_click(700, 500)
    desktop.double_click(710, 510)
    desktop.middle_click(720, 520)
    desktop.scroll("down", 2)
    desktop.drag((100, 650), (160, 700))
    assert desktop.get_cursor_position() == (160, 700)


def test_typing_and_keys_land_in_the_editor(desktop: Sandbox) -> None:
    path = f"/home/user/sdk-{uuid.uuid4().hex[:8]}.txt"
    window = _edit(desktop, path, "")
    assert window in desktop.get_application_windows("mousepad")
    time.sleep(1.5)  # mousepad maps and drops helper windows right after it takes the focus
    text = "héllo wörld — " + "typed by the stock SDK " * 4
    desktop.write(text)
    desktop.press(["ctrl", "s"])
    _wait(lambda: desktop.files.read(path).rstrip("\n") == text, "the saved file")
    desktop.press(["ctrl", "q"])


def test_open_shows_a_page_from_inside_the_sandbox(desktop: Sandbox, tier: str) -> None:
    page = "/home/user/hello.html"
    desktop.files.write(page, "<title>pmoves-open-check</title><h1 style='font-size:120px'>Hello</h1>")
    before = _shot(desktop)
    desktop.open(page)
    _wait(lambda: "pmoves-open-check" in _focused_title(desktop), "the browser to show the page", timeout=90)

    # The title can arrive before Chromium's first paint (seen in CI): wait for the page on screen.
    def page_drawn() -> Image.Image | None:
        shot = _shot(desktop)
        return shot if changed_fraction(before, shot) > 0.05 else None

    shown = _wait(page_drawn, "the page to be drawn on the screen")
    save_shot(f"sdk-open-{tier}.png", _png(shown))
    # and a URL served inside the sandbox
    desktop.files.write("/home/user/site/index.html", "<title>pmoves-url-check</title><h1>Served</h1>")
    server = desktop.commands.run("python3 -m http.server 8765 --directory /home/user/site", background=True)
    try:
        _wait(lambda: desktop.commands.run("curl -sf localhost:8765/ || true").stdout, "the page server")
        desktop.open("http://localhost:8765/")
        _wait(lambda: "pmoves-url-check" in _focused_title(desktop), "the browser to show the served page", timeout=60)
    finally:
        server.kill()


def test_stream_of_one_window_without_auth(running_stack: RunningStack, desktop: Sandbox, tier: str) -> None:
    """stream.start(require_auth=False, window_id=...): x11vnc serves that window alone. (Runs
    before the authenticated stream: SDK 2.7.2 keeps auth on for later streams once enabled.)"""
    path = f"/home/user/win-{uuid.uuid4().hex[:8]}.txt"
    window = _edit(desktop, path, "one window")
    desktop.stream.start(require_auth=False, window_id=window)
    try:
        _, framebuffer = _stream_canvas(running_stack, desktop.stream.get_url(), f"sdk-stream-window-{tier}.png")
        geometry = desktop.commands.run(f"xdotool getwindowgeometry --shell {window}", envs={"DISPLAY": ":0"}).stdout
        fields = dict(line.split("=", 1) for line in geometry.split())
        assert framebuffer == (int(fields["WIDTH"]), int(fields["HEIGHT"])) != SIZE  # the window alone
    finally:
        desktop.stream.stop()
        desktop.press(["ctrl", "q"])


def test_stream_url_shows_the_live_desktop_in_chromium(
    running_stack: RunningStack, desktop: Sandbox, tier: str
) -> None:
    desktop.stream.start(require_auth=True)
    try:
        key = desktop.stream.get_auth_key()
        url = desktop.stream.get_url(auth_key=key)
        assert url.startswith(f"https://6080-{desktop.sandbox_id}.")
        _, framebuffer = _stream_canvas(running_stack, url, f"sdk-stream-{tier}.png")
        assert framebuffer == SIZE
        # require_auth means it: the same URL with a wrong key shows no desktop
        assert _stream_refused(running_stack, desktop.stream.get_url(auth_key="wrong-key"))
    finally:
        desktop.stream.stop()


def _stream_canvas(running_stack: RunningStack, url: str, shot_name: str) -> tuple[Image.Image, tuple[int, int]]:
    """The noVNC canvas of ``url`` in headless Chromium, trusting the stack's server certificate."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[*_browser_args(), _pin(running_stack)])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            canvas = page.locator("#noVNC_container canvas")
            _load(page, url, canvas.is_visible, "the noVNC canvas")
            time.sleep(2)
            shown = Image.open(io.BytesIO(canvas.screenshot())).convert("RGB")
            save_shot(shot_name, _png(shown))
            assert not is_blank(shown)
            width, height = canvas.evaluate("c => [c.width, c.height]")  # the VNC framebuffer
            return shown, (width, height)
        finally:
            browser.close()


def _stream_refused(running_stack: RunningStack, url: str) -> bool:
    """True when noVNC at ``url`` reports a failed authentication and never shows a framebuffer."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[*_browser_args(), _pin(running_stack)])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            status = "() => /fail/i.test(document.getElementById('noVNC_status')?.textContent || '')"
            _load(page, url, lambda: page.evaluate(status), "noVNC to report the failed authentication")
            canvases = page.locator("#noVNC_container canvas")
            return canvases.count() == 0 or canvases.first.evaluate("c => c.width * c.height") == 0
        finally:
            browser.close()


def _load(page: Page, url: str, shown: Callable[[], Any], what: str, timeout: float = 60) -> None:
    """Open noVNC at ``url`` and wait until ``shown()``. A load Chromium cancelled with
    ERR_NETWORK_CHANGED is loaded again: Chromium cancels requests in flight when an interface comes or
    goes on its host, as every sandbox's veth does (seen in CI: noVNC's scripts cancelled, no canvas)."""
    aborted: list[str] = []
    page.on("requestfailed", lambda r: aborted.append(r.url) if r.failure == "net::ERR_NETWORK_CHANGED" else None)
    page.goto(url)
    deadline = time.monotonic() + timeout
    while not shown():
        if aborted:
            aborted.clear()
            page.goto(url)
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def _pin(running_stack: RunningStack) -> str:
    """Chromium trusts the stack's server certificate by its public key."""
    cert = x509.load_pem_x509_certificate((running_stack.data_dir / "tls" / "cert.pem").read_bytes())
    der = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return f"--ignore-certificate-errors-spki-list={base64.b64encode(hashlib.sha256(der).digest()).decode()}"


def _edit(desktop: Sandbox, path: str, content: str) -> str:
    """Open ``path`` in mousepad (launch) and return its window id once it has the focus."""
    desktop.files.write(path, content)
    desktop.launch("org.xfce.mousepad", path)
    name = path.rsplit("/", 1)[1]
    return str(
        _wait(
            lambda: (w := desktop.get_current_window_id()) and name in desktop.get_window_title(w) and w,
            "mousepad to take the focus",
        )
    )


def _focused_title(desktop: Sandbox) -> str:
    """The focused window's title, "" while there is none or it is gone before its title is read:
    Chromium opens and drops short-lived windows as it starts (seen in CI as xdotool's BadWindow)."""
    window = desktop.get_current_window_id()
    if not window:
        return ""
    try:
        return desktop.get_window_title(window)
    except CommandExitException as exc:
        if "BadWindow" not in exc.stderr:
            raise
        return ""


def _browser_args() -> list[str]:
    """The no-phone-home flags, but *.e2b.localhost resolves to loopback as in any Chromium
    (the shared rules refuse every name but localhost)."""
    rules = (
        "--host-resolver-rules=MAP *.e2b.localhost 127.0.0.1, MAP * ~NOTFOUND , EXCLUDE 127.0.0.1, EXCLUDE localhost"
    )
    return [rules if arg.startswith("--host-resolver-rules=") else arg for arg in CHROMIUM_ARGS]


def _menu_shown(desktop: Sandbox, before: Image.Image) -> Image.Image | None:
    """The screenshot once a light menu covers the dark desktop just below-right of (600, 400)."""
    now = _shot(desktop)
    area = (605, 405, 700, 480)
    return now if mean_difference(before.crop(area), now.crop(area)) > 60 else None


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()
