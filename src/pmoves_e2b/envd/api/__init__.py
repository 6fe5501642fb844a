"""envd's plain HTTP endpoints (``/health``, ``/files``, ``/envs``, ``/metrics``, ``/init``)."""
