"""pmoves-e2b: self-hosted, E2B-compatible sandboxes for AI agents.

Kept import-free on purpose: the in-sandbox daemons (``envd``, ``interpreter``) ship
inside templates together with this file and must not pull in host-side code.
"""

__version__ = "0.1.0"
