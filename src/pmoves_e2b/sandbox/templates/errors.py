"""Errors of the template store and builder."""

from __future__ import annotations


class TemplateError(Exception):
    """Base class: the message says what went wrong and what to do."""


class TemplateNotFound(TemplateError):
    """No built template of that name (the API answers 404)."""

    def __init__(self, name: str, templates_dir: str, detail: str = "") -> None:
        super().__init__(
            detail
            or f"template '{name}' is not built in {templates_dir}; "
            f"run `pmoves-e2b template build {name}` (or `make templates`)"
        )
        self.name = name


class TemplateBuildError(TemplateError):
    """A build step failed; its log file has the details."""


class MissingHostTool(TemplateBuildError):
    """The host lacks a program the build needs (not worth a retry)."""
