"""Result files of surf sessions (screenshots, large extracted content) and their signed URLs.

Files live in ``<E2B_DATA_DIR>/surf/<session id>/<name>`` (the directory is private). Records
(steps, pages) hold a file reference ``{"file": name, "bytes": n, "content_type": type}``; answers
add ``url``: ``<NEXT_PUBLIC_API_URL>/api/sessions/<id>/files/<name>?sig=<credential>``, valid
``E2B_SURF_FILE_URL_TTL`` seconds for that session's files, so a result can be downloaded by a
program or a page without the token.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pmoves_e2b.web_auth import Grant, Signer

FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
INLINE_LIMIT = 64 * 1024  # a text value larger than this (bytes, UTF-8) becomes a file
CONTENT_TYPES = {".png": "image/png", ".md": "text/markdown", ".txt": "text/plain", ".html": "text/html"}
FILE_KIND = "file"


def content_type_of(name: str) -> str:
    return CONTENT_TYPES.get(Path(name).suffix, "application/octet-stream")


def is_file_ref(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("file"), str) and "bytes" in value


class ResultFiles:
    def __init__(self, root: Path, signer: Signer | None, public_url: str, url_ttl_s: int) -> None:
        self.root = root
        self.signer = signer
        self.public_url = public_url.rstrip("/")
        self.url_ttl_s = url_ttl_s

    def path(self, session_id: str, name: str) -> Path:
        if not FILE_NAME.match(name) or not FILE_NAME.match(session_id):
            raise ValueError(f"bad result file name {name!r}")
        return self.root / session_id / name

    async def save(self, session_id: str, name: str, data: bytes) -> dict[str, Any]:
        path = self.path(session_id, name)

        def write() -> None:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.parent.mkdir(exist_ok=True, mode=0o700)
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)

        await asyncio.to_thread(write)
        return {"file": name, "bytes": len(data), "content_type": content_type_of(name)}

    async def spill(self, session_id: str, name: str, text: str) -> str | dict[str, Any]:
        """``text`` itself when small, else a file reference (the whole text in a file)."""
        data = text.encode()
        if len(data) <= INLINE_LIMIT:
            return text
        return await self.save(session_id, name, data)

    def read(self, session_id: str, name: str) -> Path | None:
        try:
            path = self.path(session_id, name)
        except ValueError:
            return None
        return path if path.is_file() else None

    def remove(self, session_id: str) -> None:
        if FILE_NAME.match(session_id):
            shutil.rmtree(self.root / session_id, ignore_errors=True)

    # ----- signed URLs -----------------------------------------------------------------

    def url(self, session_id: str, name: str) -> str:
        base = f"{self.public_url}/api/sessions/{quote(session_id)}/files/{quote(name)}"
        if self.signer is None:
            return base
        return f"{base}?sig={self.signer.sign(FILE_KIND, session_id, 'view', self.url_ttl_s)}"

    def verify(self, session_id: str, sig: str | None) -> Grant | None:
        if self.signer is None:
            return None
        grant = self.signer.verify(FILE_KIND, sig)
        return grant if grant is not None and grant.covers(session_id) else None

    def with_urls(self, session_id: str, value: Any) -> Any:
        """``value`` with a fresh signed ``url`` on every file reference in it."""
        if is_file_ref(value):
            return {**value, "url": self.url(session_id, value["file"])}
        if isinstance(value, dict):
            return {k: self.with_urls(session_id, v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.with_urls(session_id, v) for v in value]
        return value
