"""The in-sandbox code interpreter: an E2B-compatible HTTP server on port 49999 driving Jupyter kernels.

Runs inside the sandbox (``python -m pmoves_e2b.interpreter``) and imports nothing from the rest of
``pmoves_e2b``. Kernels are driven directly with ``jupyter_client``; there is no Jupyter server.
"""
