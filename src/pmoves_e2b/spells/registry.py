"""Where spells come from: the built-ins in this package plus the user directory.

``E2B_SPELLS_DIR`` (default ``<data dir>/spells``) holds the operator's own ``*.yaml`` spells;
a user spell with a built-in's name replaces it. Every file is checked when it is loaded:
a broken file is reported (logged, and listed by ``GET /spells`` / ``spell list``) and left
out, so it fails at load, not at run. The user directory is re-read when its files change.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from pmoves_e2b.spells.format import Spell, SpellFormatError, load_spell_file

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).with_name("builtin")
SPELL_SUFFIXES = (".yaml", ".yml")


class UnknownSpell(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"no spell named {name!r}; known spells: {', '.join(known) or 'none'}")
        self.name = name


@dataclass(frozen=True)
class LoadProblem:
    path: str
    error: str


def _spell_files(directory: Path | None) -> list[Path]:
    if directory is None or not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix in SPELL_SUFFIXES and p.is_file())


def _signature(files: list[Path]) -> tuple[tuple[str, int, int], ...]:
    stats = []
    for path in files:
        try:
            stat = path.stat()
        except OSError:
            continue
        stats.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(stats)


class SpellRegistry:
    def __init__(self, user_dir: Path | None, builtin_dir: Path = BUILTIN_DIR) -> None:
        self.user_dir = user_dir
        self.builtin_dir = builtin_dir
        self._lock = threading.Lock()
        self._signature: tuple[tuple[str, int, int], ...] | None = None
        self._spells: dict[str, Spell] = {}
        self._problems: list[LoadProblem] = []

    def refresh(self) -> None:
        """Load everything if any spell file was added, changed or removed since the last load."""
        with self._lock:
            files = [(p, "builtin") for p in _spell_files(self.builtin_dir)]
            files += [(p, "user") for p in _spell_files(self.user_dir)]
            signature = _signature([p for p, _ in files])
            if signature == self._signature:
                return
            spells: dict[str, Spell] = {}
            problems: list[LoadProblem] = []
            for path, source in files:
                try:
                    spell = load_spell_file(path, source)
                except SpellFormatError as exc:
                    problems.append(LoadProblem(str(path), str(exc)))
                    log.error("spell file skipped: %s", exc)
                    continue
                previous = spells.get(spell.name)
                if previous is not None and previous.source == source:
                    duplicate = f"{path}: spell {spell.name!r} is also defined in {previous.path}"
                    problems.append(LoadProblem(str(path), duplicate))
                    continue
                spells[spell.name] = spell
            self._spells, self._problems, self._signature = spells, problems, signature

    def spells(self) -> list[Spell]:
        self.refresh()
        return sorted(self._spells.values(), key=lambda s: s.name)

    def problems(self) -> list[LoadProblem]:
        self.refresh()
        return list(self._problems)

    def get(self, name: str) -> Spell:
        self.refresh()
        spell = self._spells.get(name)
        if spell is None:
            raise UnknownSpell(name, sorted(self._spells))
        return spell
