"""e2b-surf's web UI in real headless Chromium (Debian's, driven by Playwright) against the real stack.

A person signs in with the surf token, starts a scrape from the form against the test site in the
fake internet, sees the steps arrive while it runs and the result render; watches a slow run's live
desktop (e2b-desktop's viewer in a frame: its canvas shows the desktop) and stops it. Every state
of the page is saved as /tmp/surfui-*.png. Run under ``flock /tmp/pmoves-netns.lock``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from desktop_service.desktop_harness import CHROMIUM, CHROMIUM_ARGS, is_blank, png
from isolation.ns_harness import FAKE_INTERNET_SERVER_IP
from playwright.sync_api import Frame, Page, sync_playwright
from surf.agent_harness import EMAIL, NAME, FormSite, ModelDoubles
from surf.surf_harness import SurfClient
from surf.surf_site import TABLE_ROWS, Site

pytestmark = pytest.mark.stack

SHOTS = "/tmp/surfui-{}.png"


def ui_url(surf: SurfClient) -> str:
    # The host of NEXT_PUBLIC_API_URL's default: e2b-desktop lets that origin frame its viewer.
    return surf.stack.surf_url.replace("127.0.0.1", "localhost") + "/"


@pytest.fixture()
def page(surf: SurfClient) -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1440, "height": 960})
            tab = context.new_page()
            errors: list[str] = []
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            tab.goto(ui_url(surf))
            yield tab
            assert errors == [], errors  # no JavaScript error on the way
        finally:
            browser.close()


def wait_until(page: Page, check: Any, what: str, timeout: float = 90) -> Any:
    """Polled from here: the page's CSP (no eval) stops Playwright's in-page waits."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        page.wait_for_timeout(150)


def sign_in(page: Page, token: str) -> None:
    page.fill("#signin input[name=token]", token)
    page.click("#signin button[type=submit]")
    page.wait_for_selector("#new-run")


def state_of(page: Page) -> str:
    return str(page.get_attribute("#session-head .sub [data-state]", "data-state") or "")


def viewer_frame(page: Page) -> Frame | None:
    return next((f for f in page.frames if "/desktop/" in f.url and f.url.split("?")[0].count("/") >= 4), None)


def network_changes(page: Page) -> list[Frame]:
    """Frames whose loads Chromium cancelled with ERR_NETWORK_CHANGED: it does so when an interface
    comes or goes on its host, as every sandbox's veth does (seen in CI: the viewer's scripts were
    cancelled, it never connected). Not the UI's doing; a person would reload."""
    aborted: list[Frame] = []
    page.on("requestfailed", lambda r: aborted.append(r.frame) if r.failure == "net::ERR_NETWORK_CHANGED" else None)
    return aborted


def viewer_connected(page: Page, aborted: list[Frame]) -> bool:
    """The viewer frame is found again on every poll: the UI drops it when the run ends."""
    frame = viewer_frame(page)
    if frame is None:
        return False
    if frame in aborted:
        aborted.clear()
        frame.goto(frame.url)
        return False
    return bool(frame.evaluate("Boolean(window.viewerState && window.viewerState.connected)"))


def test_sign_in_start_a_scrape_and_see_steps_and_results_live(page: Page, surf: SurfClient, site: Site) -> None:
    page.wait_for_selector("#signin")
    page.screenshot(path=SHOTS.format("signin"))
    page.fill("#signin input[name=token]", "not-the-token")
    page.click("#signin button[type=submit]")
    page.wait_for_selector("#signin .error-text:not([hidden])")
    assert "not right" in page.inner_text("#signin .error-text")
    page.screenshot(path=SHOTS.format("signin-wrong"))
    sign_in(page, surf.stack.surf_token)
    page.screenshot(path=SHOTS.format("home"))

    page.fill("#new-run input[name=url]", site.url("/"))
    page.check("#new-run input[name=follow_links]")
    page.fill("#new-run input[name=depth]", "1")
    page.fill("#new-run input[name=max_pages]", "3")
    page.click("#start")
    page.wait_for_selector("#session-head")
    session_id = page.evaluate("window.surfUI.selected")
    assert session_id and session_id.startswith("surf_")
    # The form's options reached the API as the person chose them.
    request = surf.get(session_id)["request"]
    assert (request["url"], request["follow_links"], request["depth"], request["max_pages"]) == (
        site.url("/"),
        True,
        1,
        3,
    )
    page.screenshot(path=SHOTS.format("queued"))

    # Steps show up while the run is still running (SSE), not only at the end.
    seen_live = wait_until(
        page,
        lambda: page.locator("#step-list .step.page").count() >= 1 and state_of(page) == "running",
        "a scraped page listed while the run is running",
        timeout=120,
    )
    assert seen_live
    page.screenshot(path=SHOTS.format("running"))
    wait_until(page, lambda: state_of(page) == "completed", "the run to complete", timeout=120)
    page.screenshot(path=SHOTS.format("completed"), full_page=True)
    assert page.evaluate("window.surfUI.events") > 0

    session = surf.get(session_id)
    assert session["state"] == "completed" and len(session["pages"]) == 3
    assert page.locator("#step-list .step.page").count() == 3
    assert page.locator("#step-list .step.visit").count() == 3
    assert page.locator("#result-summary .stat").first.inner_text().startswith("3")

    # The first page's content reads as an article, without the site's navigation.
    content = page.inner_text("#content")
    assert "Welcome to the harbour" in content and "HOME-ARTICLE paragraph 1" in content
    assert "Site navigation menu" not in content
    # Another page: the table, as a table.
    page.click(".page-picker button:has-text('Price table')")
    page.click(".tabs button[data-tab=tables]")
    page.wait_for_selector("#result-pane table.data")
    cells = page.locator("#result-pane table.data td").all_inner_texts()
    assert [tuple(cells[i : i + 3]) for i in range(0, len(cells), 3)] == TABLE_ROWS
    page.screenshot(path=SHOTS.format("tables"), full_page=True)
    page.click(".tabs button[data-tab=links]")
    assert page.locator("#result-pane ul.links li").count() >= 3
    page.screenshot(path=SHOTS.format("links"), full_page=True)
    page.click(".tabs button[data-tab=screenshot]")
    page.wait_for_selector("#page-shot")
    wait_until(page, lambda: page.evaluate("document.getElementById('page-shot').naturalWidth") > 100, "screenshot")
    page.screenshot(path=SHOTS.format("screenshot"), full_page=True)
    # Downloads carry the Markdown of the page.
    page.click(".page-picker button >> nth=0")
    page.click(".tabs button[data-tab=markdown]")
    with page.expect_download() as download:
        page.click("#result-pane button:has-text('Download .md')")
    saved = download.value.path()
    assert saved is not None
    markdown = open(saved, encoding="utf-8").read()
    assert markdown == surf.get(session_id)["pages"][0]["data"]["markdown"]
    # The session is in the list, and the list opens it.
    assert page.locator(f"#sessions button[data-session={session_id}] [data-state=completed]").count() == 1


def test_watch_the_live_desktop_and_stop_the_run(page: Page, surf: SurfClient, site: Site) -> None:
    aborted = network_changes(page)
    page.wait_for_selector("#signin")
    sign_in(page, surf.stack.surf_token)
    page.fill("#new-run input[name=url]", site.url("/slow"))
    page.click("#start")
    page.wait_for_selector("#session-head")
    session_id = page.evaluate("window.surfUI.selected")

    wait_until(page, lambda: state_of(page) == "running", "the run to start", timeout=120)
    wait_until(page, lambda: viewer_connected(page, aborted), "the viewer to connect")
    page.wait_for_timeout(1500)  # the first full frame
    frame = viewer_frame(page)
    assert frame is not None and state_of(page) == "running"
    canvas = png(frame.locator("#screen canvas").screenshot())
    assert not is_blank(canvas)
    assert canvas.size[0] > 300
    page.screenshot(path=SHOTS.format("live"))

    page.click("#stop")
    wait_until(page, lambda: state_of(page) == "stopped", "the run to show stopped")
    assert surf.get(session_id)["state"] == "stopped"
    assert page.locator("#desktop-frame").count() == 0
    assert page.locator("#stop").count() == 0
    page.screenshot(path=SHOTS.format("stopped"))
    # A phone-sized window still shows the whole app in one column.
    page.set_viewport_size({"width": 420, "height": 900})
    page.screenshot(path=SHOTS.format("narrow"), full_page=True)


@pytest.mark.slow
def test_an_agent_run_pauses_for_a_person_who_hands_back_from_the_page(
    page: Page, surf: SurfClient, form_site: FormSite, model_doubles: ModelDoubles
) -> None:
    """The model (OpenAI's wire format, a pending safety check before Send) pauses the run; the page
    shows the desktop as the person's, the person hands it back, the agent sends the form."""
    model_doubles.reset()
    model_doubles.openai.check_before_send = True
    page.emulate_media(color_scheme="dark")
    page.wait_for_selector("#signin")
    sign_in(page, surf.stack.surf_token)
    page.click("#new-run [data-mode=agent]")
    page.fill("#new-run input[name=url]", f"http://{FAKE_INTERNET_SERVER_IP}:{form_site.port}/")
    page.fill("#new-run textarea[name=task]", f"Send the contact form as {NAME} <{EMAIL}>.")
    page.click("#new-run details.more summary")
    page.fill("#new-run input[name=model]", "openai:test-cua")
    page.fill("#new-run input[name=max_steps]", "25")
    page.screenshot(path=SHOTS.format("agent-form"))
    before = len(form_site.submissions)
    page.click("#start")
    page.wait_for_selector("#session-head")
    session_id = page.evaluate("window.surfUI.selected")
    assert surf.get(session_id)["request"]["model"] == "openai:test-cua"

    # The agent's turns arrive with their screenshots; then it waits for a person.
    wait_until(page, lambda: page.locator("#step-list .step.action img").count() >= 2, "agent steps", 180)
    wait_until(page, lambda: page.locator("#control:has-text('Hand back')").count() == 1, "the pause", 180)
    assert "safety check" in page.inner_text("#step-list")
    assert surf.get(session_id)["taken_over"] is True
    assert form_site.submissions[before:] == []
    # The frame now holds a control link (t=<expiry>.<mode>.<id>.<mac>): the person may drive.
    assert ".control." in (page.get_attribute("#desktop-frame", "src") or "")
    page.screenshot(path=SHOTS.format("agent-paused"))

    page.click("#control")
    wait_until(page, lambda: state_of(page) == "completed", "the agent to finish", 180)
    assert form_site.submissions[before:] == [{"name": NAME, "email": EMAIL}]
    assert "form was sent" in page.inner_text("#result-summary")
    page.screenshot(path=SHOTS.format("agent-done"), full_page=True)
