"""Admission: a create whose memory limit would push the live sandboxes past the budget is refused."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.stack


def test_create_beyond_the_memory_budget_is_a_clear_429(stack_factory: Any) -> None:
    # Room for one 256 MB sandbox, not two; the count limit (5) would allow both.
    stack = stack_factory({"E2B_POOL_SIZE": "0", "E2B_SANDBOX_MEMORY_MB": "256", "E2B_MEMORY_BUDGET_MB": "400"})
    headers = {"X-API-KEY": stack.api_key}
    with httpx.Client(base_url=stack.sandbox_url, headers=headers, timeout=120) as api:
        first = api.post("/v2/sandboxes", json={"templateID": "base"})
        assert first.status_code == 201, first.text
        refused = api.post("/v2/sandboxes", json={"templateID": "base"})
        assert refused.status_code == 429, refused.text
        assert refused.headers.get("Should-Retry") == "false"
        body = refused.json()
        assert body["code"] == 429 and "E2B_MEMORY_BUDGET_MB" in body["message"]
        assert len(api.get("/v2/sandboxes").json()) == 1
        # Killing the first gives its memory back.
        assert api.delete(f"/sandboxes/{first.json()['sandboxID']}").status_code == 204
        again = api.post("/v2/sandboxes", json={"templateID": "base"})
        assert again.status_code == 201, again.text
        api.delete(f"/sandboxes/{again.json()['sandboxID']}")
