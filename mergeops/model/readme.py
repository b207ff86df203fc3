"""A model folder's card (README.md): the simple entries of its YAML front matter, such as its license."""

from __future__ import annotations

import os
import re
from pathlib import Path

from mergeops import untrusted
from mergeops.errors import UntrustedFileError


def read_front_matter(folder: Path) -> dict[str, str | list[str]]:
    """The simple ``key: value`` and ``key:`` + ``- item`` entries of a model card's YAML front matter. Raises
    :class:`UntrustedFileError` if the card is not a regular file or is too large."""
    card = folder / "README.md"
    if not os.path.lexists(card):
        return {}
    # a card is prose: a byte that is not UTF-8 spoils one character, not the license line
    text = untrusted.read_bytes(card).decode("utf-8", errors="replace")
    match = re.match(r"^---\n(.*?)\n---", text, re.S)
    if not match:
        return {}
    found: dict[str, str | list[str]] = {}
    key = None
    for line in match.group(1).splitlines():
        item = re.match(r"^\s*-\s+(.+?)\s*$", line)
        entry = re.match(r"^([A-Za-z_][\w-]*):\s*(.*?)\s*$", line)
        if item and key is not None and isinstance(found.get(key), list):
            found[key].append(_unquote(item.group(1), card))  # type: ignore[union-attr]
        elif entry:
            key = entry.group(1)
            found[key] = _unquote(entry.group(2), card) if entry.group(2) else []
    return found


def _unquote(value: str, card: Path) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        if value[0] == "'":
            return value[1:-1]
        try:  # YAML's double-quoted escapes are JSON's, mostly; one JSON does not know is kept as written
            return str(untrusted.parse_json(value, card))
        except UntrustedFileError:
            return value[1:-1]
    return value


def read_license(folder: Path) -> str | None:
    """The ``license`` of a model card's YAML front matter, if any."""
    found = read_front_matter(folder).get("license")
    return found if isinstance(found, str) and found else None
