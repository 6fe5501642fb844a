"""The default isolation backend ("ns"), one module per concern:

- ``backend.py``: ``NsBackend`` (the ``Backend`` interface: create, pause, destroy, stats, ...);
- ``netns_backend.py``: ``NetnsBackend``, what every tier on these netns and cgroups shares (ns, gvisor, microvm);
- ``mounts.py``: libc mounts, idmapped template layers, the sandbox's disk;
- ``slots.py``: host-wide slots (uid range + /30 per sandbox);
- ``network.py``: netns, veth and nftables (the only module running ``ip``/``nft``);
- ``cgroups.py``: per-sandbox cgroups (the only module touching /sys/fs/cgroup);
- ``seccomp.py``: the syscall denylist;
- ``hostlimits.py``: host-wide kernel tables lifted so each sandbox's own limits bound it.

A next isolation tier gets a sibling package under ``sandbox/backends/``.
"""

from pmoves_e2b.sandbox.backends.ns.backend import ENVD_ARGV, NsBackend

__all__ = ["ENVD_ARGV", "NsBackend"]
