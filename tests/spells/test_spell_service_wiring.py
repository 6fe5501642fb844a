"""e2b-mcp-server exposes spells over REST and MCP; requests that cannot run get clear errors (no sandbox needed)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from mcp.server.mcpserver.exceptions import ToolError

from pmoves_e2b.config import load_settings
from pmoves_e2b.mcp.app import create_app

API_KEY = "e2b_" + "c" * 40


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    data = tmp_path_factory.mktemp("mcp-spells")
    spells = data / "spells"
    spells.mkdir()
    (spells / "broken.yaml").write_text("name: broken\nversion: 1\n")
    settings = load_settings(
        e2b_data_dir=data,
        e2b_api_key=API_KEY,
        e2b_mcp_server_token="t" * 64,
        e2b_sandbox_url=f"http://127.0.0.1:{closed_port()}",
        nats_url=f"nats://127.0.0.1:{closed_port()}",
        agent_zero_url=f"http://127.0.0.1:{closed_port()}",
    )
    with TestClient(create_app(settings), headers={"X-E2B-API-Key": API_KEY}) as test_client:
        yield test_client


def test_get_spells_lists_builtins_with_schemas_and_reports_broken_files(client):
    body = client.get("/spells").json()
    by_name = {spell["name"]: spell for spell in body["spells"]}
    assert {"run-python", "chart-csv", "markdown-pdf"} <= set(by_name)
    assert by_name["sql-query"]["parameters"]["required"] == ["tables", "query"]
    assert [p["path"].rsplit("/", 1)[1] for p in body["problems"]] == ["broken.yaml"]
    assert "broken.yaml: 'description' is a required property" in body["problems"][0]["error"]
    shown = client.get("/spells/chart-csv").json()
    assert "matplotlib" in shown["code"] and shown["outputs"]["files"] == ["chart.png"]
    assert client.get("/spells/nope").status_code == 404


@pytest.mark.parametrize(
    ("body", "status", "error", "words"),
    [
        ({"spell_name": "nope"}, 404, "not_found", "no spell named 'nope'"),
        (
            {"spell_name": "sql-query", "parameters": {"query": "select 1"}},
            422,
            "invalid_parameters",
            "spell sql-query: parameters: 'tables' is a required property",
        ),
        (
            {"spell_name": "run-python", "parameters": {"code": "1"}, "timeout": 100000},
            422,
            "invalid_request",
            "timeout must be between 1 and 300 seconds",
        ),
        ({"spell_name": "run-python", "parameters": {"code": "1"}}, 503, "unavailable", "unreachable"),
    ],
)
def test_post_spell_execute_answers_errors_as_json(client, body, status, error, words):
    response = client.post("/spell/execute", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"] == error and words in response.json()["detail"]


def test_spell_routes_need_credentials(client):
    assert client.get("/spells", headers={"X-E2B-API-Key": "wrong"}).status_code == 401


def test_mcp_tools_spell_list_and_spell_run_are_registered(client):
    server = client.app.state.mcp_server

    async def scenario() -> None:
        names = {tool.name for tool in await server.list_tools()}
        assert {"spell_list", "spell_run"} <= names and not any("." in n for n in names)
        listed = await server.call_tool("spell_list", {})
        assert "profile-csv" in str(listed)
        with pytest.raises(ToolError, match="parameters.kind: 'pie' is not one of"):
            await server.call_tool(
                "spell_run", {"spell_name": "chart-csv", "parameters": {"csv": "a\n1", "kind": "pie"}}
            )

    asyncio.run(scenario())


def test_malformed_execute_bodies_get_422_naming_the_field(client):
    for body, field in (
        ({}, "spell_name"),
        ({"spell_name": "x", "parameters": []}, "parameters"),
        ({"spell_name": "x", "timeout": 0}, "timeout"),
    ):
        response = client.post("/spell/execute", json=body)
        assert response.status_code == 422 and field in response.text
