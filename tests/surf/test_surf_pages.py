"""e2b-surf's web UI page without a stack: everything it loads is its own, its CSP, the sign-in switch,
and e2b-desktop letting (only) e2b-surf's origin frame its viewer."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

from pmoves_e2b.config import Settings
from pmoves_e2b.desktop.app import surf_origin
from pmoves_e2b.desktop.pages import SECURITY_HEADERS, framed_headers
from pmoves_e2b.surf.app import create_app
from pmoves_e2b.surf.pages import STATIC_DIR

TOKEN = "surf-token-" + "b" * 32


def client(tmp_path: Path) -> TestClient:
    settings = Settings(
        e2b_data_dir=tmp_path,
        e2b_surf_auth_token=TOKEN,
        e2b_desktop_auth_token="desktop-token-" + "c" * 32,
        e2b_desktop_url="http://desk.example:6080",
    )
    return TestClient(create_app(settings), base_url="http://surf.example:3080")


def test_the_page_loads_only_its_own_assets_under_a_strict_csp(tmp_path: Path) -> None:
    web = client(tmp_path)
    page = web.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-src http://desk.example:6080;" in csp and "frame-ancestors 'none'" in csp
    assert '"signed_in": false' in page.text
    references = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert references and all(ref.startswith(("/", "data:")) for ref in references), references
    for ref in [r for r in references if r.startswith("/static/")]:
        asset = web.get(ref)
        assert asset.status_code == 200, ref
    # The modules import only each other, from this origin.
    for script in STATIC_DIR.glob("*.js"):
        for target in re.findall(r'^import .* from "([^"]+)";', script.read_text(), re.MULTILINE):
            assert target.startswith("/static/") and web.get(target).status_code == 200, target
        assert "style:" not in script.read_text()  # inline styles would be refused by the CSP


def test_signing_in_switches_the_page_to_the_app(tmp_path: Path) -> None:
    web = client(tmp_path)
    assert web.post("/login", data={"token": "wrong"}).status_code == 401
    signed = web.post("/login", data={"token": TOKEN, "next": "/"}, follow_redirects=False)
    assert signed.status_code == 303
    assert '"signed_in": true' in web.get("/").text


def test_only_e2b_surf_may_frame_the_desktop_viewer() -> None:
    framed = framed_headers("http://localhost:3080")
    assert "frame-ancestors 'self' http://localhost:3080" in framed["Content-Security-Policy"]
    assert "X-Frame-Options" not in framed  # the CSP decides; XFO would forbid any other origin
    assert framed_headers("") == SECURITY_HEADERS
    assert SECURITY_HEADERS["X-Frame-Options"] == "SAMEORIGIN"
    assert surf_origin(Settings(next_public_api_url="https://surf.example:8443/base/")) == "https://surf.example:8443"
