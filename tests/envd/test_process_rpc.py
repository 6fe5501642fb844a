"""process.Process details the SDK does not expose: tags, keepalives, the binary codec.
Driven by the Connect client generated from our own proto/ (same wire as the SDK's)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from connectrpc.codec import proto_binary_codec, proto_json_codec
from connectrpc.errors import ConnectError
from protobuf import Oneof

from envd.conftest import RunningEnvd
from pmoves_e2b.envd.gen.process.process_connect import ProcessClientSync
from pmoves_e2b.envd.gen.process.process_pb import (
    ConnectRequest,
    ListRequest,
    ProcessConfig,
    ProcessSelector,
    SendSignalRequest,
    Signal,
    StartRequest,
)


@pytest.fixture(params=["json", "proto"])
def client(envd: RunningEnvd, request: pytest.FixtureRequest) -> Iterator[ProcessClientSync]:
    codec = proto_json_codec() if request.param == "json" else proto_binary_codec()
    with ProcessClientSync(envd.url, codec=codec, send_compression=None, accept_compression=()) as rpc:
        yield rpc


def _kinds(events) -> list[str]:  # type: ignore[no-untyped-def]
    return [e.event.event.field for e in events]


def test_tagged_process_is_selectable_by_tag(client: ProcessClientSync) -> None:
    stream = client.start(StartRequest(process=ProcessConfig(cmd="/bin/sleep", args=["30"]), tag="svc-1"))
    first = next(iter(stream))
    assert first.event.event.field == "start"
    pid = first.event.event.value.pid
    listed = {p.pid: p.tag for p in client.list(ListRequest()).processes}
    assert listed[pid] == "svc-1"
    by_tag = ProcessSelector(selector=Oneof("tag", "svc-1"))
    client.send_signal(SendSignalRequest(process=by_tag, signal=Signal.SIGKILL))
    end = [e for e in stream if e.event.event.field == "end"][0].event.event.value
    assert (end.exit_code, end.exited, end.status) == (-1, False, "signal: killed")


def test_keepalive_events_follow_the_requested_interval(client: ProcessClientSync) -> None:
    started = time.monotonic()
    events = list(
        client.start(
            StartRequest(process=ProcessConfig(cmd="/bin/sleep", args=["2.2"])),
            headers={"Keepalive-Ping-Interval": "1"},
        )
    )
    kinds = _kinds(events)
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("keepalive") >= 1
    assert time.monotonic() - started < 10


def test_end_event_reports_exit_status_like_go(client: ProcessClientSync) -> None:
    events = list(client.start(StartRequest(process=ProcessConfig(cmd="/bin/sh", args=["-c", "exit 7"]))))
    end = events[-1].event.event.value
    assert (end.exit_code, end.exited, end.status, end.error) == (7, True, "exit status 7", "exit status 7")
    ok = list(client.start(StartRequest(process=ProcessConfig(cmd="/bin/true"))))[-1].event.event.value
    assert (ok.exit_code, ok.status, ok.has_field("error")) == (0, "exit status 0", False)


def test_connect_to_unknown_tag_is_not_found(client: ProcessClientSync) -> None:
    with pytest.raises(ConnectError) as info:
        list(client.connect(ConnectRequest(process=ProcessSelector(selector=Oneof("tag", "missing")))))
    assert info.value.code.value == "not_found"


def test_missing_command_is_invalid_argument(client: ProcessClientSync) -> None:
    with pytest.raises(ConnectError) as info:
        list(client.start(StartRequest(process=ProcessConfig(cmd=""))))
    assert info.value.code.value == "invalid_argument"


def _rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status", encoding="ascii"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_slow_stream_applies_backpressure_instead_of_buffering(envd: RunningEnvd) -> None:
    before = _rss_mib(envd.process.pid)
    with ProcessClientSync(envd.url, codec=proto_json_codec(), send_compression=None, accept_compression=()) as rpc:
        stream = iter(rpc.start(StartRequest(process=ProcessConfig(cmd="/usr/bin/yes"))))
        pid = next(stream).event.event.value.pid
        time.sleep(1.5)  # the client reads nothing: envd must stop reading `yes`, not buffer it
        grown = _rss_mib(envd.process.pid) - before
        rpc.send_signal(SendSignalRequest(process=ProcessSelector(selector=Oneof("pid", pid)), signal=Signal.SIGKILL))
    assert grown < 100, f"envd grew by {grown:.0f} MiB"


def test_gzip_compressed_requests_and_responses(envd: RunningEnvd) -> None:
    from connectrpc.compression.gzip import GzipCompression

    gzip = GzipCompression()
    with ProcessClientSync(
        envd.url, codec=proto_json_codec(), send_compression=gzip, accept_compression=(gzip,)
    ) as rpc:
        events = list(rpc.start(StartRequest(process=ProcessConfig(cmd="/bin/echo", args=["zipped"]))))
        assert _kinds(events)[0] == "start" and _kinds(events)[-1] == "end"
        assert (
            b"".join(e.event.event.value.output.value for e in events if e.event.event.field == "data") == b"zipped\n"
        )
        assert rpc.list(ListRequest()) is not None
