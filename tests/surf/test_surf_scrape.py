"""Scrape mode on the real stack: Chromium in a desktop sandbox crawls the test site in the fake internet."""

from __future__ import annotations

import io
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image
from surf.surf_harness import SurfClient
from surf.surf_site import FOOTER_TEXT, NAV_TEXT, TABLE_ROWS, Site

from pmoves_e2b.surf.scrape import HOST_INTERVAL_S

pytestmark = pytest.mark.stack

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def path_of(url: str) -> str:
    return urlsplit(url).path


def fetched(site: Site) -> list[tuple[str, float]]:
    """(path, time) of the site's GETs, without the favicon Chromium asks for by itself."""
    return [(path, t) for method, path, t in site.requests if method == "GET" and path != "/favicon.ico"]


def download(ref: dict) -> httpx.Response:
    """A result file through its signed URL, without the token (as a page or a program would)."""
    response = httpx.get(ref["url"], timeout=30, trust_env=False)
    assert response.status_code == 200, response.text
    return response


def test_a_page_gives_its_article_as_markdown_its_links_tables_and_a_real_screenshot(
    surf: SurfClient, site: Site
) -> None:
    started = surf.start(url=site.url("/table"))
    events = surf.events(started["session_id"])
    session = surf.get(started["session_id"])
    assert session["state"] == "completed", session.get("error")
    assert [e["state"] for e in events if e["type"] == "state"] == ["queued", "running", "completed"]
    assert [e["type"] for e in events][-2:] == ["result", "state"]
    assert any(e["type"] == "page" for e in events)

    [page] = session["pages"]
    data = page["data"]
    assert data["final_url"] == site.url("/table") and data["status"] == 200
    assert data["title"] == "Price table"
    markdown = data["markdown"]
    assert markdown.startswith("# Price table")
    assert "TABLE-PAGE paragraph 1." in markdown and "TABLE-PAGE paragraph 2." in markdown
    assert NAV_TEXT not in markdown and FOOTER_TEXT not in markdown and "Popular" not in markdown
    assert "| Fruit | Qty | Price |" in markdown
    assert "TABLE-PAGE paragraph 2." in data["text"] and NAV_TEXT not in data["text"]
    assert data["tables"] == [{"headers": ["Fruit", "Qty", "Price"], "rows": [list(row) for row in TABLE_ROWS]}]
    links = {path_of(link["url"]): link["text"] for link in data["links"]}
    assert links["/articles/1"] == "Articles" and links["/form"] == "Contact" and "/private/secret" in links
    assert all(link["url"].startswith("http://") for link in data["links"])  # made absolute

    shot = data["screenshot"]
    assert shot["content_type"] == "image/png"
    png = download(shot).content
    assert png.startswith(PNG_SIGNATURE) and len(png) == shot["bytes"]
    image = Image.open(io.BytesIO(png))
    assert image.width >= 800 and image.height >= 400
    darkest, lightest = image.convert("L").getextrema()
    assert lightest - darkest > 100, "the screenshot is blank"
    # The file URL is signed: without the signature the file needs the token.
    unsigned = shot["url"].split("?")[0]
    assert httpx.get(unsigned, timeout=30, trust_env=False).status_code == 401
    assert httpx.get(unsigned + "?sig=1.view.x.forged", timeout=30, trust_env=False).status_code == 401

    assert session["result"]["pages"] == 1 and session["result"]["failed_pages"] == 0
    # Only the page itself (and robots.txt) were fetched: follow_links is false by default.
    assert sorted(path for path, _ in fetched(site)) == ["/robots.txt", "/table"]


def test_a_crawl_keeps_to_depth_and_same_origin_and_never_fetches_what_robots_txt_disallows(
    surf: SurfClient, site: Site
) -> None:
    started = surf.start(url=site.url("/articles/1"), follow_links=True, depth=2, max_pages=50, formats=["links"])
    session = surf.wait(started["session_id"])
    assert session["state"] == "completed", session.get("error")
    depths = {path_of(p["url"]): p["data"]["depth"] for p in session["pages"]}
    # /articles/1 (0) -> /articles/2, /articles/3 (1) -> /articles/4 (2); /articles/5 would be depth 3.
    assert depths["/articles/1"] == 0 and depths["/articles/2"] == 1 and depths["/articles/4"] == 2
    assert max(depths.values()) == 2
    assert site.hits("/articles/5") == 0 and "/articles/5" not in depths
    # robots.txt: fetched once, its disallowed page never requested, the skip recorded.
    assert site.hits("/robots.txt") == 1
    assert site.hits("/private/secret") == 0
    skips = {path_of(s["data"]["url"]): s["data"]["reason"] for s in session["steps"] if s["kind"] == "skip"}
    assert skips["/private/secret"] == "disallowed by robots.txt"
    assert skips["/elsewhere"] == "other origin"
    assert session["result"]["pages"] == len(session["pages"])
    # Every page was fetched once, robots.txt before any, and the host was never asked for two pages
    # within the polite interval (robots.txt, one small file before the first page, is not paced).
    assert len(fetched(site)) == len({path for path, _ in fetched(site)})
    assert fetched(site)[0][0] == "/robots.txt"
    gets = [t for path, t in fetched(site) if path != "/robots.txt"]
    assert min(b - a for a, b in zip(gets, gets[1:], strict=False)) >= HOST_INTERVAL_S * 0.9


def test_max_pages_ends_the_crawl(surf: SurfClient, site: Site) -> None:
    started = surf.start(url=site.url("/articles/1"), follow_links=True, depth=10, max_pages=3, formats=["text"])
    session = surf.wait(started["session_id"])
    assert session["state"] == "completed", session.get("error")
    assert len(session["pages"]) == 3 and session["result"]["pages"] == 3
    assert session["result"]["not_visited"] > 0
    assert len([p for p, _ in fetched(site) if p != "/robots.txt"]) == 3
    metrics = httpx.get(surf.stack.surf_url + "/metrics", timeout=30, trust_env=False).text
    assert 'e2b_surf_sessions_ended_total{mode="scrape",state="completed"}' in metrics
    assert 'e2b_surf_pages_total{outcome="loaded"}' in metrics


def test_a_start_url_robots_txt_disallows_is_not_fetched(surf: SurfClient, site: Site) -> None:
    started = surf.start(url=site.url("/private/secret"))
    session = surf.wait(started["session_id"])
    assert session["state"] == "completed", session.get("error")
    assert session["pages"] == []
    assert session["result"]["skipped"] == [{"url": site.url("/private/secret"), "reason": "disallowed by robots.txt"}]
    assert site.hits("/private/secret") == 0


def test_large_content_is_a_file_with_a_signed_url_and_a_missing_page_is_recorded(surf: SurfClient, site: Site) -> None:
    started = surf.start(url=site.url("/big"), formats=["markdown", "text"])
    session = surf.wait(started["session_id"])
    assert session["state"] == "completed", session.get("error")
    data = session["pages"][0]["data"]
    ref = data["markdown"]
    assert isinstance(ref, dict) and ref["bytes"] > 64 * 1024 and ref["content_type"] == "text/markdown"
    body = download(ref).text
    assert "BIG-PAGE paragraph 300." in body and NAV_TEXT not in body
    assert isinstance(data["text"], dict)

    missing = surf.wait(surf.start(url=site.url("/articles/99"))["session_id"])
    assert missing["state"] == "completed"
    assert missing["pages"][0]["data"]["status"] == 404


def test_a_site_whose_robots_txt_is_unreachable_is_not_crawled(surf: SurfClient) -> None:
    """RFC 9309: robots.txt unreachable means complete disallow; the run says why it has no pages."""
    session = surf.wait(surf.start(url="http://198.51.100.80:9/", formats=["text"])["session_id"])
    assert session["state"] == "completed", session.get("error")
    assert session["pages"] == []
    [skipped] = session["result"]["skipped"]
    assert skipped["reason"].startswith("robots.txt unreachable")
