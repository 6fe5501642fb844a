"""What a failed stock-SDK call means (sdk/errors.py), checked on the SDK's real exception classes:
the answer desktops, the MCP server and spells give for it starts here."""

from __future__ import annotations

import httpx
import pytest
from e2b import exceptions as e2b_errors

from pmoves_e2b.sdk.errors import Failure, classify


@pytest.mark.parametrize(
    ("exc", "failure", "status"),
    [
        (e2b_errors.NotFoundException("sandbox abc not found"), Failure.NOT_FOUND, 404),
        (e2b_errors.FileNotFoundException("/nope"), Failure.NOT_FOUND, 404),
        (e2b_errors.SandboxNotRunningException("ended"), Failure.NOT_RUNNING, 504),
        (e2b_errors.AuthenticationException("bad key"), Failure.AUTH, 502),
        (e2b_errors.TimeoutException("slow"), Failure.TIMEOUT, 504),
        (e2b_errors.RateLimitException("20 sandboxes"), Failure.LIMIT, 429),
        (e2b_errors.InvalidArgumentException("timeout must be > 0"), Failure.INVALID, 422),
        (httpx.ConnectError("refused"), Failure.UNREACHABLE, 503),
        (ConnectionRefusedError(), Failure.UNREACHABLE, 503),
        (e2b_errors.TemplateException("template x not built"), Failure.SANDBOX, 400),
        (ValueError("a defect"), Failure.OTHER, 502),
    ],
)
def test_each_sdk_failure_has_one_meaning_and_status(exc: Exception, failure: Failure, status: int) -> None:
    assert classify(exc) is failure
    assert failure.status == status


def test_a_sandbox_that_ended_or_never_was_is_gone() -> None:
    assert classify(e2b_errors.SandboxNotRunningException("ended")).gone
    assert classify(e2b_errors.NotFoundException("no such sandbox")).gone
    assert not classify(e2b_errors.TimeoutException("slow")).gone
