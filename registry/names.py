"""Model and alias names, and references to a version: NAME, NAME:VERSION, NAME@ALIAS.

A name becomes a path component on disk and a key segment on S3, so the rule is strict:
1 to 100 characters from [A-Za-z0-9._-], starting with a letter or a digit. That excludes
"/", "..", leading dots (hidden files, the store's temporary files), spaces and every control
or non-ASCII character, so a name can neither leave its folder nor look like another name.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from registry.errors import RegistryError

MAX_NAME = 100
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_RULE = "letters, digits, '.', '_' and '-', starting with a letter or a digit"


def check_name(name: str, what: str = "model name") -> str:
    """Returns `name` when it is valid; raises RegistryError naming the rule it breaks."""
    if not name:
        raise RegistryError(f"{what} must not be empty")
    if len(name) > MAX_NAME:
        raise RegistryError(f"{what} is {len(name)} characters long; the limit is {MAX_NAME}")
    for ch in name:
        if unicodedata.category(ch).startswith("C"):
            raise RegistryError(
                f"{what} {name!r} contains the control character U+{ord(ch):04X}; "
                f"a name may contain only {_RULE}"
            )
    if "/" in name or "\\" in name:
        raise RegistryError(f"{what} {name!r} must not contain '/', '\\' or '..' (a path)")
    if not _NAME.fullmatch(name):
        raise RegistryError(f"{what} {name!r} is not allowed: a name may contain only {_RULE}")
    return name


def parse_version(text: str) -> int:
    """'3' or 'v3' → 3; versions start at 1."""
    digits = text[1:] if text[:1] in ("v", "V") else text
    if not digits.isdigit() or int(digits) < 1:
        raise RegistryError(f"version {text!r} is not a version number (1, 2, ... or v1, v2, ...)")
    return int(digits)


@dataclass(frozen=True)
class Ref:
    """What a user names: a model and at most one of a version or an alias (neither: latest)."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.alias:
            return f"{self.name}@{self.alias}"
        return f"{self.name}:{self.version}" if self.version else self.name


def parse_ref(text: str) -> Ref:
    """NAME, NAME:VERSION or NAME@ALIAS."""
    if "@" in text:
        name, alias = text.split("@", 1)
        return Ref(check_name(name), alias=check_name(alias, "alias"))
    if ":" in text:
        name, version = text.split(":", 1)
        return Ref(check_name(name), version=parse_version(version))
    return Ref(check_name(text))
