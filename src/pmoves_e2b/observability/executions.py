"""Execution metrics of e2b-mcp-server (names from PMOVES' E2B docs).

An execution is one run_code / run_command (MCP or REST). It counts as failed when it could
not run (unknown sandbox, backend down, timeout) or ran and failed (an exception in the
code, a non-zero exit code), which is what PMOVES' E2BHighFailureRate alert divides.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

EXECUTIONS = Counter("e2b_executions_total", "Code or command executions started", ["kind"])
EXECUTIONS_FAILED = Counter("e2b_executions_failed_total", "Executions that failed", ["kind"])
EXECUTION_DURATION = Histogram(
    "e2b_execution_duration_seconds",
    "Wall time of an execution",
    ["kind"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
