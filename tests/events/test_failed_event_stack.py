"""A create that fails publishes e2b.sandbox.failed.v1 with the reason, and answers a clear 500."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from events.nats_client import synced

from pmoves_e2b.events import envelope, schemas
from pmoves_e2b.events.envelope import Envelope
from pmoves_e2b.sandbox.templates.store import load_template

pytestmark = pytest.mark.stack


def broken_templates_dir(tmp_path: Path, shared: Path) -> Path:
    """A templates dir whose `noenvd` template is base without its envd layer: it cannot start."""
    base = load_template("base", shared)
    (tmp_path / "layers").symlink_to(Path(base.layers[-1]).parent)
    record = {"name": "noenvd", "layers": [Path(base.layers[-1]).name], "user": "user", "workdir": "/home/user"}
    (tmp_path / "noenvd.json").write_text(json.dumps(record))
    return tmp_path


def test_failed_create_is_published_with_its_reason(stack_factory: Any, running_stack: Any, tmp_path: Path) -> None:
    shared = Path(running_stack.settings_env["E2B_TEMPLATES_DIR"])
    stack = stack_factory(
        extra_env={"E2B_TEMPLATES_DIR": str(broken_templates_dir(tmp_path, shared)), "E2B_POOL_SIZE": "0"}
    )
    marker = uuid.uuid4().hex

    async def scenario() -> tuple[httpx.Response, Envelope]:
        client = await nats.connect(stack.nats_url)
        events: list[Envelope] = []

        async def collect(msg: Any) -> None:
            event = envelope.parse(msg.data, msg.subject)
            schemas.check_envelope(event, msg.subject)
            events.append(event)

        await client.subscribe("e2b.sandbox.failed.v1", cb=collect)
        await synced(client)
        try:
            async with httpx.AsyncClient(timeout=120) as http:
                res = await http.post(
                    stack.sandbox_url + "/v2/sandboxes",
                    headers={"X-API-KEY": stack.api_key},
                    json={"templateID": "noenvd", "metadata": {"test": marker}},
                )
            async with asyncio.timeout(30):
                while not events:
                    await asyncio.sleep(0.05)
            return res, events[0]
        finally:
            await client.close()

    res, event = asyncio.run(scenario())
    assert res.status_code == 500
    assert "could not start the sandbox" in res.json()["message"]
    assert event.payload["template"] == "noenvd"
    assert event.payload["metadata"] == {"test": marker}
    assert "could not start the sandbox" in event.payload["reason"]
