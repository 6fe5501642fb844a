"""envd: the daemon that runs inside every sandbox and speaks E2B's envd protocol.

Stock E2B SDKs talk to it on port 49983: Connect RPC (``process.Process``,
``filesystem.Filesystem``, JSON or binary codec) and plain HTTP (``/health``, ``/files``,
``/envs``, ``/metrics``, ``/init``), all in one ASGI app (``app.py``) served by uvicorn.

It imports nothing from the rest of ``pmoves_e2b``: templates ship only this package plus its
three runtime dependencies (connectrpc, protobuf-py, uvicorn). The host side may import only what
this module exports (``__all__``; tests/envd/test_boundaries.py enforces it): the version it
reports, its port, its host-only paths, the signed-URL helper, the launcher's setpriv variable and the
spawn helper's and library's paths, the xattr socket's and store's paths.
"""

from pmoves_e2b.envd.auth import signature as file_signature
from pmoves_e2b.envd.paths import HOST_ONLY_PATHS

# Highest envd version whose SDK-gated features (wire-protocol reference, section 8) all work
# here: recursive watch, metrics with disk, stdin=False, envd-chosen default user, close_stdin,
# octet-stream/gzip uploads, file metadata xattrs, watch include_entry and allow_network_mounts.
ENVD_VERSION = "0.6.4"

ENVD_PORT = 49983

# Set by the launcher of a template from an image: util-linux setpriv of envd's own runtime (the
# image's may be missing or busybox's, which lacks --reuid), as the shell words that run it (spawn.py).
SETPRIV_ENV = "ENVD_SETPRIV"

# Where templates put envd's static spawn helper (spawn_helper.c, built into the envd layer).
SPAWN_HELPER = "/opt/pmoves/bin/pmoves-spawn"
# And its spawn library (spawn_library.c): the same without the helper's exec, in envd's process.
SPAWN_LIBRARY = "/opt/pmoves/lib/libpmoves-spawn.so"

# envd's socket for programs' own xattr calls where the file system refuses them (xattr_socket.py);
# the gvisor tier's preload shim asks it.
XATTR_SOCKET = "/run/pmoves/xattr.sock"
# envd's store of user xattrs there (metadata_store.py): the shim asks about listings only once it exists.
METADATA_STORE = "/var/lib/pmoves-envd/file-metadata"

__all__ = [
    "ENVD_PORT",
    "ENVD_VERSION",
    "HOST_ONLY_PATHS",
    "METADATA_STORE",
    "SETPRIV_ENV",
    "SPAWN_HELPER",
    "SPAWN_LIBRARY",
    "XATTR_SOCKET",
    "file_signature",
]
