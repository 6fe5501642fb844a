"""Which installed Jupyter kernel runs which language.

The SDK sends language names such as ``python``, ``js`` or ``ts``; the template installs kernelspecs
such as ``python3``, ``deno`` or ``ir``. This module maps one onto the other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager

ALIASES = {"js": "javascript", "ts": "typescript", "py": "python", "python3": "python", "sh": "bash"}

# Kernelspec names to try first, best first. Deno runs both JavaScript and TypeScript (with
# top-level await and imports), so one kernel serves both languages when it is installed.
PREFERRED_KERNELS = {
    "python": ("python3",),
    "javascript": ("deno", "javascript", "jslab"),
    "typescript": ("deno", "tslab"),
    "bash": ("bash",),
    "r": ("ir",),
    "java": ("java",),
}


class UnknownLanguageError(LookupError):
    def __init__(self, language: str, available: list[str]) -> None:
        listed = ", ".join(available) or "none"
        super().__init__(f"No kernel is installed for language {language!r} (installed kernels: {listed})")


@dataclass(frozen=True)
class KernelChoice:
    """A kernelspec chosen for a language, and how its runtime sets environment variables."""

    kernel_name: str
    language: str
    runtime: str  # python | node | deno | bash | r | java | other


def normalize_language(language: str | None) -> str:
    if not language:
        return "python"
    name = language.strip().lower()
    return ALIASES.get(name, name)


def _runtime(spec: dict[str, Any]) -> str:
    spec_language = str(spec.get("language", "")).lower()
    argv = spec.get("argv") or [""]
    if spec_language in ("javascript", "typescript"):
        return "deno" if "deno" in os.path.basename(str(argv[0])) else "node"
    if spec_language in ("python", "bash", "r", "java"):
        return spec_language
    return "other"


class KernelCatalog:
    """The kernelspecs visible through the usual Jupyter paths (``JUPYTER_PATH``, sys.prefix, ...)."""

    def __init__(self) -> None:
        self._manager = KernelSpecManager()
        self._specs: dict[str, dict[str, Any]] = {}
        self.refresh()

    def refresh(self) -> None:
        self._specs = {name: entry["spec"] for name, entry in self._manager.get_all_specs().items()}

    def names(self) -> list[str]:
        return sorted(self._specs)

    def resolve(self, language: str | None) -> KernelChoice:
        normalized = normalize_language(language)
        choice = self._find(normalized)
        if choice is None:
            self.refresh()  # a kernel may have been installed after start-up
            choice = self._find(normalized)
        if choice is None:
            raise UnknownLanguageError(normalized, self.names())
        return choice

    def _find(self, language: str) -> KernelChoice | None:
        for name in PREFERRED_KERNELS.get(language, ()):
            if name in self._specs:
                return KernelChoice(name, language, _runtime(self._specs[name]))
        for name, spec in sorted(self._specs.items()):
            if str(spec.get("language", "")).lower() == language or name == language:
                return KernelChoice(name, language, _runtime(spec))
        return None
