"""Spells: versioned YAML recipes of code that run in sandboxes (see docs/spells.md).

``format`` (the file format), ``registry`` (built-ins + ``E2B_SPELLS_DIR``), ``executor`` (the one
executor), and its front doors: ``rest`` (``GET /spells``, ``POST /spell/execute``), ``mcp_tools``
(``spell_list``, ``spell_run``), ``bus`` (NATS ``e2b.spell.execute.v1``) and ``cli``.
"""
