"""The gVisor isolation tier ("gvisor"), one module per concern:

- ``backend.py``: ``GvisorBackend`` (the ns backend with runsc as the launcher);
- ``bundle.py``: the OCI config of a sandbox;
- ``runsc.py``: the only module running ``runsc`` (timeouts, netns, global flags);
- ``reaper.py``: the subreaper runsc runs under (its processes reaped as they end), built by
  ``sandbox/native.py`` like ``shim.py``'s library.
"""

from pmoves_e2b.sandbox.backends.gvisor.backend import GvisorBackend

__all__ = ["GvisorBackend"]
