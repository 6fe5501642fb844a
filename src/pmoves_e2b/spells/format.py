"""The spell file format (YAML) and checking a file against it.

A spell file holds ``name``, ``version``, ``description``, ``language`` (python, bash or
javascript), optional ``template``, ``timeout``, ``parameters`` (a JSON Schema),
``requirements`` (pip/npm/apt), ``outputs`` (``files`` globs, ``result`` JSON Schema),
``example`` and ``code``. The full rules are ``spell.schema.json`` next to this module.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import SchemaError, best_match

from pmoves_e2b.events.schemas import describe

SPELL_SCHEMA_FILE = Path(__file__).with_name("spell.schema.json")
CODE_INTERPRETER_TEMPLATE = "code-interpreter-v1"
BASE_TEMPLATE = "base"
DEFAULT_TEMPLATES = {"python": CODE_INTERPRETER_TEMPLATE, "bash": BASE_TEMPLATE, "javascript": BASE_TEMPLATE}
DEFAULT_TIMEOUT_SECONDS = 60
EMPTY_OBJECT_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}


class SpellFormatError(ValueError):
    """A spell file cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Requirements:
    pip: tuple[str, ...] = ()
    npm: tuple[str, ...] = ()
    apt: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.pip or self.npm or self.apt)


@dataclass(frozen=True)
class Spell:
    name: str
    version: str
    description: str
    language: str
    template: str
    timeout: int
    parameters: dict[str, Any]
    requirements: Requirements
    output_files: tuple[str, ...]
    result_schema: dict[str, Any] | None
    example: dict[str, Any]
    code: str
    source: str = "builtin"  # builtin | user
    path: Path | None = field(default=None, compare=False)

    def summary(self) -> dict[str, Any]:
        """What ``GET /spells`` and ``spell_list`` show for one spell."""
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "language": self.language,
            "template": self.template,
            "timeout": self.timeout,
            "parameters": self.parameters,
            "requirements": {k: list(v) for k, v in vars(self.requirements).items() if v},
            "outputs": {"files": list(self.output_files), "result": self.result_schema},
            "example": self.example,
            "source": self.source,
        }


@functools.lru_cache(maxsize=1)
def _file_validator() -> Draft202012Validator:
    return Draft202012Validator(json.loads(SPELL_SCHEMA_FILE.read_text()))


def _check_schema(schema: dict[str, Any], where: str, path: Path) -> None:
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise SpellFormatError(f"{path}: {where} is not a valid JSON Schema: {describe(exc)}") from None


def parse_spell(data: Any, path: Path, source: str = "builtin") -> Spell:
    if not isinstance(data, dict):
        raise SpellFormatError(f"{path}: a spell file must be a YAML mapping, got {type(data).__name__}")
    error = best_match(_file_validator().iter_errors(data))
    if error is not None:
        raise SpellFormatError(f"{path}: {describe(error)}")
    parameters = data.get("parameters") or EMPTY_OBJECT_SCHEMA
    if parameters.get("type", "object") != "object":
        raise SpellFormatError(f"{path}: parameters: must be an object schema (type: object)")
    _check_schema(parameters, "parameters", path)
    outputs = data.get("outputs") or {}
    result_schema = outputs.get("result")
    if result_schema is not None:
        _check_schema(result_schema, "outputs.result", path)
    example = data.get("example") or {}
    example_error = None
    if "example" in data:
        checker = Draft202012Validator(parameters, format_checker=FormatChecker())
        example_error = best_match(checker.iter_errors(example))
    if example_error is not None:
        raise SpellFormatError(f"{path}: example does not match parameters: {describe(example_error, 'example')}")
    requirements = data.get("requirements") or {}
    return Spell(
        name=data["name"],
        version=data["version"],
        description=data["description"].strip(),
        language=data["language"],
        template=data.get("template") or DEFAULT_TEMPLATES[data["language"]],
        timeout=int(data.get("timeout", DEFAULT_TIMEOUT_SECONDS)),
        parameters=parameters,
        requirements=Requirements(*(tuple(requirements.get(k, ())) for k in ("pip", "npm", "apt"))),
        output_files=tuple(outputs.get("files", ())),
        result_schema=result_schema,
        example=example,
        code=data["code"],
        source=source,
        path=path,
    )


def load_spell_file(path: Path, source: str = "builtin") -> Spell:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpellFormatError(f"{path}: cannot read it: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpellFormatError(f"{path}: not valid YAML{where}: {problem}") from None
    spell = parse_spell(data, path, source)
    if path.stem != spell.name:
        raise SpellFormatError(f"{path}: the file must be named after the spell: {spell.name}.yaml")
    return spell
