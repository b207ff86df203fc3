"""A model folder's card (README.md): the simple entries of its YAML front matter, such as its license."""

from __future__ import annotations

import json
import re
from pathlib import Path


def read_front_matter(folder: Path) -> dict[str, str | list[str]]:
    """The simple ``key: value`` and ``key:`` + ``- item`` entries of a model card's YAML front matter."""
    card = folder / "README.md"
    if not card.is_file():
        return {}
    match = re.match(r"^---\n(.*?)\n---", card.read_text(errors="replace"), re.S)
    if not match:
        return {}
    found: dict[str, str | list[str]] = {}
    key = None
    for line in match.group(1).splitlines():
        item = re.match(r"^\s*-\s+(.+?)\s*$", line)
        entry = re.match(r"^([A-Za-z_][\w-]*):\s*(.*?)\s*$", line)
        if item and key is not None and isinstance(found.get(key), list):
            found[key].append(_unquote(item.group(1)))  # type: ignore[union-attr]
        elif entry:
            key = entry.group(1)
            found[key] = _unquote(entry.group(2)) if entry.group(2) else []
    return found


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return json.loads(value) if value[0] == '"' else value[1:-1]
    return value


def read_license(folder: Path) -> str | None:
    """The ``license`` of a model card's YAML front matter, if any."""
    found = read_front_matter(folder).get("license")
    return found if isinstance(found, str) and found else None
