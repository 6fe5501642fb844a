"""The message contracts in ``contracts/`` and checking messages against them.

``contracts/topics.json`` maps each subject to the JSON Schema of its payload, in the layout
PMOVES uses (``pmoves/contracts/topics.json`` + ``schemas/<area>/*.schema.json``), so PMOVES
can merge our entries into its own registry. Schemas may ``$ref`` each other by relative
file name. The directory is ``PMOVES_CONTRACTS_DIR`` when set (PMOVES' own variable), else
the repository's ``contracts/``, which the package reaches through the symlink
``pmoves_e2b/contracts`` (so wheels carry a copy).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from pmoves_e2b.config import contracts_dir_override
from pmoves_e2b.events.envelope import Envelope

ENVELOPE_SCHEMA = "schemas/common/envelope.schema.json"
PACKAGE_CONTRACTS_DIR = Path(__file__).resolve().parents[1] / "contracts"


class ContractError(ValueError):
    """A message breaks its subject's contract, or the subject has none. The text names the field."""


def contracts_dir() -> Path:
    return contracts_dir_override() or PACKAGE_CONTRACTS_DIR


def field_path(path: Any) -> str:
    """``deque(['run', 'files', 0, 'name'])`` -> ``run.files[0].name`` (``(root)`` when empty)."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(root)"


def describe(error: Any, prefix: str = "") -> str:
    """One line naming the offending field, from a jsonschema ValidationError."""
    where = field_path(error.absolute_path)
    if prefix:
        where = prefix if where == "(root)" else f"{prefix}.{where}"
    return error.message if where == "(root)" else f"{where}: {error.message}"


@dataclass(frozen=True)
class Topic:
    name: str
    schema_path: str
    description: str
    publisher: tuple[str, ...]
    subscriber: tuple[str, ...]


class Contracts:
    """The loaded topic registry with one compiled validator per schema file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        registry_file = root / "topics.json"
        try:
            data = json.loads(registry_file.read_text())
        except (OSError, ValueError) as exc:
            raise ContractError(f"cannot read the topic registry {registry_file}: {exc}") from None
        self.topics: dict[str, Topic] = {
            name: Topic(
                name,
                entry["schema"],
                entry.get("description", ""),
                tuple(entry.get("publisher", ())),
                tuple(entry.get("subscriber", ())),
            )
            for name, entry in data["topics"].items()
        }
        self._registry = self._load_schemas()
        self._validators: dict[str, Draft202012Validator] = {}

    def _load_schemas(self) -> Registry:
        resources = []
        for path in sorted((self.root / "schemas").rglob("*.schema.json")):
            schema = json.loads(path.read_text())
            Draft202012Validator.check_schema(schema)
            # Relative $refs resolve against the file itself, as in PMOVES' events.py.
            schema.setdefault("$id", path.resolve().as_uri())
            resources.append((schema["$id"], Resource.from_contents(schema, default_specification=DRAFT202012)))
        return Registry().with_resources(resources)

    def validator(self, schema_path: str) -> Draft202012Validator:
        cached = self._validators.get(schema_path)
        if cached is None:
            uri = (self.root / schema_path).resolve().as_uri()
            try:
                schema = self._registry.contents(uri)
            except LookupError:
                raise ContractError(f"schema file {schema_path} is missing from {self.root}") from None
            cached = Draft202012Validator(schema, registry=self._registry, format_checker=FormatChecker())
            self._validators[schema_path] = cached
        return cached

    def topic(self, name: str) -> Topic:
        topic = self.topics.get(name)
        if topic is None:
            raise ContractError(f"subject {name!r} has no contract: register it in {self.root / 'topics.json'}")
        return topic

    def check_payload(self, subject: str, payload: Any) -> None:
        error = best_match(self.validator(self.topic(subject).schema_path).iter_errors(payload))
        if error is not None:
            raise ContractError(f"{subject} payload is invalid: {describe(error, 'payload')}")

    def check_envelope(self, message: Envelope, subject: str | None = None) -> None:
        """The envelope shape, and the payload against the schema of ``subject`` (default: its topic)."""
        error = best_match(self.validator(ENVELOPE_SCHEMA).iter_errors(message.to_dict()))
        if error is not None:
            raise ContractError(f"envelope is invalid: {describe(error)}")
        self.check_payload(subject or message.topic, message.payload)


@functools.lru_cache(maxsize=4)
def _load(root: str) -> Contracts:
    return Contracts(Path(root))


def contracts() -> Contracts:
    """The process-wide contracts (loaded once per directory)."""
    return _load(str(contracts_dir()))


def check_payload(subject: str, payload: Any) -> None:
    contracts().check_payload(subject, payload)


def check_envelope(message: Envelope, subject: str | None = None) -> None:
    contracts().check_envelope(message, subject)
