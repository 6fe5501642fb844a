"""Helpers for the e2b-desktop tests: a standalone service process, Chromium, PNG checks."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image, ImageChops, ImageStat

OWN_VAR_PREFIXES = ("E2B_", "NATS_URL", "AGENT_ZERO_URL", "NEXT_PUBLIC_API_URL", "LOG_LEVEL", "LOG_FORMAT")
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(OWN_VAR_PREFIXES)}
    closed = f"http://127.0.0.1:{free_port()}"
    env.update(
        E2B_DATA_DIR=str(data_dir),
        E2B_BIND="127.0.0.1",
        E2B_DESKTOP_PORT=str(port),
        E2B_API_KEY="e2b_test_key_" + "a" * 24,
        E2B_DESKTOP_AUTH_TOKEN="desktop-token-" + "c" * 32,
        E2B_SANDBOX_URL=closed,
        NATS_URL=f"nats://127.0.0.1:{free_port()}",
        LOG_FORMAT="text",
    )
    env.update(extra)
    log = open(data_dir / "desktop.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pmoves_e2b.cli", "serve", "desktop"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/health", timeout=2, trust_env=False)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "e2b-desktop did not start:\n" + (data_dir / "desktop.log").read_text()
                    ) from None
                time.sleep(0.1)
        yield DesktopService(url, env["E2B_DESKTOP_AUTH_TOKEN"], env)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


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
