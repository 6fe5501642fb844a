"""The README lists the data-stack versions code-interpreter-v1 installs (issue 12 item 13)."""

from __future__ import annotations

from pathlib import Path

from pmoves_e2b.sandbox.templates.definitions import DATA_PACKAGES

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_lists_every_pinned_data_package() -> None:
    text = " ".join(README.read_text().split())
    pins = [spec.split("==") for spec in DATA_PACKAGES.split()]
    assert pins and all(len(pin) == 2 for pin in pins), "every data package is pinned"
    missing = [f"{name} {version}" for name, version in pins if f"{name} {version}" not in text]
    assert not missing, f"README does not list: {missing}"
