"""e2b-desktop: what the service adds to desktops, and how fast a viewer sees a change.

Run as root: ``.venv/bin/python bench/bench_desktop.py [--runs 20] [--creates 5]``. Starts its
own stack (temp data dir, free ports; template ``desktop`` must be built). Baselines from the
same run: the stock ``e2b_desktop`` SDK straight against e2b-sandbox (create + first screenshot,
``screenshot()``) and the REST action's own round trip. Measured: ``POST /desktops`` + first
``GET /desktops/{id}/screenshot`` (interleaved with the SDK's creates; first screenshots still black,
i.e. taken before XFCE drew its backdrop, are counted for both); ``GET /desktops/{id}/screenshot``;
a right click over REST until the first VNC framebuffer update reaches a viewer through
``/websockify``; the desktop's memory when idle, without and with Chromium (e2b-sandbox's metrics). ``--pool 0`` for cold creates.
Then a second stack with ``E2B_DESKTOP_WARM=1``: a 1920x1080 desktop over REST claimed from the
pool of booted ones, and one of 1920x1081 booted on demand, against the SDK's create at 1920x1080.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import re
import struct
import sys
import time
from pathlib import Path

import httpx
import websockets
from e2b_desktop import Sandbox
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from measure import report, report_baseline, timed  # noqa: E402
from stack.harness import make_stack, stop_and_clean  # noqa: E402

RESOLUTION = (1024, 768)


def sdk_options(stack) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {"api_key": stack.api_key, "api_url": stack.sandbox_url, "sandbox_url": stack.sandbox_url}


async def rfb_viewer(url: str, headers: dict[str, str]) -> tuple[websockets.ClientConnection, bytearray]:
    ws = await websockets.connect(url, additional_headers=headers, subprotocols=["binary"], max_size=None)
    buffer = bytearray()

    async def read(n: int) -> bytes:
        while len(buffer) < n:
            buffer.extend(await ws.recv())
        data = bytes(buffer[:n])
        del buffer[:n]
        return data

    await read(12)
    await ws.send(b"RFB 003.008\n")
    await read(2)
    await ws.send(b"\x01")
    await read(4)
    await ws.send(b"\x01")
    header = await read(24)
    await read(struct.unpack(">I", header[20:24])[0])  # desktop name
    await ws.send(bytes([2, 0]) + struct.pack(">H", 1) + struct.pack(">i", 0))  # raw encoding only
    return ws, buffer


async def click_to_update(stack, desktop_id: str, runs: int) -> tuple[list[float], list[float]]:  # type: ignore[no-untyped-def]
    """REST right click/escape alternately; time until the viewer gets a framebuffer update."""
    auth = {"Authorization": f"Bearer {stack.desktop_token}"}
    url = stack.desktop_url.replace("http", "ws") + f"/websockify?desktop={desktop_id}"
    ws, _ = await rfb_viewer(url, auth)
    width, height = RESOLUTION
    full = bytes([3, 0]) + struct.pack(">HHHH", 0, 0, width, height)
    incremental = bytes([3, 1]) + struct.pack(">HHHH", 0, 0, width, height)
    updates, actions = [], []
    async with httpx.AsyncClient(headers=auth, timeout=60) as client:
        await ws.send(full)
        await asyncio.sleep(2)
        for index in range(runs):
            # Drain whatever is pending, then ask for the next change only.
            while True:
                try:
                    await asyncio.wait_for(ws.recv(), 0.3)
                except TimeoutError:
                    break
            await ws.send(incremental)
            action = (
                {"type": "click", "x": 500, "y": 380, "button": "right"}
                if index % 2 == 0
                else {"type": "key", "keys": "escape"}
            )
            started = time.perf_counter()
            sent = asyncio.ensure_future(client.post(f"{stack.desktop_url}/desktops/{desktop_id}/actions", json=action))
            first = await asyncio.wait_for(ws.recv(), 30)
            updates.append((time.perf_counter() - started) * 1000)
            response = await sent
            actions.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200 and first[:1] == b"\x00", response.text
            await asyncio.sleep(0.5)
    await ws.close()
    return updates, actions


def is_black(data: bytes) -> bool:
    """Nothing drawn yet: XFCE's processes run but its backdrop is not painted (the SDK's readiness)."""
    image = Image.open(io.BytesIO(data)).convert("L")
    return sum(image.histogram()[:12]) > 0.5 * image.width * image.height


def memory_mb(stack, sandbox_id: str) -> float:  # type: ignore[no-untyped-def]
    response = httpx.get(
        f"{stack.sandbox_url}/sandboxes/{sandbox_id}/metrics", headers={"X-API-KEY": stack.api_key}, timeout=30
    )
    samples = response.json()
    return samples[-1]["memUsed"] / 2**20 if samples else float("nan")


def pool_ready(stack, template: str) -> float:  # type: ignore[no-untyped-def]
    text = httpx.get(f"{stack.sandbox_url}/metrics", timeout=10).text
    found = re.search(rf'^e2b_sandbox_pool_ready{{template="{template}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def bench_warm(creates: int) -> None:
    """E2B_DESKTOP_WARM=1: default-resolution desktops claimed from the pool of booted ones."""
    stack = make_stack({"E2B_POOL_SIZE": "1", "E2B_DESKTOP_WARM": "1"})
    try:
        stack.up()
        auth = {"Authorization": f"Bearer {stack.desktop_token}"}
        api = httpx.Client(base_url=stack.desktop_url, headers=auth, timeout=120)
        size = (1920, 1080)

        def ready(template: str) -> None:
            deadline = time.monotonic() + 180
            while pool_ready(stack, template) < 1:
                if time.monotonic() > deadline:
                    raise SystemExit(f"no warm {template} sandbox got ready")
                time.sleep(0.3)

        sdk: list[float] = []
        warm: list[float] = []
        cold: list[float] = []
        black = {"desktop-warm": 0, "desktop": 0}
        for _ in range(creates):
            ready("desktop")
            started = time.perf_counter()
            desktop = Sandbox.create(resolution=size, timeout=300, **sdk_options(stack))
            desktop.screenshot()
            sdk.append((time.perf_counter() - started) * 1000)
            desktop.kill()
            for template, samples, body in (
                ("desktop-warm", warm, {"duration": 300}),
                ("desktop", cold, {"duration": 300, "resolution": "1920x1081"}),
            ):
                ready(template)
                started = time.perf_counter()
                created = api.post("/desktops", json=body)
                if created.status_code != 201:
                    raise SystemExit(f"POST /desktops {body} answered {created.status_code}: {created.text}")
                desktop_id = created.json()["desktop_id"]
                shot = api.get(f"/desktops/{desktop_id}/screenshot")
                samples.append((time.perf_counter() - started) * 1000)
                black[template] += is_black(shot.content)
                Path(f"/tmp/bench-desktop-{template}.png").write_bytes(shot.content)
                api.delete(f"/desktops/{desktop_id}")
        report_baseline("SDK Sandbox.create + screenshot() 1920x1080", sdk)
        report("REST create from a booted one + first shot", warm, sdk)
        report("REST create, booted on demand (1920x1081)", cold, sdk)
        for template, count in black.items():
            print(f"{'  first screenshots still black, ' + template:46s} {count:3d} of {creates}", flush=True)
    finally:
        stop_and_clean(stack)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--creates", type=int, default=5)
    parser.add_argument("--pool", type=int, default=1, help="E2B_POOL_SIZE of the stack (0: cold creates)")
    options = parser.parse_args()
    print(f"warm pool size {options.pool}", flush=True)
    stack = make_stack({"E2B_POOL_SIZE": str(options.pool)})
    try:
        stack.up()
        auth = {"Authorization": f"Bearer {stack.desktop_token}"}
        api = httpx.Client(base_url=stack.desktop_url, headers=auth, timeout=120)
        resolution = f"{RESOLUTION[0]}x{RESOLUTION[1]}"

        black: dict[str, int] = {"sdk": 0, "rest": 0}

        def sdk_create() -> None:
            desktop = Sandbox.create(resolution=RESOLUTION, timeout=300, **sdk_options(stack))
            black["sdk"] += is_black(bytes(desktop.screenshot()))
            desktop.kill()

        def rest_create() -> None:
            created = api.post("/desktops", json={"resolution": resolution, "duration": 300})
            desktop_id = created.json()["desktop_id"]
            shot = api.get(f"/desktops/{desktop_id}/screenshot")
            assert shot.status_code == 200
            black["rest"] += is_black(shot.content)
            api.delete(f"/desktops/{desktop_id}")

        # Interleaved, so load from other processes hits both alike.
        create_base: list[float] = []
        create_rest: list[float] = []
        for _ in range(options.creates):
            create_base += timed(sdk_create, 1)
            time.sleep(2)  # the warm pool refills between creates
            create_rest += timed(rest_create, 1)
            time.sleep(2)
        report_baseline("SDK Sandbox.create + screenshot()", create_base)
        report("REST POST /desktops + first screenshot", create_rest, create_base)
        for name, key in (("SDK", "sdk"), ("REST", "rest")):
            print(f"{'  first screenshots still black, ' + name:46s} {black[key]:3d} of {options.creates}", flush=True)

        created = api.post("/desktops", json={"resolution": resolution, "duration": 900}).json()
        desktop_id = created["desktop_id"]
        try:
            sdk = Sandbox.connect(desktop_id, **sdk_options(stack))
            sdk._display = ":0"
            shot_base = timed(sdk.screenshot, options.runs, warmup=2)
            shot_rest = timed(lambda: api.get(f"/desktops/{desktop_id}/screenshot"), options.runs, warmup=2)
            report_baseline("SDK screenshot() (scrot + files.read)", shot_base)
            report("REST GET /desktops/{id}/screenshot", shot_rest, shot_base)
            time.sleep(6)  # one metrics sample of the idle desktop
            print(f"{'idle desktop memory (no browser)':46s} {memory_mb(stack, desktop_id):8.1f} MB", flush=True)
            updates, actions = asyncio.run(click_to_update(stack, desktop_id, options.runs))
            report_baseline("REST action round trip (click or key)", actions)
            report("action -> first VNC update at the viewer", updates, actions)
            api.post(f"/desktops/{desktop_id}/actions", json={"type": "open", "url": "file:///etc/hostname"})
            time.sleep(12)  # Chromium up and one more metrics sample
            print(f"{'idle desktop memory (Chromium, one tab)':46s} {memory_mb(stack, desktop_id):8.1f} MB", flush=True)
        finally:
            api.delete(f"/desktops/{desktop_id}")
    finally:
        stop_and_clean(stack)
    print("--- a stack with E2B_DESKTOP_WARM=1 (desktops of 1920x1080 booted ahead by the warm pool)", flush=True)
    bench_warm(options.creates)
    return 0


if __name__ == "__main__":
    sys.exit(main())
