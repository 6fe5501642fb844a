"""Host-wide sandbox slots: slot k gives root-inside the host uid range ``UID_BASE + UID_RANGE*k``
and the routed /30 ``10.77.0.0/16 + 4k`` (``network.py``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pmoves_e2b.sandbox.backends.base import BackendError
from pmoves_e2b.sandbox.backends.ns import network

UID_BASE = 200_000
UID_RANGE = 65_536
SLOTS_DIR = Path("/run/pmoves-e2b/slots")


class SlotRegistry:
    """Host-wide slots; slot k = uid range + /30. A slot file holds its owner, made with O_EXCL."""

    def __init__(self, directory: Path = SLOTS_DIR) -> None:
        self.directory = directory

    def allocate(self, sandbox_id: str, runtime_dir: Path) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        used = {int(name) for name in os.listdir(self.directory) if name.isdigit()}
        owner = json.dumps({"sandbox_id": sandbox_id, "runtime_dir": str(runtime_dir)}).encode()
        for slot in range(network.MAX_SLOTS):
            if slot in used:
                continue
            try:
                fd = os.open(self.directory / str(slot), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            with os.fdopen(fd, "wb") as out:
                out.write(owner)
            return slot
        raise BackendError("no free sandbox slot (uid range / network) left on this host")

    def owners(self) -> dict[int, dict[str, Any]]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return {}
        found = {int(name): self.owner(int(name)) for name in names if name.isdigit()}
        return {slot: owner for slot, owner in found.items() if owner is not None}

    def owner(self, slot: int) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = json.loads((self.directory / str(slot)).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return found

    def set_owner(self, slot: int, owner: dict[str, Any]) -> None:
        """Hand a held slot to another owner (a kept netns's slot, taken or given back)."""
        tmp = self.directory / f".{slot}.tmp"
        # created 0600 like allocate's files (write_text + chmod left a moment of 0644)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            out.write(json.dumps(owner))
        tmp.replace(self.directory / str(slot))

    def release(self, slot: int) -> None:
        (self.directory / str(slot)).unlink(missing_ok=True)
