"""Training metrics of a checkpoint (loss, step), for metric-weighted methods (SPEC §4, mwa).

Sources, highest priority first: the ``--metrics`` file, ``metrics.json`` in the checkpoint, and the
Hugging Face Trainer's ``trainer_state.json`` (``global_step``, and the last ``loss`` in ``log_history``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from mergeops import untrusted
from mergeops.errors import RejectedError, UntrustedFileError, UsageError


def _numbers(document: object, where: str) -> dict[str, float]:
    if not isinstance(document, dict):
        raise RejectedError(f"{where} must be a JSON object like {{\"loss\": 0.42, \"step\": 1000}}.")
    found = {}
    for key, value in document.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise RejectedError(f"{where}: metric {key!r} is {value}; metrics must be finite numbers.")
            found[key] = float(value)
    return found


def _trainer_state(path: Path) -> dict[str, float]:
    state = untrusted.read_json(path, finite=False)  # NaN is read: only a NaN last loss is refused, below
    if not isinstance(state, dict):
        raise RejectedError(f"{path} is a JSON {type(state).__name__}, not the object the Trainer writes; fix or "
                            "remove it.")
    found = {}
    if isinstance(state.get("global_step"), int | float):
        found["step"] = state["global_step"]
    history = state.get("log_history")
    entries = [entry for entry in history if isinstance(entry, dict)] if isinstance(history, list) else []
    losses = [entry["loss"] for entry in entries if isinstance(entry.get("loss"), int | float)]
    if losses:
        found["loss"] = losses[-1]
    return _numbers(found, str(path))  # the Trainer writes NaN for a diverged loss


def load_metrics(checkpoint: Path, metrics_file: Path | None = None) -> dict[str, float]:
    metrics: dict[str, float] = {}
    readers = [(checkpoint / "trainer_state.json", _trainer_state),  # lowest priority first
               (checkpoint / "metrics.json", lambda path: _numbers(untrusted.read_json(path, finite=False), str(path)))]
    for path, read in readers:
        if os.path.lexists(path):  # a FIFO or dangling link there is refused by the door, not passed over
            try:
                metrics |= read(path)
            except UntrustedFileError as exc:
                raise RejectedError(f"{exc.path} {exc.reason}; fix or remove it.") from exc
    if metrics_file is not None:
        try:
            metrics |= _numbers(untrusted.read_json(metrics_file, finite=False), str(metrics_file))
        except UntrustedFileError as exc:
            raise UsageError(f"metrics file {exc.path} {exc.reason}.") from exc
    return metrics
