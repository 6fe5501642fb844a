"""Helpers for the e2b-desktop tests: a standalone service process, Chromium, PNG checks."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageChops, ImageStat
from stack.harness import clean_environ, free_ports, serve_alone

CHROMIUM = "/usr/bin/chromium"
# No phone-home from the test browser (desktop-surf-mcp-nats.md §3).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--metrics-recording-only",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication,"
    "CertificateTransparencyComponentUpdater",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1, EXCLUDE localhost",
]
SHOTS_DIR = Path(os.environ.get("PMOVES_E2B_SHOTS_DIR", "/tmp/pmoves-e2b-desktop-shots"))


@dataclass
class DesktopService:
    url: str
    token: str
    env: dict[str, str]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@contextlib.contextmanager
def run_service(data_dir: Path, **extra: str) -> Iterator[DesktopService]:
    """e2b-desktop alone (``pmoves-e2b serve desktop``), its sandbox backend unreachable."""
    port, closed_port, nats_port = free_ports(3)
    env = clean_environ()
    env.update(
        E2B_DATA_DIR=str(data_dir),
        E2B_BIND="127.0.0.1",
        E2B_DESKTOP_PORT=str(port),
        E2B_API_KEY="e2b_test_key_" + "a" * 24,
        E2B_DESKTOP_AUTH_TOKEN="desktop-token-" + "c" * 32,
        E2B_SANDBOX_URL=f"http://127.0.0.1:{closed_port}",
        NATS_URL=f"nats://127.0.0.1:{nats_port}",
        LOG_FORMAT="text",
    )
    env.update(extra)
    with serve_alone("desktop", env, data_dir / "desktop.log", "/health") as url:
        yield DesktopService(url, env["E2B_DESKTOP_AUTH_TOKEN"], env)


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def is_blank(image: Image.Image) -> bool:
    """One flat colour (a canvas that never drew anything)."""
    low, high = image.convert("L").getextrema()
    return high - low < 8


def changed_fraction(a: Image.Image, b: Image.Image) -> float:
    """Share of pixels that differ clearly between two same-size images."""
    diff = ImageChops.difference(a.convert("L"), b.convert("L")).point(lambda v: 255 if v > 24 else 0)
    return ImageStat.Stat(diff).mean[0] / 255


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute grey-level difference after scaling ``b`` to ``a``'s size (0..255)."""
    b = b.resize(a.size)
    return ImageStat.Stat(ImageChops.difference(a.convert("L"), b.convert("L"))).mean[0]


def save_shot(name: str, data: bytes) -> Path:
    SHOTS_DIR.mkdir(parents=True, exist_ok=True)
    path = SHOTS_DIR / name
    path.write_bytes(data)
    return path
