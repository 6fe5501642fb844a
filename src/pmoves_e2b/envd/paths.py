"""Which of envd's plain HTTP paths are for clients and which only for the host.

The control plane's proxy refuses ``HOST_ONLY_PATHS`` from clients (``sandbox/proxy.py``), and a
test checks that every path envd's router serves is in exactly one of the two sets, so a new envd
route cannot be exposed by accident. Besides ``/init`` (which we serve), E2B's envd has host-only
endpoints we do not serve; they stay refused so a later envd that adds them is covered.
"""

from __future__ import annotations

CLIENT_PATHS = frozenset({"/health", "/files", "/envs", "/metrics"})
HOST_ONLY_PATHS = frozenset({"/init", "/freeze", "/unfreeze", "/fsfreeze", "/fsthaw", "/collapse", "/upgrade"})
