"""The shipped monitoring (monitoring/): Debian's Prometheus scrapes the running stack with the
shipped config and loads the alert rules; every metric the rules and the Grafana dashboard query
exists on the services' /metrics; Promtail's log paths are the files the supervisor writes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from stack.harness import RunningStack, free_ports

from pmoves_e2b.config import SERVICES

pytestmark = pytest.mark.stack

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
RULES = MONITORING / "prometheus" / "rules" / "e2b.yml"
SCRAPE_CONFIG = MONITORING / "prometheus" / "prometheus.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "e2b.json"
PROMTAIL = MONITORING / "loki" / "promtail.yml"
# Our metric names; PromQL functions, label names and Prometheus' own `up` never start like this.
OUR_METRIC = re.compile(r"\b(?:e2b|http|nats)_[a-z0-9_]+\b")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"), "gauge": ("",)}


def queried_expressions() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs += [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    return exprs


def exposed_names(text: str) -> set[str]:
    """Every series name /metrics can carry, also for labelled metrics with no series yet."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.update(name + suffix for suffix in SUFFIXES.get(kind, ("",)))
            names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_every_metric_the_rules_and_the_dashboard_query_is_exposed(running_stack: RunningStack) -> None:
    exposed: set[str] = set()
    for key, url in running_stack.urls.items():
        headers = {"Authorization": f"Bearer {running_stack.mcp_token}"} if key == "mcp" else {}
        response = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
        assert response.status_code == 200
        exposed |= exposed_names(response.text)
    queried = {name for expr in queried_expressions() for name in OUR_METRIC.findall(expr)}
    assert len(queried) > 15  # the check sees the queries
    assert sorted(queried - exposed) == []


def test_the_dashboard_covers_what_operators_watch() -> None:
    queries = " ".join(queried_expressions())
    for must in (
        "e2b_sandboxes_active",
        "e2b_sandboxes_created_total",
        "e2b_sandbox_create_failures_total",
        "e2b_sandbox_create_seconds_bucket",
        "e2b_executions_total",
        'job="e2b-mcp-server"',
        "e2b.spell.execute.v1",
        "e2b_sandbox_pool_hits_total",
        'up{job=~"e2b-.*"}',
    ):
        assert must in queries, must


@pytest.fixture()
def prometheus(running_stack: RunningStack, tmp_path: Path) -> Iterator[str]:
    """Debian's Prometheus with the shipped config, its targets pointed at the test stack."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Debian's prometheus is not installed (make test-sysdeps installs it)")
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(RULES)]
    by_job = {service.name: service.key for service in SERVICES}
    token_file = tmp_path / "e2b_mcp_server_token"
    token_file.write_text(running_stack.mcp_token)
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{running_stack.ports[by_job[job['job_name']]]}"]}]
        if "authorization" in job:
            job["authorization"]["credentials_file"] = str(token_file)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    (port,) = free_ports(1)
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_prometheus_scrapes_every_service_and_loads_the_rules(prometheus: str) -> None:
    deadline = time.monotonic() + 60
    health: dict[str, str] = {}
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{prometheus}/api/v1/targets", timeout=5)
            # a Prometheus still starting (on a busy machine, for seconds) answers 503 "Service Unavailable"
            if response.status_code == 200:
                health = {
                    target["labels"]["job"]: target["health"] for target in response.json()["data"]["activeTargets"]
                }
                if len(health) == len(SERVICES) and set(health.values()) == {"up"}:
                    break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    assert health == {service.name: "up" for service in SERVICES}
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(rules) >= {"E2BServiceDown", "E2BSandboxesNearLimit", "E2BNatsDisconnected", "E2BDataDirFilling"}
    # Evaluated against the live stack: nothing is down, NATS is connected, no alert fires.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(rule["health"] == "unknown" for rule in rules.values()):
        time.sleep(0.5)
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert {name: rule["health"] for name, rule in rules.items() if rule["health"] != "ok"} == {}
    firing = {name for name, rule in rules.items() if rule.get("state") == "firing"}
    assert "E2BServiceDown" not in firing and "E2BNatsDisconnected" not in firing


def test_promtool_accepts_the_rules_and_the_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus package) is not installed (make test-sysdeps installs it)")
    # --syntax-only: the token file it names exists on the deployed host, not here (the
    # Prometheus test above loads the config with a real one).
    for args in (["check", "rules", str(RULES)], ["check", "config", "--syntax-only", str(SCRAPE_CONFIG)]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


def test_promtail_reads_the_files_the_supervisor_writes_labelled_by_job(running_stack: RunningStack) -> None:
    config = yaml.safe_load(PROMTAIL.read_text())
    labels = [entry["labels"] for job in config["scrape_configs"] for entry in job["static_configs"]]
    jobs = {label["job"]: Path(label["__path__"]) for label in labels}
    assert set(jobs) >= {service.name for service in SERVICES}
    for job, path in jobs.items():
        assert job.startswith("e2b-")
        in_stack = running_stack.data_dir / "logs" / path.name
        assert in_stack.is_file(), f"{job}: the stack writes no {path.name}"
        if job != "e2b-nats":  # nats-server writes its own text format; ours are JSON lines
            line = in_stack.read_text().splitlines()[-1]
            assert json.loads(line)["level"]
