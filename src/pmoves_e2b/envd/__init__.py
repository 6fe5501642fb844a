"""envd: the daemon that runs inside every sandbox and speaks E2B's envd protocol.

Stock E2B SDKs talk to it on port 49983: Connect RPC (``process.Process``,
``filesystem.Filesystem``, JSON or binary codec) and plain HTTP (``/health``, ``/files``,
``/envs``, ``/metrics``, ``/init``), all in one ASGI app (``app.py``) served by uvicorn.

It imports nothing from the rest of ``pmoves_e2b``: templates ship only this package plus its
three runtime dependencies (connectrpc, protobuf-py, uvicorn). The control plane may import
``ENVD_VERSION`` (and nothing else) to report ``envdVersion`` in create responses.
"""

# Highest envd version whose SDK-gated features (wire-protocol reference, section 8) all work
# here: recursive watch, metrics with disk, stdin=False, envd-chosen default user, close_stdin,
# octet-stream/gzip uploads, file metadata xattrs, watch include_entry and allow_network_mounts.
ENVD_VERSION = "0.6.4"

__all__ = ["ENVD_VERSION"]
