"""How e2b-desktop boots a desktop (desktops.py: the SDK's commands, waited for inside the sandbox):
the first screenshot already shows the drawn desktop, Xvfb and XFCE run as the SDK runs them (envd
commands, as ``user``), a caller's ``on_display`` runs once X answers, and a desktop that cannot
boot, or whose ``on_display`` fails, is removed."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from desktop_service.desktop_harness import png
from e2b import AsyncSandbox, SandboxQuery

from pmoves_e2b.desktop.desktops import DesktopError, DesktopOps
from pmoves_e2b.sdk.config import build_sdk_config

pytestmark = pytest.mark.stack


def ops_of(stack: Any, template: str = "desktop") -> DesktopOps:
    return DesktopOps(build_sdk_config(stack.sandbox_url, stack.api_key), template=template)


async def live_ids(ops: DesktopOps, tag: str) -> list[str]:
    paginator = AsyncSandbox.list(query=SandboxQuery(metadata={"boot_test": tag}), **ops.config.options())
    ids: list[str] = []
    while paginator.has_next:
        ids += [info.sandbox_id for info in await paginator.next_items()]
    return ids


def dark_share(image: Any) -> float:
    """Share of (near) black pixels: an X screen nothing has drawn on yet is black."""
    histogram = image.convert("L").histogram()
    return sum(histogram[:12]) / (image.width * image.height)


def test_the_first_screenshot_shows_the_drawn_desktop(running_stack: Any) -> None:
    auth = {"Authorization": f"Bearer {running_stack.desktop_token}"}
    with httpx.Client(base_url=running_stack.desktop_url, headers=auth, timeout=120, trust_env=False) as api:
        created = api.post("/desktops", json={"resolution": "1024x768", "duration": 300})
        assert created.status_code == 201, created.text
        desktop_id = created.json()["desktop_id"]
        try:
            shot = api.get(f"/desktops/{desktop_id}/screenshot")
            assert shot.status_code == 200, shot.text
            image = png(shot.content)
            assert image.size == (1024, 768)
            # XFCE's backdrop is drawn (the SDK's own readiness lets a black screen through).
            assert dark_share(image) < 0.5, f"{dark_share(image):.0%} of the first screenshot is black"

            async def processes() -> list[Any]:
                options = build_sdk_config(running_stack.sandbox_url, running_stack.api_key).options()
                sandbox = await AsyncSandbox.connect(desktop_id, **options)
                listed = await sandbox.commands.list()
                users = await sandbox.commands.run("ps -o user= -C Xvfb,xfce4-session,xfwm4,xfdesktop | sort -u")
                return [listed, users.stdout.split()]

            listed, users = asyncio.run(processes())
            # As the SDK leaves them: Xvfb and startxfce4 are envd commands (the watcher waits on Xvfb's).
            commands = [" ".join([p.cmd, *p.args]) for p in listed]
            assert any(
                c.endswith("-c Xvfb :0 -ac -screen 0 1024x768x24 -retro -dpi 96 -nolisten tcp -nolisten unix")
                for c in commands
            ), commands
            assert any(c.endswith("-c startxfce4") for c in commands), commands
            assert users == ["user"]
        finally:
            api.delete(f"/desktops/{desktop_id}")


def test_on_display_runs_once_x_answers_and_its_failure_removes_the_desktop(running_stack: Any) -> None:
    ops = ops_of(running_stack)

    async def scenario() -> None:
        seen: list[str] = []

        async def check_display(desktop_id: str) -> None:
            seen.append(await ops.run(desktop_id, "xdpyinfo | grep dimensions"))

        desktop = await ops.create(
            resolution="800x600", duration_s=120, extra_metadata={"boot_test": "ok"}, on_display=check_display
        )
        try:
            assert "800x600 pixels" in seen[0]
        finally:
            await ops.kill(desktop.desktop_id)

        async def fail(desktop_id: str) -> None:
            raise RuntimeError("the caller's start failed")

        with pytest.raises(RuntimeError, match="the caller's start failed"):
            await ops.create(
                resolution="800x600", duration_s=120, extra_metadata={"boot_test": "hook"}, on_display=fail
            )
        assert await live_ids(ops, "hook") == []

    try:
        asyncio.run(scenario())
    finally:
        ops.close()


def test_a_desktop_that_cannot_boot_is_removed(running_stack: Any) -> None:
    # Template base has no X server: the display never answers.
    ops = ops_of(running_stack, template="base")

    async def scenario() -> None:
        with pytest.raises(DesktopError) as raised:
            await ops.create(resolution="800x600", duration_s=120, extra_metadata={"boot_test": "no-x"})
        # Our boot's own limit (the stack's e2b-desktop watcher gives a booting desktop longer).
        assert raised.value.status == 504 and "display (Xvfb) did not start" in raised.value.message
        assert await live_ids(ops, "no-x") == []
        assert [d for d in await ops.live() if d.metadata.get("boot_test")] == []

    try:
        asyncio.run(scenario())
    finally:
        ops.close()
