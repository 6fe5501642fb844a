"""What scrape mode takes out of a rendered page: main content (readability), Markdown, text, links, tables.

Pure functions over the HTML the browser serialised (``page.content()``: the live DOM, so
script-made content is in it); CPU-bound, so callers run them off the event loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urldefrag, urlsplit

import lxml.html
from lxml import etree
from markdownify import markdownify
from readability import Document

MAX_LINKS = 2000
MAX_TABLES = 100
MAX_ROWS = 1000
_BLANK_LINES = re.compile(r"\n{3,}")
_SPACES = re.compile(r"[ \t\r\f\v]+")


@dataclass
class Extracted:
    title: str
    markdown: str
    text: str
    html: str
    links: list[dict[str, str]] = field(default_factory=list)
    tables: list[dict[str, Any]] = field(default_factory=list)


def _parse(html: str, base_url: str) -> lxml.html.HtmlElement:
    root = lxml.html.document_fromstring(html or "<html><body></body></html>")
    root.make_links_absolute(base_url, resolve_base_href=True, handle_failures="discard")
    return root


def _text_of(element: lxml.html.HtmlElement) -> str:
    """Readable text: one line per block, whitespace collapsed, no script/style."""
    for bad in element.xpath(".//script|.//style|.//noscript|.//template"):
        bad.drop_tree()
    blocks = {"p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "br", "section", "article", "pre", "td"}
    for node in element.iter():
        if isinstance(node.tag, str) and node.tag in blocks:
            node.tail = "\n" + (node.tail or "")
    lines = (_SPACES.sub(" ", line).strip() for line in element.text_content().split("\n"))
    return "\n".join(line for line in lines if line)


def _markdown(html: str) -> str:
    text = markdownify(html, heading_style="ATX", bullets="-", strip=["script", "style", "img"])
    return _BLANK_LINES.sub("\n\n", text).strip() + "\n"


def main_content(html: str, base_url: str) -> tuple[str, str]:
    """(title, HTML of the main content) by readability; the whole body when it finds nothing."""
    document = Document(html, url=base_url)
    try:
        summary = document.summary(html_partial=True)
        title = document.short_title() or document.title() or ""
    except Exception:  # noqa: BLE001 - readability raises bare Exceptions on odd pages; fall back to the body
        summary, title = "", ""
    return title.strip(), summary


def extract(html: str, url: str, main_only: bool = True) -> Extracted:
    """Everything scrape mode may answer for one page, from its HTML and final URL."""
    root = _parse(html, url)
    title = (root.findtext(".//title") or "").strip()
    links = links_of(root)
    tables = tables_of(root)
    content_html = ""
    if main_only:
        readable_title, content_html = main_content(lxml.html.tostring(root, encoding="unicode"), url)
        title = title or readable_title
    if not content_html.strip():
        body = root.find("body")
        content_html = lxml.html.tostring(body if body is not None else root, encoding="unicode")
    content = lxml.html.fragment_fromstring(content_html, create_parent="div")
    return Extracted(
        title=title,
        markdown=_markdown(content_html),
        text=_text_of(content),
        html=content_html,
        links=links,
        tables=tables,
    )


def links_of(root: lxml.html.HtmlElement) -> list[dict[str, str]]:
    """Absolute http(s) links of the page, fragment dropped, first occurrence of each, with their text."""
    seen: set[str] = set()
    found = []
    for anchor in root.iter("a"):
        href = anchor.get("href")
        if not href:
            continue
        target, _ = urldefrag(href.strip())
        if urlsplit(target).scheme not in ("http", "https") or target in seen:
            continue
        seen.add(target)
        found.append({"url": target, "text": _SPACES.sub(" ", anchor.text_content()).strip()})
        if len(found) >= MAX_LINKS:
            break
    return found


def _cell(cell: etree._Element) -> str:
    return _SPACES.sub(" ", cell.text_content() if hasattr(cell, "text_content") else "").strip()


def tables_of(root: lxml.html.HtmlElement) -> list[dict[str, Any]]:
    """Each ``<table>``: ``headers`` (its ``th`` row, when there is one) and ``rows`` of cell texts."""
    tables = []
    for table in root.iter("table"):
        if table.xpath("ancestor::table"):
            continue  # nested tables are read as cells of their parent
        rows = [
            [_cell(c) for c in tr.xpath("./th|./td")] for tr in table.xpath("./tr|./thead/tr|./tbody/tr|./tfoot/tr")
        ]
        rows = [r for r in rows if any(r)]
        headers: list[str] = []
        first = table.xpath("./thead/tr[1]|./tr[1]|./tbody/tr[1]")
        if first and first[0].xpath("./th") and not first[0].xpath("./td") and rows:
            headers, rows = rows[0], rows[1:]
        caption = table.findtext("caption")
        entry: dict[str, Any] = {"headers": headers, "rows": rows[:MAX_ROWS]}
        if caption:
            entry["caption"] = caption.strip()
        tables.append(entry)
        if len(tables) >= MAX_TABLES:
            break
    return tables
