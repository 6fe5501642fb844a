"""A Dockerfile subset (FROM, RUN, COPY, ENV, WORKDIR, USER, ARG) as a custom build request.

``pmoves-e2b template build NAME -f e2b.Dockerfile`` turns the file into the same request body the
SDK sends (``fromTemplate``/``fromImage`` + steps) and runs it with the same executor
(``custom.CustomBuilds``). COPY sources are packed from the context dir into the uploads store
under the files hash the executor checks. Any other instruction is an error naming its line.
As in E2B's SDK, the steps run as root in ``/`` unless the file says otherwise, and the template's
user and workdir are ``user`` and ``/home/user`` unless it set them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .custom import files_hash

SUPPORTED = ("FROM", "RUN", "COPY", "ENV", "WORKDIR", "USER", "ARG")
_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


class DockerfileError(ValueError):
    """What is wrong, with the line number."""


@dataclass
class ParsedDockerfile:
    base: str  # what FROM names
    steps: list[dict[str, Any]] = field(default_factory=list)
    copies: list[tuple[str, str]] = field(default_factory=list)  # (src, dest) per COPY step, in order


def _lines(text: str) -> list[tuple[int, str]]:
    """Logical lines (continuations joined, comments and blanks dropped) with their first line number."""
    out: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def _words(rest: str, line: int) -> list[str]:
    if rest.startswith("["):  # exec form
        try:
            words = json.loads(rest)
        except ValueError:
            raise DockerfileError(f"line {line}: invalid JSON form: {rest}") from None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise DockerfileError(f"line {line}: the JSON form must be a list of strings")
        return words
    try:
        return shlex.split(rest)
    except ValueError as exc:
        raise DockerfileError(f"line {line}: {exc}") from None


def parse(text: str, build_args: dict[str, str] | None = None) -> ParsedDockerfile:
    variables: dict[str, str] = {}
    given = dict(build_args or {})
    base = ""
    steps: list[dict[str, Any]] = [{"type": "USER", "args": ["root"]}, {"type": "WORKDIR", "args": ["/"]}]
    copies: list[tuple[str, str]] = []
    user_set = workdir_set = False

    def expand(word: str, line: int) -> str:
        def value(match: re.Match[str]) -> str:
            name = match[1] or match[2]
            if name not in variables:
                raise DockerfileError(f"line {line}: ${name} is not defined (ARG or ENV before it)")
            return variables[name]

        return _VARIABLE.sub(value, word)

    for line, content in _lines(text):
        instruction, _, rest = content.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction not in SUPPORTED:
            raise DockerfileError(
                f"line {line}: {instruction} is not supported by `pmoves-e2b template build` "
                f"(supported: {', '.join(SUPPORTED)})"
            )
        if instruction != "ARG" and not base and instruction != "FROM":
            raise DockerfileError(f"line {line}: {instruction} before FROM")
        if instruction == "FROM":
            if base:
                raise DockerfileError(f"line {line}: multi-stage Dockerfiles (a second FROM) are not supported")
            words = _words(rest, line)
            if len(words) != 1 or words[0].startswith("--"):
                raise DockerfileError(f"line {line}: FROM takes one image or template name (no flags, no AS)")
            base = expand(words[0], line)
        elif instruction == "ARG":
            for word in _words(rest, line):
                name, eq, default = word.partition("=")
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                    raise DockerfileError(f"line {line}: invalid ARG name {name!r}")
                if name in given:
                    variables[name] = given.pop(name)
                elif eq:
                    variables[name] = expand(default, line)
                else:
                    raise DockerfileError(f"line {line}: ARG {name} has no default and no --build-arg")
        elif instruction == "RUN":
            if not rest:
                raise DockerfileError(f"line {line}: RUN needs a command")
            command = shlex.join(_words(rest, line)) if rest.startswith("[") else rest
            # ARG values are in RUN's environment (as Docker gives them), not in the template's.
            args = {k: v for k, v in variables.items() if k not in _env_names(steps)}
            prefix = "".join(f"export {k}={shlex.quote(v)}; " for k, v in args.items())
            steps.append({"type": "RUN", "args": [prefix + command], "force": False})
        elif instruction == "COPY":
            words = _words(rest, line)
            owner = ""
            while words and words[0].startswith("--"):
                flag = words.pop(0)
                if flag.startswith("--chown="):
                    owner = expand(flag.removeprefix("--chown="), line).split(":", 1)[0]
                else:
                    raise DockerfileError(f"line {line}: COPY {flag.split('=')[0]} is not supported (only --chown)")
            if len(words) < 2:
                raise DockerfileError(f"line {line}: COPY needs a source and a destination")
            dest = expand(words[-1], line)
            for src in words[:-1]:
                src = expand(src, line)
                if os.path.isabs(src) or ".." in Path(src).parts:
                    raise DockerfileError(f"line {line}: COPY source {src!r} is outside the build context")
                steps.append({"type": "COPY", "args": [src, dest, owner, ""], "force": False})
                copies.append((src, dest))
        elif instruction == "ENV":
            words = _words(rest, line)
            pairs: list[str] = []
            if words and "=" not in words[0]:  # ENV NAME value...
                pairs = [words[0], expand(rest.partition(" ")[2].strip(), line)]
            else:
                for word in words:
                    name, eq, val = word.partition("=")
                    if not eq:
                        raise DockerfileError(f"line {line}: ENV {word!r} is not NAME=value")
                    pairs += [name, expand(val, line)]
            if not pairs or not pairs[0]:
                raise DockerfileError(f"line {line}: ENV needs NAME=value")
            for name, val in zip(pairs[0::2], pairs[1::2], strict=True):
                variables[name] = val
            steps.append({"type": "ENV", "args": pairs, "force": False})
        else:  # WORKDIR, USER
            words = _words(rest, line)
            if len(words) != 1:
                raise DockerfileError(f"line {line}: {instruction} takes one argument")
            value = expand(words[0], line)
            if instruction == "WORKDIR" and not value.startswith("/"):
                raise DockerfileError(f"line {line}: WORKDIR must be an absolute path")
            steps.append({"type": instruction, "args": [value], "force": False})
            user_set |= instruction == "USER"
            workdir_set |= instruction == "WORKDIR"
    if not base:
        raise DockerfileError("the Dockerfile has no FROM")
    if given:
        raise DockerfileError(f"--build-arg {', '.join(sorted(given))}: no ARG of that name in the Dockerfile")
    if not user_set:
        steps.append({"type": "USER", "args": ["user"]})
    if not workdir_set:
        steps.append({"type": "WORKDIR", "args": ["/home/user"]})
    return ParsedDockerfile(base, steps, copies)


def _env_names(steps: list[dict[str, Any]]) -> set[str]:
    return {name for step in steps if step["type"] == "ENV" for name in step["args"][0::2]}


def pack_copies(parsed: ParsedDockerfile, context: Path, uploads: Path) -> None:
    """Pack each COPY source (a file, a dir or a glob, relative to ``context``) into the uploads
    store and set its step's files hash, as the SDK's upload would."""
    context = context.resolve()
    uploads.mkdir(parents=True, exist_ok=True)
    copy_steps = [s for s in parsed.steps if s["type"] == "COPY"]
    for step, (src, dest) in zip(copy_steps, parsed.copies, strict=True):
        matches = sorted(context.glob(src)) if any(c in src for c in "*?[") else [context / src]
        if not matches or not all(m.exists() or m.is_symlink() for m in matches):
            raise DockerfileError(f"COPY {src}: no such file in the context {context}")
        with tempfile.NamedTemporaryFile(dir=uploads, prefix=".pack-", suffix=".tar", delete=False) as handle:
            tmp = Path(handle.name)
        try:
            with tarfile.open(tmp, "w") as tar:
                for match in matches:
                    if not match.resolve().is_relative_to(context) and not match.is_symlink():
                        raise DockerfileError(f"COPY {src}: {match} is outside the context {context}")
                    tar.add(match, arcname=str(match.relative_to(context)))
            digest = files_hash(tmp, src, dest)
            os.replace(tmp, uploads / f"{digest}.tar")
        finally:
            tmp.unlink(missing_ok=True)
        step["filesHash"] = digest
