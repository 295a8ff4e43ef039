"""A small Dockerfile and .dockerignore reader for the deploy checks and the dry run (no Docker engine here).

Handles what our Dockerfile uses: comments, line continuations, ``FROM ... AS name``, ``ARG``, ``ENV k=v ...``,
``COPY [--from=stage] src... dst``, exec-form ``HEALTHCHECK ... CMD [...]``, ``VOLUME [...]``, ``EXPOSE`` and ``USER``.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                values[key] = value
        return values


def instructions(text: str) -> list[Instruction]:
    result, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        result.append(Instruction(keyword.upper(), args.strip()))
    return result


def stages(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults (before the first FROM) and the build stages in order."""
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for inst in instructions(text):
        if inst.keyword == "FROM":
            words = inst.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            result.append(Stage(words[0], name))
        elif not result:
            if inst.keyword == "ARG":
                key, _, value = inst.args.partition("=")
                global_args[key] = value
        else:
            result[-1].instructions.append(inst)
    return global_args, result


def copy_sources(args: str) -> tuple[str | None, list[str], str]:
    """(``--from`` stage or None, sources, destination) of a COPY."""
    words = shlex.split(args)
    origin = None
    while words and words[0].startswith("--"):
        flag = words.pop(0)
        if flag.startswith("--from="):
            origin = flag.split("=", 1)[1]
    return origin, words[:-1], words[-1]


def exec_form(args: str) -> list[str]:
    """The JSON array at the end of an instruction (``HEALTHCHECK ... CMD [..]``, ``CMD [..]``, ``VOLUME [..]``)."""
    return json.loads(args[args.index("[") :])


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_includes(patterns: list[str], path: str) -> bool:
    """Whether `path` (relative, with `/`) is in the build context: the last pattern matching the path or one of
    its parent folders decides, and ``!`` re-includes (Docker's rules)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for raw in patterns:
        negate = raw.startswith("!")
        regex = _pattern_regex(raw.lstrip("!").rstrip("/"))
        if any(regex.match(prefix) for prefix in prefixes):
            included = negate
    return included


def read_dockerignore(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
