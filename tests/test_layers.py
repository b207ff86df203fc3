"""The package's imports follow its layers: low layers (model I/O, keys, durability, the method catalogue, the policy,
the ledger) import nothing from the stages; each stage imports only from lower ranks; nothing imports in a cycle.

Read from the source with ``ast``, so it holds for imports inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mergeops

PACKAGE = Path(mergeops.__file__).parent

# Lowest first. A module may import modules of a lower rank, and of its own rank only within its own group.
RANKS: list[tuple[str, ...]] = [
    ("errors", "threads", "allocator", "systemd", "isolated"),
    ("patterns", "untrusted"),  # what files mergeops did not write hold: the files themselves, regular expressions
    ("durable",),
    ("keys",),
    ("hub_uri",),
    ("attestation", "hub"),
    ("model",),
    ("synthetic",),
    ("fold.topk",),
    ("fold.methods",),  # the merge methods: pure math on tensors, plug-ins the policy names
    ("policy",),
    ("ledger",),
    ("registry",),
    ("intake",),
    ("gate",),
    ("fold",),
    ("commit",),
    ("protect",),
    ("publish",),
    ("pipeline",),
    ("daemon",),
    ("demo",),
    ("cli",),
    ("__main__",),
]


def group_of(module: str) -> tuple[int, str]:
    """(rank, group) of a module named relative to the package, e.g. 'fold.methods.opcm' -> the methods' rank."""
    best: tuple[int, str] | None = None
    for rank, groups in enumerate(RANKS):
        for group in groups:
            if (module == group or module.startswith(group + ".")) and (best is None or len(group) > len(best[1])):
                best = (rank, group)
    assert best is not None, f"mergeops.{module} is in no layer; add it to RANKS in {__file__}"
    return best


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports (each resolved to the longest known module name)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import submodule` imports the submodule; `from module import name`, the module
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name == "mergeops" or not name.startswith("mergeops."):
                continue
            relative = name.removeprefix("mergeops.")
            while relative and relative not in known:
                relative = relative.rpartition(".")[0]
            if relative:
                found.add(relative)
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {module: imports_of(path, set(found)) - {module} for module, path in found.items()}


def test_every_import_points_down_the_layers():
    wrong = []
    for module, targets in sorted(graph().items()):
        rank, group = group_of(module)
        for target in sorted(targets):
            target_rank, target_group = group_of(target)
            if target_rank > rank or (target_rank == rank and target_group != group):
                wrong.append(f"mergeops.{module} ({group}) imports mergeops.{target} ({target_group})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_module_imports_itself_through_others():
    edges = graph()
    cycles = []

    def visit(node: str, path: list[str], on_path: set[str], done: set[str]) -> None:
        for target in sorted(edges.get(node, ())):
            if target in on_path:
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in done:
                visit(target, [*path, target], on_path | {target}, done)
        done.add(node)

    done: set[str] = set()
    for start in sorted(edges):
        if start not in done:
            visit(start, [start], {start}, done)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
