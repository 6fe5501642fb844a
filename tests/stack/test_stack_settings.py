"""Settings: env, `<NAME>_FILE`, generated secrets, derived defaults, masking."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pmoves_e2b.config import SECRET_NAMES, ConfigError, ensure_secrets, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.startswith(("E2B_", "NATS_URL", "LOG_", "AGENT_ZERO_URL", "NEXT_PUBLIC_API_URL")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("E2B_DATA_DIR", str(tmp_path))
    return tmp_path


def test_seed_defaults_and_paths_derived_from_the_data_dir(clean_env: Path) -> None:
    settings = load_settings()
    assert (settings.e2b_max_sandboxes, settings.e2b_sandbox_memory_mb, settings.e2b_sandbox_cpu_limit) == (5, 2048, 2)
    assert (settings.e2b_sandbox_timeout_sec, settings.e2b_desktop_resolution) == (3600, "1920x1080")
    assert (settings.e2b_sandbox_port, settings.e2b_mcp_port, settings.e2b_surf_port, settings.e2b_desktop_port) == (
        7070,
        7073,
        3080,
        6080,
    )
    assert settings.e2b_sandbox_url == "http://localhost:7070"
    assert settings.e2b_templates_dir == clean_env / "templates"
    assert settings.e2b_database_url == f"sqlite:///{clean_env}/pmoves-e2b.db"
    assert settings.embedded_nats and settings.nats_server_url == "nats://127.0.0.1:4222"


def test_env_wins_over_file_and_files_are_stripped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("E2B_API_KEY_FILE", str(key_file))
    monkeypatch.setenv("E2B_MAX_SANDBOXES_FILE", str(tmp_path / "max"))
    (tmp_path / "max").write_text(" 9 \n")
    settings = load_settings()
    assert settings.secret("E2B_API_KEY") == "from-file"
    assert settings.e2b_max_sandboxes == 9
    monkeypatch.setenv("E2B_API_KEY", "from-env")
    assert load_settings().secret("E2B_API_KEY") == "from-env"


def test_secrets_and_nats_credentials_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2B_API_KEY", "e2b_supersecret")
    monkeypatch.setenv("NATS_URL", "nats://user:natspass@nats:4222")
    settings = load_settings()
    shown = repr(settings) + str(settings) + settings.model_dump_json()
    assert "supersecret" not in shown and "natspass" not in shown
    assert settings.nats_server_url == "nats://user:natspass@nats:4222"


def test_generated_secrets_are_private_shaped_and_kept(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2B_DESKTOP_AUTH_TOKEN", "given")
    paths = ensure_secrets(load_settings())
    assert paths["E2B_DESKTOP_AUTH_TOKEN"] is None  # set by env: nothing generated
    assert not (clean_env / "secrets" / "E2B_DESKTOP_AUTH_TOKEN").exists()
    for name in ("E2B_API_KEY", "E2B_MCP_SERVER_TOKEN", "E2B_SURF_AUTH_TOKEN"):
        assert paths[name] == clean_env / "secrets" / name
        assert paths[name].stat().st_mode & 0o777 == 0o600
    key = (clean_env / "secrets" / "E2B_API_KEY").read_text().strip()
    assert key.startswith("e2b_") and len(key) == 44 and int(key[4:], 16) >= 0
    assert len((clean_env / "secrets" / "E2B_MCP_SERVER_TOKEN").read_text().strip()) == 64
    ensure_secrets(load_settings())  # second start: same secrets
    settings = load_settings()
    assert settings.secret("E2B_API_KEY") == key
    assert set(SECRET_NAMES) == {
        "E2B_API_KEY",
        "E2B_MCP_SERVER_TOKEN",
        "E2B_DESKTOP_AUTH_TOKEN",
        "E2B_NATS_PASSWORD",
        "E2B_SURF_AUTH_TOKEN",
    }


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"E2B_SURF_PORT": "0"}, "E2B_SURF_PORT='0' is invalid"),
        ({"E2B_SANDBOX_MEMORY_MB": "lots"}, "E2B_SANDBOX_MEMORY_MB='lots' is invalid"),
        ({"E2B_MCP_PORT": "7070"}, "E2B_MCP_PORT and E2B_SANDBOX_PORT are both 7070"),
        ({"E2B_MCP_SERVER_TOKEN_FILE": "/no/such/file"}, "E2B_MCP_SERVER_TOKEN_FILE=/no/such/file: cannot read it"),
    ],
)
def test_invalid_values_give_one_line_naming_the_variable(
    env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert message in str(error.value) and "\n" not in str(error.value)
