"""e2b-surf's agent mode (computer use): screenshot -> model -> actions -> repeat.

``loop.py`` runs the loop against a :class:`~pmoves_e2b.surf.agent.computer.Computer` (the
session's desktop); ``providers/`` speak to the models (OpenAI Responses computer use,
Anthropic computer use, any OpenAI-compatible vision chat model).
"""
