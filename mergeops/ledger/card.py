"""What every merged version says about itself (SPEC §3.4): a model card and an in-toto provenance.

Both name the folder digest, so both are excluded from it and written last, from the weights' hashes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeops import __version__

IN_TOTO_STATEMENT = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://github.com/mergeops/mergeops/provenance/v1"


@dataclass(frozen=True)
class Input:
    role: str  # "base", "previous" (the version this one extends) or "checkpoint"
    digest: str
    source: str


@dataclass(frozen=True)
class VersionFacts:
    stream: str
    version: int
    method: str
    params: dict[str, Any]
    inputs: tuple[Input, ...]
    checkpoints: tuple[Input, ...]  # every checkpoint folded so far, oldest first
    policy_digest: str
    created: str
    license: str | None = None
    gates: tuple[str, ...] = ()


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


def _model_id(source: str) -> str:
    """A Hub repo id where the source is on the Hub (hf://org/repo@sha -> org/repo), else the source."""
    if source.startswith("hf://"):
        return source.removeprefix("hf://").split("@", 1)[0]
    return source


def model_card(facts: VersionFacts, digest: str) -> str:
    base = next(i for i in facts.inputs if i.role == "base")
    ids = [_model_id(base.source), *(_model_id(c.source) for c in facts.checkpoints)]
    front = ["---", "base_model:", *(f"- {json.dumps(i)}" for i in ids), "base_model_relation: merge",
             "tags:", "- mergeops", f"- {facts.method}"]
    if facts.license:
        front.append(f"license: {facts.license}")
    front.append("---")
    params = ", ".join(f"{k}={json.dumps(v)}" for k, v in facts.params.items()) or "defaults"
    lines = [
        *front, "",
        f"# {facts.stream} v{facts.version:04d}", "",
        f"A continual merge made by mergeops {__version__}: {len(facts.checkpoints)} fine-tuned checkpoint(s) of "
        f"the base folded one at a time with `{facts.method}` ({params}).", "",
        f"- digest: `{digest}`",
        f"- base: `{base.source}` (`{base.digest}`)",
        f"- policy: `{facts.policy_digest}`",
        f"- gates passed by the newest checkpoint: {', '.join(facts.gates) or 'none'}", "",
        "| # | checkpoint | digest |", "|---|---|---|",
        *(f"| {n} | `{c.source}` | `{c.digest}` |" for n, c in enumerate(facts.checkpoints, 1)), "",
        "Full lineage, with who signed each step: `mergeops lineage <this folder> --policy <policy>`.", "",
    ]
    return "\n".join(lines)


def provenance(facts: VersionFacts, digest: str) -> dict[str, Any]:
    return {
        "_type": IN_TOTO_STATEMENT,
        "subject": [{"name": f"{facts.stream}/v{facts.version:04d}",
                     "digest": {"sha256": digest.removeprefix("sha256:")}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "stream": facts.stream, "version": facts.version, "method": facts.method, "parameters": facts.params,
            "inputs": [{"role": i.role, "digest": i.digest, "source": i.source} for i in facts.inputs],
            "checkpoints": [{"digest": c.digest, "source": c.source} for c in facts.checkpoints],
            "gates": list(facts.gates), "policy_digest": facts.policy_digest,
            "tool": {"name": "mergeops", "version": __version__}, "created": facts.created,
        },
    }


def card_files(facts: VersionFacts, digest: str) -> dict[str, bytes]:
    return {"README.md": model_card(facts, digest).encode(),
            "provenance.json": (json.dumps(provenance(facts, digest), indent=2) + "\n").encode()}
