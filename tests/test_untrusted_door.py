"""Every file mergeops did not write is read through one door, ``mergeops.untrusted``.

This walks every module of the package with ``ast`` and fails on any call that opens, reads or parses a file another
way: ``open``, ``os.open``, ``Path.read_text``, ``json.loads``, ``tomllib``, ``safe_open``, ``torch.load``,
``shutil.copyfile``, ... A call that only writes (``open(path, "wb")``, ``os.open`` with write flags only) is not a
read. The few other readers left are listed below, each with the reason it is not reading such a file; a new one
fails this test until it goes through the door or is listed with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mergeops

PACKAGE = Path(mergeops.__file__).parent
DOOR = "untrusted.py"

# Calls, by the name they are imported under, that open, read or parse a file.
READERS = frozenset({
    "open", "io.open", "io.FileIO", "codecs.open", "os.open", "os.fdopen", "mmap.mmap",
    "json.load", "json.loads", "tomllib.load", "tomllib.loads", "pickle.load", "pickle.loads",
    "safetensors.safe_open", "safetensors.torch.load_file", "safetensors.torch.load", "torch.load",
    "numpy.load", "numpy.fromfile", "numpy.memmap", "zipfile.ZipFile", "zipfile.is_zipfile",
    "shutil.copyfile", "shutil.copy", "shutil.copy2", "shutil.copyfileobj", "shutil.copytree",
})
# Methods that read whatever object they are called on (a Path): ``.open`` too, unless called on a class
# (``ModelFolder.open``, ``Ledger.open``, ``cls.open``: mergeops's own constructors).
READING_METHODS = frozenset({"read_text", "read_bytes", "open"})
WRITE_MODES = frozenset("wxa")
WRITE_FLAGS = frozenset({"O_WRONLY", "O_CREAT", "O_EXCL", "O_TRUNC", "O_APPEND", "O_CLOEXEC", "O_NOFOLLOW"})

# (module, call) -> why it does not read a file mergeops did not write. Keep it short and honest.
ALLOWED: dict[tuple[str, str], str] = {
    ("durable.py", "os.open"): "fsync of a folder or file mergeops just wrote; opened to fsync, nothing is read",
    ("ledger/lock.py", "os.open"): "the home's lock file, which mergeops creates and only locks",
    ("model/writer.py", "os.open"): "the shard files the writer itself creates (O_RDWR to write at offsets)",
    ("model/safetensors_file.py", "safetensors.safe_open"):
        "the reference parser, given /proc/self/fd/N of the file the door opened",
    ("intake/curvature.py", "torch.load"): "weights-only, given /proc/self/fd/N of the optimizer.pt the door opened",
    ("intake/curvature.py", "zipfile.is_zipfile"): "given /proc/self/fd/N of the optimizer.pt the door opened",
    ("ledger/store.py", "json.loads"): "rows of the ledger's SQLite database, which mergeops wrote",
    ("ledger/events.py", "json.loads"): "event payloads read from the ledger's SQLite database",
    ("ledger/audit.py", "json.loads"): "file listings in ledger rows (SQLite); files on disk go through the door",
    ("ledger/lock.py", "Path.read_text"): "/proc/locks, the kernel's list of file locks (is a writer at work?)",
    ("patterns.py", "json.loads"): "the result lines of the pattern-matching child process mergeops runs itself",
    ("daemon/loop.py", "json.loads"): "the results of queued items, rows of the ledger's SQLite database",
}


def imported_names(tree: ast.Module) -> dict[str, str]:
    """Local name -> the dotted name it stands for (``import numpy as np``: np -> numpy)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:  # ``import a.b`` binds a; ``import a.b as c`` binds c to a.b
                local = alias.asname or alias.name.split(".")[0]
                names[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def dotted(node: ast.expr, names: dict[str, str]) -> str | None:
    """The dotted name a call's function stands for, resolved through the module's imports."""
    if isinstance(node, ast.Name):
        return names.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        inner = dotted(node.value, names)
        return f"{inner}.{node.attr}" if inner else None
    return None


def only_writes(call: ast.Call, name: str) -> bool:
    """``open(path, "wb")``, ``path.open("w")``, ``os.open(path, os.O_WRONLY | os.O_CREAT ...)``: no read."""
    if name == "os.open":
        flags = call.args[1] if len(call.args) > 1 else None
        used = {n.attr for n in ast.walk(flags) if isinstance(n, ast.Attribute)} if flags else set()
        return bool(used) and used <= WRITE_FLAGS and "O_WRONLY" in used
    args = call.args[1:] if name == "open" else call.args
    mode = next((k.value for k in call.keywords if k.arg == "mode"), args[0] if args else None)
    return (isinstance(mode, ast.Constant) and isinstance(mode.value, str) and bool(WRITE_MODES & set(mode.value))
            and "+" not in mode.value)


def readers_in(source: str) -> list[tuple[int, str]]:
    """(line, call) of every call in ``source`` that opens, reads or parses a file other than through the door."""
    tree = ast.parse(source)
    names = imported_names(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func, names)
        if name and name.startswith("mergeops.untrusted."):
            continue
        if name in READERS:
            call = name
        elif isinstance(node.func, ast.Attribute) and node.func.attr in READING_METHODS:
            receiver = node.func.value
            if node.func.attr == "open" and isinstance(receiver, ast.Name) and (
                    receiver.id[:1].isupper() or receiver.id == "cls"):
                continue
            call = f"Path.{node.func.attr}"
        else:
            continue
        if not only_writes(node, call):
            found.append((node.lineno, call))
    return found


def test_every_reader_in_the_package_goes_through_the_door() -> None:
    unlisted, used = [], set()
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        if module == DOOR:
            continue
        for line, call in readers_in(path.read_text()):
            if (module, call) in ALLOWED:
                used.add((module, call))
            else:
                unlisted.append(f"mergeops/{module}:{line}: {call}")
    assert not unlisted, ("these calls read files without mergeops.untrusted; use the door (read_json, read_bytes, "
                          "open_binary, ...) or, if the file is mergeops's own, list the call in ALLOWED with its "
                          "reason:\n" + "\n".join(unlisted))
    assert not set(ALLOWED) - used, f"ALLOWED lists calls that are gone; remove them: {sorted(set(ALLOWED) - used)}"


@pytest.mark.parametrize(("snippet", "expected"), [
    ("import json\njson.loads(path.read_text())", ["json.loads", "Path.read_text"]),
    ("from json import loads as parse\nparse(data)", ["json.loads"]),
    ("import numpy as np\nnp.load(p)", ["numpy.load"]),
    ("from safetensors import safe_open\nwith safe_open(p, 'pt') as f: pass", ["safetensors.safe_open"]),
    ("with open(p) as f: pass", ["open"]),
    ("with open(p, 'r+b') as f: pass", ["open"]),
    ("import os\nos.open(p, os.O_RDONLY)", ["os.open"]),
    ("import os\nos.open(p, os.O_RDWR | os.O_CREAT)", ["os.open"]),
    ("import shutil\nshutil.copyfile(a, b)", ["shutil.copyfile"]),
    ("with p.open('rb') as f: pass", ["Path.open"]),
    ("import torch\ntorch.load(p, weights_only=True)", ["torch.load"]),
    # not reads: writes, mergeops's own constructors, the door itself
    ("with open(p, 'wb') as f: pass", []),
    ("p.open('w')", []),
    ("import os\nos.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)", []),
    ("ModelFolder.open(p)\ncls.open(p)", []),
    ("from mergeops import untrusted\nuntrusted.read_json(p)\nuntrusted.open_binary(p)", []),
])
def test_the_walk_finds_every_way_of_reading_a_file_and_only_those(snippet: str, expected: list[str]) -> None:
    assert sorted(call for _, call in readers_in(snippet)) == sorted(expected)
