"""Deleting a custom template or one of its tags: one rule for the API (``DELETE /templates/{id}``)
and the CLI (``pmoves-e2b template delete NAME[:TAG]``).

Built-in templates are refused; so is a template (a tag) that live sandboxes, running or paused,
were created from. The record goes (with ``E2B_TEMPLATE_STORE``, the store's copy too, or a create
would fetch it back); the layers stay for ``pmoves-e2b template prune``, cached for a rebuild.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .definitions import TEMPLATES
from .errors import TemplateError, TemplateNotFound
from .store import DEFAULT_TAG, read_record, records_locked, remove_tags, split_ref, template_record_path

if TYPE_CHECKING:
    from .s3store import S3TemplateStore


class BuiltInTemplate(TemplateError):
    """A template `pmoves-e2b template build` makes: not deleted through the API or this command."""


class TemplateInUse(TemplateError):
    """Live sandboxes were created from it."""


def _uses(ref: str, tagged: bool, live_templates: Iterable[str]) -> list[str]:
    name, tag = split_ref(ref)
    if not tagged:
        return [t for t in live_templates if split_ref(t)[0] == name]
    return [t for t in live_templates if split_ref(t) == (name, tag) or (tag == DEFAULT_TAG and t == name)]


def delete_template(
    templates_dir: Path, ref: str, live_templates: Iterable[str], remote: S3TemplateStore | None = None
) -> dict[str, Any] | None:
    """Delete template ``name``, or only ``name:tag`` (a template left without tags goes). Returns
    the deleted record (a snapshot's files are the caller's to remove), None for a tag.
    ValueError for a bad name, BuiltInTemplate, TemplateNotFound, TemplateInUse (nothing changes)."""
    name, tag = split_ref(ref)
    tagged = ":" in ref
    if name in TEMPLATES:
        raise BuiltInTemplate(f"template '{name}' is built in; it cannot be deleted through the API")
    if not template_record_path(templates_dir, name).is_file():
        raise TemplateNotFound(name, str(templates_dir), f"template '{name}' not found")
    if users := _uses(ref, tagged, live_templates):
        what = f"'{name}:{tag}'" if tagged else f"'{name}'"
        raise TemplateInUse(f"template {what} has running or paused sandboxes ({len(users)}); kill them first")
    if tagged:
        try:
            remove_tags(templates_dir, name, [tag])
        except KeyError as exc:
            raise TemplateNotFound(name, str(templates_dir), str(exc.args[0])) from None
        if remote is not None:  # the store's copy follows (gone with the last tag)
            if template_record_path(templates_dir, name).is_file():
                remote.push_record(templates_dir, name)
            else:
                remote.delete_record(name)
        return None
    with records_locked(templates_dir):
        record = read_record(templates_dir, name)
        template_record_path(templates_dir, name).unlink()
    if remote is not None:
        remote.delete_record(name)
    return record
