"""What someone intent on merging a MergeLock-protected model does with it, applied to whole model folders:

* ``strip_marks``: remove every mark the model carries (the lock must not depend on them): weights rewritten with
  ``safetensors.torch.save_file`` and no metadata at all, the shard index rewritten with nothing but its weight map,
  no model card, no provenance, no other safetensors file, no ``mergelock*`` key in config.json;
* ``recover``: the anchor attack, ``mergeops.protect.attack.write_recovered``: with the public base model as anchor,
  fit every transform by least squares and undo it;
* ``distances``: how far a model's weights are from the original fine-tune, over the tensors the protection changed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MARK_FILES = ("README.md", "provenance.json")  # the model card and the in-toto statement
MARK_PREFIX = "mergelock"  # config.json keys starting with this are dropped too


def weight_files(folder: Path) -> list[str]:
    """The model's weights files: the shards its index names, else ``model.safetensors``."""
    index = folder / INDEX_FILE
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if not (folder / SINGLE_FILE).is_file():
        raise FileNotFoundError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    return [SINGLE_FILE]


def file_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's ``__metadata__`` (empty when it has none)."""
    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def strip_marks(model: Path, out: Path, trainer_state_from: Path | None = None) -> dict[str, Any]:
    """Copy ``model`` to ``out`` (replaced) without any mark; ``trainer_state_from``'s ``trainer_state.json`` is
    copied over when ``model`` has none (training metrics, not a MergeLock mark: MWA weighs checkpoints by them).

    Returns what was removed and what the copy holds; raises if a weights file of the copy still has metadata."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    weights = weight_files(model)
    removed: dict[str, Any] = {"files": [], "metadata": {}, "config_keys": []}
    total = 0
    weight_map: dict[str, str] = {}
    for name in weights:
        removed["metadata"][name] = sorted(file_metadata(model / name))  # the keys (a value can be a whole header)
        tensors = load_file(model / name)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map |= dict.fromkeys(tensors, name)
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, out / name)  # no metadata argument: no __metadata__ in the header
    if (model / INDEX_FILE).is_file():
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                  "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    for path in sorted(model.rglob("*")):
        relative = path.relative_to(model).as_posix()
        if not path.is_file() or relative in weights or relative == INDEX_FILE:
            continue
        if path.name in MARK_FILES or path.name.endswith(".safetensors") or MARK_PREFIX in path.name.lower():
            removed["files"].append(relative)
            continue
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out / relative)
    config = out / "config.json"
    if config.is_file():
        document = json.loads(config.read_text())
        removed["config_keys"] = [k for k in document if k.lower().startswith(MARK_PREFIX)]
        if removed["config_keys"]:
            config.write_text(json.dumps({k: v for k, v in document.items() if k not in removed["config_keys"]},
                                         indent=2) + "\n")
    copied_trainer_state = False
    if trainer_state_from is not None and not (out / "trainer_state.json").is_file():
        shutil.copyfile(trainer_state_from / "trainer_state.json", out / "trainer_state.json")
        copied_trainer_state = True
    left = {name: file_metadata(out / name) for name in weights}
    if any(left.values()) or any((out / name).exists() for name in MARK_FILES):
        raise RuntimeError(f"marks left in {out}: {left}")
    return {"source": str(model), "output": str(out), "weights_files": weights, "removed": removed,
            "files": sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()),
            "trainer_state_copied": copied_trainer_state}


def recover(protected: Path, anchor: Path, out: Path) -> dict[str, Any]:
    """The model an attacker holding the public base ``anchor`` recovers from ``protected`` (written to ``out``)."""
    from mergeops.protect.attack import write_recovered

    shutil.rmtree(out, ignore_errors=True)
    return write_recovered(protected, anchor, out)


def distances(original: Path, models: Mapping[str, Path]) -> dict[str, Any]:
    """Over the floating tensors where ``models["protected"]`` differs from the ``original`` fine-tune: for every
    model, the mean and largest ‖W − W_original‖ / ‖W_original‖ (tensor by tensor)."""
    with ExitStack() as stack:
        def opened(folder: Path) -> dict[str, Any]:
            handles = {}
            for name in weight_files(folder):
                f = stack.enter_context(safe_open(folder / name, framework="pt"))
                handles |= dict.fromkeys(f.keys(), f)
            return handles

        truth = opened(original)
        others = {label: opened(path) for label, path in models.items()}
        changed: list[str] = []
        found: dict[str, list[float]] = {label: [] for label in models}
        for name, handle in truth.items():
            w = handle.get_tensor(name)
            if not w.dtype.is_floating_point:
                continue
            w = w.double()
            if "protected" in others and torch.equal(others["protected"][name].get_tensor(name).double(), w):
                continue
            changed.append(name)
            norm = float(w.norm()) or 1.0
            for label, tensors in others.items():
                found[label].append(float((tensors[name].get_tensor(name).double() - w).norm()) / norm)
    return {"tensors": len(changed), "changed": changed,
            "mean_relative_distance_to_finetune": {k: sum(v) / len(v) if v else 0.0 for k, v in found.items()},
            "max_relative_distance_to_finetune": {k: max(v, default=0.0) for k, v in found.items()}}
