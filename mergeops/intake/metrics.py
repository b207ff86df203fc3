"""Training metrics of a checkpoint (loss, step), for metric-weighted methods (SPEC §4, mwa).

Sources, highest priority first: the ``--metrics`` file, ``metrics.json`` in the checkpoint, and the
Hugging Face Trainer's ``trainer_state.json`` (``global_step``, and the last ``loss`` in ``log_history``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mergeops.errors import RejectedError, UsageError


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
    state = json.loads(path.read_text())
    found = {}
    if isinstance(state.get("global_step"), int | float):
        found["step"] = state["global_step"]
    losses = [entry["loss"] for entry in state.get("log_history", []) if isinstance(entry.get("loss"), int | float)]
    if losses:
        found["loss"] = losses[-1]
    return _numbers(found, str(path))  # the Trainer writes NaN for a diverged loss


def load_metrics(checkpoint: Path, metrics_file: Path | None = None) -> dict[str, float]:
    metrics: dict[str, float] = {}
    readers = [(checkpoint / "trainer_state.json", _trainer_state),  # lowest priority first
               (checkpoint / "metrics.json", lambda path: _numbers(json.loads(path.read_text()), str(path)))]
    for path, read in readers:
        if path.is_file():
            try:
                metrics |= read(path)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RejectedError(f"{path} is not valid JSON ({exc}); fix or remove it.") from exc
    if metrics_file is not None:
        try:
            metrics |= _numbers(json.loads(Path(metrics_file).read_text()), str(metrics_file))
        except OSError as exc:
            raise UsageError(f"cannot read metrics file {metrics_file} ({exc.strerror}).") from exc
        except json.JSONDecodeError as exc:
            raise UsageError(f"metrics file {metrics_file} is not valid JSON ({exc}).") from exc
    return metrics
