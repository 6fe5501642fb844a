"""A small multi-page web site served in the test's own "fake internet" network namespace.

``serve_site(netns)`` serves ``Site`` on port 80 of the "fake internet" netns (conftest's
``internet_netns``: the public-looking TEST-NET-2 address ``198.51.100.80`` routed from the host;
fixed names, so run these tests under ``flock /tmp/pmoves-netns.lock``). Sandboxes reach it as
``http://198.51.100.80/`` the way they reach the internet.

Pages (every one has the same navigation bar and footer around its ``<article>``):
``/`` (links to articles, the table, the form, a private page and another origin), ``/articles/1``
… ``/articles/20`` (each links to the next: a chain for depth), ``/articles`` (an index linking all
20, linked from nowhere: a 20-page crawl in one hop for bench/bench_surf_scrape.py), ``/table`` (a table), ``/form``
(POST ``/submit``, recorded in ``Site.submissions``), ``/big`` (over 64 KiB of article), ``/private/secret`` (disallowed by
``/robots.txt``), ``/slow`` (answers after ``Site.slow_s`` seconds or when the site closes).
``Site.requests`` records every request (method, path, time).
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from isolation.ns_harness import FAKE_INTERNET_SERVER_IP, listening_socket_in_netns

BASE = f"http://{FAKE_INTERNET_SERVER_IP}"
ARTICLES = 20
ROBOTS = "User-agent: *\nDisallow: /private/\n"
NAV_TEXT = "Site navigation menu"
FOOTER_TEXT = "Copyright footer boilerplate"
TABLE_ROWS = [("Apples", "3", "1.20"), ("Pears", "5", "2.50"), ("Plums", "12", "0.40")]

LOREM = (
    "The quick survey of the harbour found that the tides had shifted the sandbanks again this year, "
    "and the pilots now steer a wider course around the northern buoy before they turn into the channel. "
)


def _page(title: str, article: str, extra_links: str = "") -> str:
    nav = (
        f'<nav class="menu"><span>{NAV_TEXT}</span> <a href="/">Home</a> <a href="/articles/1">Articles</a> '
        '<a href="/table">Prices</a> <a href="/form">Contact</a> <a href="/private/secret">Members</a></nav>'
    )
    footer = f'<footer><p>{FOOTER_TEXT} 2026. <a href="/">Home</a></p></footer>'
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
        f"<body>{nav}<aside class='sidebar'><a href='/articles/3'>Popular</a></aside>"
        f"<main><article><h1>{html.escape(title)}</h1>{article}{extra_links}</article></main>{footer}</body></html>"
    )


def _paragraphs(marker: str, n: int = 4) -> str:
    return "".join(f"<p>{marker} paragraph {i}. {LOREM * 2}</p>" for i in range(1, n + 1))


def render(path: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET."""
    if path == "/robots.txt":
        return 200, "text/plain", ROBOTS
    if path == "/":
        links = (
            '<p>Read <a href="/articles/1">the first article</a>, see <a href="/table">the price table</a>, '
            '<a href="/form">write to us</a>, visit <a href="/private/secret">the members area</a> '
            'or <a href="http://198.51.100.81/elsewhere">another site</a>.</p>'
        )
        return 200, "text/html", _page("Welcome to the harbour", _paragraphs("HOME-ARTICLE"), links)
    if path == "/articles":
        items = "".join(f'<li><a href="/articles/{n}">Article {n}</a></li>' for n in range(1, ARTICLES + 1))
        return 200, "text/html", _page("All articles", _paragraphs("INDEX-PAGE", 1) + f"<ul>{items}</ul>")
    if path.startswith("/articles/"):
        try:
            n = int(path.removeprefix("/articles/"))
        except ValueError:
            n = 0
        if not 1 <= n <= ARTICLES:
            return 404, "text/html", _page("Not found", "<p>No such article.</p>")
        nxt = f'<p>Next: <a href="/articles/{n + 1}">article {n + 1}</a></p>' if n < ARTICLES else ""
        return 200, "text/html", _page(f"Article {n}", _paragraphs(f"ARTICLE-{n}-BODY"), nxt)
    if path == "/table":
        rows = "".join(f"<tr><td>{a}</td><td>{b}</td><td>{c}</td></tr>" for a, b, c in TABLE_ROWS)
        table = f"<table><thead><tr><th>Fruit</th><th>Qty</th><th>Price</th></tr></thead><tbody>{rows}</tbody></table>"
        return 200, "text/html", _page("Price table", _paragraphs("TABLE-PAGE", 2) + table)
    if path == "/form":
        form = (
            '<form method="post" action="/submit"><label>Name <input name="name" id="name"></label>'
            '<label>Message <textarea name="message" id="message"></textarea></label>'
            '<button type="submit" id="send">Send</button></form>'
        )
        return 200, "text/html", _page("Contact us", _paragraphs("FORM-PAGE", 2) + form)
    if path == "/big":
        return 200, "text/html", _page("A long report", _paragraphs("BIG-PAGE", 300))
    if path == "/private/secret":
        return 200, "text/html", _page("Members only", _paragraphs("SECRET-PAGE", 2))
    return 404, "text/html", _page("Not found", "<p>Nothing here.</p>")


@dataclass
class Site:
    base: str = BASE
    slow_s: float = 120.0
    requests: list[tuple[str, str, float]] = field(default_factory=list)
    submissions: list[dict[str, str]] = field(default_factory=list)
    closing: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str) -> str:
        return self.base + path

    def hits(self, path: str) -> int:
        return sum(1 for _, p, _ in self.requests if p == path)

    def paths(self) -> list[str]:
        return [p for _, p, _ in self.requests]

    def clear(self) -> None:
        self.requests.clear()
        self.submissions.clear()


def _handler(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, ctype: str, body: str) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", f"{ctype}; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the browser went away (a stopped run): nothing to tell it

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            site.requests.append(("GET", path, time.monotonic()))
            if path == "/slow":
                site.closing.wait(site.slow_s)
                self._send(200, "text/html", _page("Slow", "<p>finally</p>"))
                return
            self._send(*render(path))

        def do_POST(self) -> None:
            path = urlsplit(self.path).path
            site.requests.append(("POST", path, time.monotonic()))
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode(errors="replace"))
            if path == "/submit":
                site.submissions.append({k: v[0] for k, v in form.items()})
                self._send(200, "text/html", _page("Thank you", "<p>Your message was received.</p>"))
                return
            self._send(404, "text/html", _page("Not found", "<p>Nothing here.</p>"))

    return Handler


@contextmanager
def serve_site(netns: Path) -> Iterator[Site]:
    """The site on port 80 of ``netns`` (http://198.51.100.80/ in the fake internet)."""
    sock = listening_socket_in_netns(netns, "0.0.0.0", 80)
    site = Site()
    server = ThreadingHTTPServer((FAKE_INTERNET_SERVER_IP, 80), _handler(site), bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield site
    finally:
        site.closing.set()
        server.shutdown()
        server.server_close()
        thread.join(10)
